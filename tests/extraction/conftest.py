"""Extraction tests run in the teacher environment; vLLM gets its CPU settings and a private cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from benchmarks import harness

RUN_DIR = Path(tempfile.mkdtemp(prefix="stepwise-extraction-tests-"))
# vLLM reads these at import and start-up: its CPU settings, every cache, socket and temp file inside this run's
# folder; Ray local and quiet; stages run in this process.
os.environ.update(harness.vllm_cpu_environment(RUN_DIR))
os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "STEPWISE_INPROCESS": "1"})
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(harness.ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
