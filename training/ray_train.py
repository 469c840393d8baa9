"""Training on Ray: `stepwise train --workers N` as a Ray Train `TorchTrainer` (gloo on CPUs, NCCL on GPUs), and
the Ray session `stepwise experiment` shares for its grid.

Every worker runs the same `train_worker` a single process runs. Checkpoints go through Ray Train's
checkpointing into <out>/checkpoint/ray (see checkpoints.py): when a worker dies, Ray Train restarts all of
them from the last checkpoint (up to --max-failures times); when the driver dies, the same command finds
Ray's record there and resumes.

Without --ray-address, Ray starts privately on this machine with every port bound to 127.0.0.1. With one,
the run folder, the task data and the rationales must be on storage every node sees (Ray Train requires
shared storage for checkpoints anyway).
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
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(envs.ROOT), os.environ.get("PYTHONPATH", "")) if p)
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


def _run_worker(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker: the process group is up; run the shared training loop."""
    from ray.train.torch import get_device

    config["worker"](config["plan"], get_device(), True)


def fit(plan: Any, worker: Callable[[Any, Any, bool], None]) -> None:
    """Run `worker(plan, device, on_ray=True)` on plan.compute.workers Ray Train workers; return when they finish.
    Raises Ray Train's TrainingFailedError once more than --max-failures worker failures happened."""
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer

    compute = plan.compute
    with session(compute.ray_address, cpus=max(os.cpu_count() or 1, compute.workers)):
        trainer = TorchTrainer(
            _run_worker,
            train_loop_config={"plan": plan, "worker": worker},
            scaling_config=train.ScalingConfig(num_workers=compute.workers, use_gpu=compute.use_gpu),
            torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
            run_config=train.RunConfig(
                name=checkpoints.RAY_RUN,
                storage_path=str(checkpoints.root(plan.out).resolve()),
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
