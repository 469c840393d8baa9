"""What the benchmarks (and the tests) share: where results go, the lock that keeps timed runs apart, free ports,
running a function alone in a fresh process, a vLLM OpenAI server to fall back on, and an S3 server on loopback
(moto in server mode, a separate process answering HTTP: nothing in-process is patched). Standard library only, and
stepwise.envs, which is too (the GPU check imports it on a bare box).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from stepwise.envs import ROOT
from stepwise.net import free_port, wait_until_ready

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
    return process_status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident set now (VmRSS, Linux)."""
    return process_status_mb("VmRSS")


def process_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def machine() -> str:
    """The machine a result was measured on, as every results file records it."""
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other work)"


def write_results(out: Path, report: dict, table: str) -> Path:
    """`out`.json (the report) and `out`.md (the table), the table printed too; returns the JSON's path."""
    from stepwise import artifacts

    out = Path(out)
    artifacts.write_json(out.with_suffix(".json"), report)
    artifacts.write_atomic(out.with_suffix(".md"), table + "\n")
    print(table)
    return out.with_suffix(".json")


def command_line() -> str:
    """The command this process runs, as a user types it (`stepwise bench ...`), recorded beside the results."""
    return "python3 -m stepwise " + shlex.join(sys.argv[1:])


def stop_process(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def vllm_cpu_environment(folder: Path) -> dict[str, str]:
    """What vLLM reads at import and start-up, for this machine: the engine in the calling process, a 1 GiB KV cache,
    one thread, and every cache, socket and temp file under `folder` (keep it short: vLLM's Unix sockets live under
    TMPDIR). Creates the folders."""
    folders = {"VLLM_CACHE_ROOT": "vllm-cache", "XDG_CACHE_HOME": "cache", "HF_HOME": "hf", "TMPDIR": "tmp"}
    for name in folders.values():
        (folder / name).mkdir(parents=True, exist_ok=True)
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    } | {key: str(folder / name) for key, name in folders.items()}


@contextmanager
def vllm_openai_server(
    model: Path, scratch: Path, python: Path | None = None, served_name: str = "tiny", ready_timeout_s: float = 300
) -> Iterator[str]:
    """A real vLLM OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`) for `model` on a free
    loopback port, with CPU settings for this machine (engine in the server process, 1 GiB KV cache, one thread,
    eager mode, 4096-token context) and every cache, socket and temp file in a short temporary folder (vLLM's Unix
    sockets live under TMPDIR). `python` is an interpreter with vLLM (default: this one; the student side passes the
    teacher environment's). Yields the base URL; the server is stopped on exit, its log kept in `scratch`."""
    port = free_port()
    caches = Path(tempfile.mkdtemp(prefix="vllm-"))
    env = dict(os.environ) | vllm_cpu_environment(caches)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [str(python or sys.executable), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--served-model-name", served_name,
               "--max-model-len", "4096"]  # fmt: skip
    scratch.mkdir(parents=True, exist_ok=True)
    log_path = scratch / "vllm-server.log"
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(base_url + "/health", ready_timeout_s, server, log_path)
            yield base_url
        finally:
            stop_process(server)
            shutil.rmtree(caches, ignore_errors=True)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "stepwise-test", "AWS_SECRET_ACCESS_KEY": "stepwise-test"}


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port; yields the environment that points S3 clients at it (boto3 and
    pyarrow both read AWS_ENDPOINT_URL). The instance-metadata lookup is off, so a missing credential fails at once
    instead of asking an address off this machine."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/moto-api/", 60, process)
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            **S3_CREDENTIALS,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def new_bucket(prefix: str = "stepwise") -> str:
    """A fresh bucket on the server the environment points at; returns s3://<name>."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
