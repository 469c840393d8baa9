"""Extraction tests run in the teacher environment; vLLM gets its CPU settings and a private cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

RUN_DIR = Path(tempfile.mkdtemp(prefix="stepwise-extraction-tests-"))
# vLLM reads these at import and start-up: engine in this process, 1 GiB KV cache, one thread,
# and every cache, socket and temp file inside this run's folder.
for key, value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_CACHE_ROOT": str(RUN_DIR / "vllm-cache"),
    "XDG_CACHE_HOME": str(RUN_DIR / "cache"),
    "HF_HOME": str(RUN_DIR / "hf"),
    "TMPDIR": str(RUN_DIR / "tmp"),
    "VLLM_NO_USAGE_STATS": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "STEPWISE_INPROCESS": "1",
}.items():
    os.environ[key] = value
(RUN_DIR / "tmp").mkdir()
tempfile.tempdir = None  # re-read TMPDIR


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(RUN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    from stepwise.extraction.tiny_teacher import build_tiny_teacher

    return build_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """This session's scratch folder (short, for Ray's socket paths); removed at the end."""
    return RUN_DIR


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment for a `python -m stepwise ...` child: this session's settings, the checkout on the path."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
