"""Fixtures shared across stages: small models built locally (nothing can come from a hub here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """Student environment only (needs torch/transformers/sentencepiece)."""
    from stepwise.training.tiny import build_student_folder

    return build_student_folder(tmp_path_factory.mktemp("tiny-student"), "tiny", "esnli", vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_student_dir, tmp_path_factory) -> Path:
    """`stepwise export` of tiny_student_dir (fp32, CPU target, parity-gated on 32 valid examples). Student environment only."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main

    return export_main(model=tiny_student_dir, out=tmp_path_factory.mktemp("tiny-export") / "onnx", parity=ParityOptions(parity_limit=32))


@pytest.fixture(scope="session")
def custom_nli_rows() -> list[dict]:
    """A custom 3-class NLI dataset as a user would bring it, made from shipped e-SNLI rows: id, premise,
    hypothesis, input (the two joined), label (as text), rationale (the human explanation), completion (PaLM's
    raw chain-of-thought output, run-on included) and split (240 train, 30 valid, 60 test)."""
    from stepwise import tasks

    esnli = tasks.get_task("esnli")
    rows = []
    for split, count in (("train", 240), ("valid", 30), ("test", 60)):
        for example in tasks.load_split(esnli, split)[:count]:
            premise, hypothesis = example.input.removeprefix("Premise: ").split("\nHypothesis: ")
            rows.append({"id": example.id, "premise": premise, "hypothesis": hypothesis, "input": example.input,
                         "label": example.label, "rationale": example.rationale,
                         "completion": example.teacher_completion, "split": split})
    return rows


@contextlib.contextmanager
def vllm_openai_server(model: Path, scratch: Path, python: Path | None = None, served_name: str = "tiny",
                       ready_timeout_s: float = 300) -> Iterator[str]:
    """A real vLLM OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`) for `model` on a free
    loopback port, with the CPU settings the tests use (engine in the server process, 1 GiB KV cache, one thread,
    eager mode, 4096-token context) and every cache, socket and temp file in a short temporary folder. `python` is an
    interpreter with vLLM (default: this one; student-side tests pass the teacher environment's). Yields the base URL;
    the server is stopped on exit, its log kept in `scratch`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caches = Path(tempfile.mkdtemp(prefix="vllm-"))  # short: vLLM's Unix sockets live under TMPDIR
    for folder in ("tmp", "cache", "hf", "vllm-cache"):
        (caches / folder).mkdir()
    env = dict(os.environ) | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(caches / "vllm-cache"), "XDG_CACHE_HOME": str(caches / "cache"), "HF_HOME": str(caches / "hf"),
        "TMPDIR": str(caches / "tmp"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    log_path = scratch / "vllm-server.log"
    command = [str(python or sys.executable), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--enforce-eager", "--served-model-name", served_name, "--max-model-len", "4096"]
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                assert server.poll() is None, f"the vLLM server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
                try:
                    with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not become ready in {ready_timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield base_url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(caches, ignore_errors=True)


@pytest.fixture(scope="session")
def start_vllm_server():
    """`with start_vllm_server(model, scratch, python=None) as base_url:` a real vLLM OpenAI server (see vllm_openai_server)."""
    return vllm_openai_server
