"""The benchmarks' shared helpers: a function timed alone in a fresh process, and the lock between benchmarks."""

from __future__ import annotations

import fcntl
import os

import pytest

from benchmarks import harness

PARENT_ONLY: list[str] = []  # filled by the test: a forked child would see it, a spawned one imports this module anew


def child_facts(name: str) -> dict:
    return {
        "pid": os.getpid(),
        "env": os.environ.get(name),
        "parent_state": list(PARENT_ONLY),
        "peak_mb": harness.peak_rss_mb(),
    }


def fail(message: str) -> None:
    raise ValueError(message)


def test_a_function_runs_alone_in_a_fresh_process_with_its_environment():
    PARENT_ONLY.append("set in the test process")
    facts = harness.in_fresh_process(child_facts, env={"STEPWISE_TEST_VALUE": "7"}, name="STEPWISE_TEST_VALUE")
    assert facts["pid"] != os.getpid() and facts["env"] == "7"
    assert "STEPWISE_TEST_VALUE" not in os.environ  # only the child's environment changed
    assert facts["parent_state"] == []  # a spawned interpreter, not a fork of this test process
    assert facts["peak_mb"] > 0


def test_the_child_error_comes_back():
    with pytest.raises(ValueError, match="no such backend"):
        harness.in_fresh_process(fail, message="no such backend")


def test_the_lock_keeps_a_second_benchmark_out(tmp_path):
    lock = tmp_path / "bench.lock"
    with harness.bench_lock(lock):
        with lock.open() as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with lock.open() as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
