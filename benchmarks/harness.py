"""What the benchmarks (and the tests) share: where results go, the lock that keeps timed runs apart, free ports,
running a function alone in a fresh process, a vLLM OpenAI server to fall back on, an S3 server on loopback
(moto in server mode, a separate process answering HTTP: nothing in-process is patched), and a multi-node Ray
cluster on loopback (a head and worker nodes as separate raylets, each started by its own `ray start --block` with
its own temp dir and disk), whose worker nodes can be killed with SIGKILL. Standard library only, and
stepwise.envs, which is too (the GPU check imports it on a bare box).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from stepwise.envs import ROOT, root_first
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
    env["PYTHONPATH"] = root_first(os.environ.get("PYTHONPATH"))
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


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (Ray's daemons and workers are children of the driver that started Ray),
    with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


@dataclass
class RayNodes:
    """A running loopback cluster: `address` for `ray.init` / `--ray-address`; `workers[i]` is the `ray start`
    process of worker node i."""

    address: str
    head: subprocess.Popen
    workers: list[subprocess.Popen]
    root: Path
    killed: list[int] = field(default_factory=list)

    def disk(self, worker: int) -> Path:
        """Worker node `worker`'s own disk (its processes' TMPDIR and STEPWISE_CACHE are in it)."""
        return self.root / f"worker-{worker}-disk"

    def raylet_pid(self, worker: int) -> int:
        found = [pid for pid, cmd in descendants(self.workers[worker].pid).items() if "/raylet " in f"{cmd} "]
        if not found:
            raise RuntimeError(f"worker node {worker} has no raylet")
        return found[0]

    def running(self, marker: str) -> list[int]:
        """The live worker node of each process whose command line holds `marker` (Ray names actor processes
        `ray::<Class>`), a node once per process."""
        return [
            index
            for index, node in enumerate(self.workers)
            if index not in self.killed
            for command in descendants(node.pid).values()
            if marker in command
        ]

    def kill_node(self, worker: int) -> None:
        """kill -9 worker node `worker` as a machine that dies: its raylet, then every other process of the node
        (its workers, which would otherwise go on until they notice the raylet is gone)."""
        os.kill(self.raylet_pid(worker), signal.SIGKILL)
        for pid in descendants(self.workers[worker].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed.append(worker)


def _node_ports() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults on every node (they would clash on one machine)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _ray_start(args: list[str], temp_dir: Path, env: dict[str, str], python: Path) -> subprocess.Popen:
    """One node: its own Ray temp dir, and its own disk as its processes see it (TMPDIR, STEPWISE_CACHE), so
    nothing one node writes is where another looks."""
    ray = str(python.with_name("ray"))
    log = (temp_dir.parent / f"{temp_dir.name}.log").open("wb")
    disk = temp_dir.parent / f"{temp_dir.name}-disk"
    (disk / "tmp").mkdir(parents=True)
    env = {**env, "TMPDIR": str(disk / "tmp"), "STEPWISE_CACHE": str(disk / "cache")}
    return subprocess.Popen(
        [ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *_node_ports(), *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def alive_nodes(address: str, env: dict[str, str], python: Path = Path(sys.executable)) -> int:
    # Ray itself prints to stdout here (a dead node's "lagging heartbeats" notice): the count is the marked line
    script = (
        "import ray; ray.init(address=%r, logging_level='ERROR'); print('alive:', sum(n['Alive'] for n in ray.nodes()))"  # noqa: E501
    )
    result = subprocess.run([str(python), "-c", script % address], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    counts = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("alive: ")]
    return int(counts[-1]) if result.returncode == 0 and counts else 0


@contextmanager
def ray_nodes(
    env: dict[str, str],
    worker_cpus: int = 1,
    head_cpus: int = 0,
    workers: int = 2,
    head_resources: dict | None = None,
    dashboard: bool = False,
    python: Path = Path(sys.executable),
) -> Iterator[RayNodes]:
    """A head (`head_cpus` CPUs: 0 keeps work off it, as a real head node) and `workers` worker nodes with
    `worker_cpus` CPUs and a `node-<i>` resource each, as separate raylets on 127.0.0.1. `env` is every node's
    environment (its workers inherit it: the object store's endpoint and credentials, as a real cluster's nodes
    get them from their machine). `dashboard`: the head serves Ray's dashboard (and the state API Ray Train's
    controller polls) on 127.0.0.1. `python`: the environment the nodes run (its `ray`). Stopped, and every
    process of theirs killed, on exit."""
    root = Path(tempfile.mkdtemp(prefix="stepwise-cluster-", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    try:
        head_args = [
            f"--num-cpus={head_cpus}",
            "--head",
            f"--port={port}",
            *(
                ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"]
                if dashboard
                else ["--include-dashboard=false"]
            ),
            f"--ray-client-server-port={free_port()}",
            f"--resources={json.dumps(head_resources or {})}",
        ]
        started.append(_ray_start(head_args, root / "head", env, python))
        for index in range(workers):
            node_args = [f"--address={address}", f"--num-cpus={worker_cpus}",
                         f"--resources={json.dumps({f'node-{index}': 1})}"]  # fmt: skip
            started.append(_ray_start(node_args, root / f"worker-{index}", env, python))
        deadline = time.monotonic() + 180
        while alive_nodes(address, env, python) < workers + 1:
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                logs = "\n".join(p.read_text()[-1500:] for p in sorted(root.glob("*.log")))
                raise RuntimeError(f"the loopback Ray cluster did not come up:\n{logs}")
            time.sleep(1)
        yield RayNodes(address, started[0], started[1:], root)
    finally:
        for process in reversed(started):
            _stop_node(process)
        shutil.rmtree(root, ignore_errors=True)


def _stop_node(process: subprocess.Popen) -> None:
    """SIGTERM the node's `ray start --block` (it stops its node's processes), then SIGKILL whatever is left."""
    left = descendants(process.pid)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in [*left, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
