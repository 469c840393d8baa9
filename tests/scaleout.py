"""What the scale-out tests share: a real multi-node Ray cluster on loopback (a head and worker nodes as separate
raylets, each started by its own `ray start --block` with its own temp dir), whose worker nodes can be killed with
SIGKILL. The S3 server on loopback they write to is benchmarks.harness.s3_server. The driver and the nodes share
no output path: everything they hand each other goes through the object store. Imported by name, as
tests/helpers.py is."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers import descendants, free_port


@dataclass
class RayNodes:
    """A running loopback cluster: `address` for `ray.init` / `--ray-address`; `workers[i]` is the `ray start`
    process of worker node i."""

    address: str
    head: subprocess.Popen
    workers: list[subprocess.Popen]
    root: Path
    killed: list[int] = field(default_factory=list)

    def raylet_pid(self, worker: int) -> int:
        found = [pid for pid, cmd in descendants(self.workers[worker].pid).items() if "/raylet " in f"{cmd} "]
        assert found, f"worker node {worker} has no raylet"
        return found[0]

    def kill_node(self, worker: int) -> None:
        """kill -9 worker node `worker`'s raylet, as a machine that dies: its workers lose their raylet and exit."""
        os.kill(self.raylet_pid(worker), signal.SIGKILL)
        self.killed.append(worker)


def _node_ports() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults on every node (they would clash on one machine)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _ray_start(args: list[str], temp_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    ray = str(Path(sys.executable).with_name("ray"))
    log = (temp_dir.parent / f"{temp_dir.name}.log").open("wb")
    return subprocess.Popen(
        [ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *_node_ports(), *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def alive_nodes(address: str, env: dict[str, str]) -> int:
    # Ray itself prints to stdout here (a dead node's "lagging heartbeats" notice): the count is the marked line
    script = (
        "import ray; ray.init(address=%r, logging_level='ERROR'); print('alive:', sum(n['Alive'] for n in ray.nodes()))"  # noqa: E501
    )
    result = subprocess.run([sys.executable, "-c", script % address], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    counts = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("alive: ")]
    return int(counts[-1]) if result.returncode == 0 and counts else 0


@contextmanager
def ray_nodes(
    env: dict[str, str], worker_cpus: int = 1, head_cpus: int = 0, workers: int = 2, head_resources: dict | None = None
) -> Iterator[RayNodes]:
    """A head (`head_cpus` CPUs: 0 keeps work off it, as a real head node) and `workers` worker nodes with
    `worker_cpus` CPUs and a `node-<i>` resource each, as separate raylets on 127.0.0.1. `env` is every node's
    environment (its workers inherit it: the object store's endpoint and credentials, as a real cluster's nodes
    get them from their machine). Stopped, and every process of theirs killed, on exit."""
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
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--resources={json.dumps(head_resources or {})}",
        ]
        started.append(_ray_start(head_args, root / "head", env))
        for index in range(workers):
            node_args = [f"--address={address}", f"--num-cpus={worker_cpus}",
                         f"--resources={json.dumps({f'node-{index}': 1})}"]  # fmt: skip
            started.append(_ray_start(node_args, root / f"worker-{index}", env))
        deadline = time.monotonic() + 180
        while alive_nodes(address, env) < workers + 1:
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
