"""Training on Ray: `stepwise train --workers N` as a Ray Train `TorchTrainer` (gloo on CPUs, NCCL on GPUs), and
the Ray session `stepwise experiment` shares for its grid.

Every worker runs the same `train_worker` a single process runs. Checkpoints go through Ray Train's
checkpointing into <out>/checkpoint/ray (see checkpoints.py): when a worker dies, Ray Train restarts all of
them from the last checkpoint (up to --max-failures times); when the driver dies, the same command finds
Ray's record there and resumes.

Without --ray-address, Ray starts privately on this machine with every port bound to 127.0.0.1. With one, the
nodes share nothing but `--out` on an object store (s3://...): the driver reads the task data and rationales and
ships the examples in the plan, and the run folder and Ray's checkpoints live on the store (a local --out must be
on a filesystem every node mounts).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stepwise import envs
from stepwise.training import checkpoints

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray advertises and binds 127.0.0.1, as on a laptop


@contextlib.contextmanager
def session(address: str, cpus: int) -> Iterator[None]:
    """Connected to Ray for the duration: the cluster at `address`, or (empty) a private one started here with
    `cpus` CPUs and every port on 127.0.0.1. What was started here is shut down on the way out; an already
    connected session (a test's, say) is used as is."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        yield
        return
    saved_env = {name: os.environ.get(name) for name in ("PYTHONPATH", LOOPBACK_ONLY)}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    # Workers are new processes: they find the stepwise package through PYTHONPATH.
    os.environ["PYTHONPATH"] = envs.root_first(os.environ.get("PYTHONPATH"))
    temp = None
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # Ray's own switch for machines that never join a cluster: advertise and bind 127.0.0.1 only. Its
            # children read the variable; this process read it when it imported Ray, so set the value too.
            os.environ[LOOPBACK_ONLY] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
            # Ray's sockets live in its temp folder and a Unix socket path holds at most 107 bytes: keep it short.
            temp = tempfile.mkdtemp(prefix="stepwise-ray-")
            # The dashboard serves the state API that Ray Train's controller polls (on 127.0.0.1 too).
            ray.init(num_cpus=cpus, include_dashboard=True, _temp_dir=temp, log_to_driver=True)
        yield
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


_RENDEZVOUS: list[Any] = []  # rank 0's listening socket and torch store, kept for its worker process's life


def _serve_rendezvous(world_size: int, timeout_s: int) -> tuple[str, int]:
    """On rank 0: torch's rendezvous store listening on this node's own address only. Left to itself, the store
    binds every interface (any host that reaches the port could join or poison the process group); given a socket
    already bound, it listens there. Returns the address and port the other ranks connect to."""
    import socket
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    address = ray.util.get_node_ip_address()
    listener = socket.create_server((address, 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        address,
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )
    _RENDEZVOUS[:] = [listener, store]
    return address, port


def _use_rendezvous(address: str, port: int) -> None:
    """On every rank: env:// connects to the store at `address:port` as a client, rank 0 too (torchelastic's
    agent-store mode: the store is already served)."""
    os.environ.update({"MASTER_ADDR": address, "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"})


def node_rendezvous_config(backend: str) -> Any:
    """Ray Train's TorchConfig with the process group's store on rank 0's node address instead of every interface
    (issue 19 item 11). Ray Train's own setup opens the store itself, so this backend does what its `on_start`
    does for gloo/NCCL with the store served first."""
    import ray
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    class NodeRendezvousBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            address, port = worker_group.execute_single(
                0, _serve_rendezvous, len(worker_group), backend_config.timeout_s
            )
            worker_group.execute(_use_rendezvous, address, port)
            if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v2 sets RANK, LOCAL_RANK, ... here
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get(
                [
                    worker_group.execute_single_async(
                        rank,
                        _setup_torch_process_group,
                        backend=backend_config.backend,
                        world_rank=rank,
                        world_size=len(worker_group),
                        init_method="env://",
                        timeout_s=backend_config.timeout_s,
                    )
                    for rank in range(len(worker_group))
                ]
            )

    class NodeRendezvousConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return NodeRendezvousBackend

    return NodeRendezvousConfig(backend=backend)


def _run_worker(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker: the process group is up; run the shared training loop."""
    from ray.train.torch import get_device

    config["worker"](config["plan"], get_device(), True)


def fit(plan: Any, worker: Callable[[Any, Any, bool], None]) -> None:
    """Run `worker(plan, device, on_ray=True)` on plan.compute.workers Ray Train workers; return when they finish.
    Raises Ray Train's TrainingFailedError once more than --max-failures worker failures happened."""
    from ray import train
    from ray.train.torch import TorchTrainer

    compute = plan.compute
    with session(compute.ray_address, cpus=max(os.cpu_count() or 1, compute.workers)):
        trainer = TorchTrainer(
            _run_worker,
            train_loop_config={"plan": plan, "worker": worker},
            scaling_config=train.ScalingConfig(num_workers=compute.workers, use_gpu=compute.use_gpu),
            torch_config=node_rendezvous_config("nccl" if compute.use_gpu else "gloo"),
            run_config=train.RunConfig(
                name=checkpoints.RAY_RUN,
                storage_path=checkpoints.ray_storage(plan.out, plan.store),
                failure_config=train.FailureConfig(max_failures=compute.max_failures),
                checkpoint_config=train.CheckpointConfig(
                    num_to_keep=2
                ),  # the newest and, while it uploads, the one before
            ),
        )
        trainer.fit()


def remote_call(function: Callable[..., Path], cpus: int, gpus: float) -> Callable[..., Any]:
    """`function` as a Ray task holding `cpus` CPUs (its torch threads) and `gpus` GPUs; call .remote(...)."""
    import ray

    def call(*args: Any, **kwargs: Any) -> Path:
        import torch

        torch.set_num_threads(cpus)
        return function(*args, **kwargs)

    return ray.remote(num_cpus=cpus, num_gpus=gpus)(call)
