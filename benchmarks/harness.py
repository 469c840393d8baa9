"""What the benchmarks share: where results go, the lock that keeps timed runs apart, free ports, and running a
function alone in a fresh process. Standard library only (the GPU check imports it on a bare box).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shlex
import socket
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LOCK = Path("/tmp/stepwise-bench.lock")

Result = TypeVar("Result")


@contextmanager
def bench_lock(path: Path = LOCK) -> Iterator[None]:
    """Hold the benchmark lock while timing, so that no two benchmarks share the machine. The benchmark takes it
    itself: starting one under `flock` on the same file as well would deadlock (the outer lock is another holder)."""
    path.touch(exist_ok=True)
    with path.open() as lock:
        print(f"[bench] waiting for {path}", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _set_environment(values: dict[str, str]) -> None:
    os.environ.update(values)


def in_fresh_process(fn: Callable[..., Result], /, env: dict[str, str] | None = None, **kwargs: object) -> Result:
    """`fn(**kwargs)` in a new Python process, spawned (not forked): what it imports, the threads it starts and its
    peak memory are its own, and no two frameworks share one process. `env` is added to that process's environment
    before `fn` runs (e.g. OMP_NUM_THREADS). Its return value and exceptions come back here."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1, mp_context=spawn, initializer=_set_environment, initargs=(env or {},)
    ) as pool:
        return pool.submit(fn, **kwargs).result()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, Linux). Not ru_maxrss: that carries over fork+exec from the
    parent, here the process that built and exported the models."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line() -> str:
    """The command this process runs, as a user types it (`stepwise bench ...`), recorded beside the results."""
    return "python3 -m stepwise " + shlex.join(sys.argv[1:])
