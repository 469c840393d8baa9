"""Free ports and waiting for a local HTTP server: what serving, the benchmarks and the tests share. Standard
library only (the GPU check imports it through benchmarks/harness.py on a bare box)."""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_ready(
    url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Return once GET `url` answers 200. A clear error when `process` (the server, started elsewhere) exits first
    or the time runs out, with the tail of its `log`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{shlex.join(map(str, process.args[:4]))} exited with {process.returncode} before {url} answered"
                f"{tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s{tail(log)}")
        time.sleep(0.2)


def tail(log: Path | None) -> str:
    return f":\n{log.read_text(errors='replace')[-3000:]}" if log and log.exists() else ""
