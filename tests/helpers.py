"""What tests of every stage use: the repository root, free ports, and running `stepwise` as a user runs it
(imported by name: pytest puts tests/ on the path for tests/conftest.py)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

from benchmarks.harness import ROOT, descendants, free_port, wait_until_ready

__all__ = ["ROOT", "cli_env", "descendants", "free_port", "loopback", "start_stepwise", "stepwise", "wait_until_ready"]


def cli_env(**extra: str) -> dict[str, str]:
    """What a user's shell would hold, with Ray's token auth off (tests only) and one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return (
        env
        | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
        | extra
    )


def stepwise(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m stepwise ...` in a child process, as a user runs it; `check` fails the test on a non-zero exit."""
    result = subprocess.run([sys.executable, "-m", "stepwise", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    if check and result.returncode:
        raise AssertionError(f"stepwise {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def start_stepwise(*args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """`python -m stepwise ...` started in the background (to be stopped by the test); output discarded unless
    `stdout` says otherwise."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} | popen
    return subprocess.Popen([sys.executable, "-m", "stepwise", *args], cwd=ROOT, env=env or cli_env(), **popen)


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)  # ::ffff:127.0.0.1
