"""Free ports and waiting for a local HTTP server: what serving, the benchmarks and the tests share. Standard
library only (the GPU check imports it through benchmarks/harness.py on a bare box)."""

from __future__ import annotations

import random
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

# Where free_port draws from: above Ray's worker ports (10002-19999) and below Serve's direct-ingress ports
# (30000-31000) and the OS's ephemeral range (32768-60999 on Linux). A port the OS picks (bind to port 0) comes
# from the ephemeral range, which every outgoing connection and every Ray process binding port 0 also draws
# from: such a port can be taken by someone else before the server it was picked for binds it (a CI run lost
# HAProxy's metrics port that way).
PORT_RANGE = range(20000, 30000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to at `host` now, drawn at random from PORT_RANGE (the OS's pick when the range
    overlaps the ephemeral one or holds no free port)."""
    draw = random.SystemRandom()  # not `random`: processes seeded alike (pytest's workers) would draw alike
    if PORT_RANGE.stop <= ephemeral_ports().start:
        for _ in range(100):
            port = draw.choice(PORT_RANGE)
            if bindable(host, port):
                return port
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):  # not Linux: IANA's dynamic range
        return range(49152, 65536)


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
