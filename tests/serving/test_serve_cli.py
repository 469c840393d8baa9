"""`stepwise serve` as a user runs it: a separate process that answers HTTP, then Ctrl-C shuts everything
down: exit code 0, the port free again, no Ray process left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from stepwise import tasks

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def processes_using(folder: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_stepwise_serve_answers_then_ctrl_c_shuts_down_cleanly(tiny_export_dir, tmp_path_factory):
    # A short folder: Ray's socket paths under it must stay within 107 bytes.
    port, run_dir = free_port(), tmp_path_factory.mktemp("cli")
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "stepwise", "serve", "--model", str(tiny_export_dir), "--port", str(port), "--metrics-port", str(free_port()), "--run-dir", str(run_dir)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "stepwise serve did not become ready"
            time.sleep(0.5)
        # The model id defaults to the export's task name; a single served model needs no id in the request.
        answer = httpx.post(f"{url}/v1/predict", json={"inputs": {"premise": "A dog runs.", "hypothesis": "An animal moves."}}, timeout=30).json()
        assert answer["model"] == "esnli" and answer["predictions"][0]["label"] in tasks.NLI_LABELS
        assert processes_using(run_dir), "Ray should be running from the run folder"

        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=90)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output
    assert "shutting down" in output
    assert port_is_free(port)
    deadline = time.monotonic() + 30
    while processes_using(run_dir) and time.monotonic() < deadline:  # raylet children exit a moment later
        time.sleep(0.5)
    assert not processes_using(run_dir), [p.info["cmdline"][:3] for p in processes_using(run_dir)]
