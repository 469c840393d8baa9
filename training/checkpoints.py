"""The run folder while a run trains: periodic checkpoints and where to resume, the best model, the loss log.

    <out>/checkpoint/step-00000250/   a single process's checkpoint: DCP shards + state.json, written under a
                                      temporary name and renamed when whole; the previous one is removed only
                                      after that, so a kill at any moment leaves a whole checkpoint
    <out>/checkpoint/ray/step-.../    Ray Train's checkpoints of a run on workers (the same content; Ray's own
                                      snapshot lists the whole ones; it keeps the last two)
    <out>/.best.ready/                a committed best model whose files were not all moved into <out> yet
                                      (the move finishes on the next start)

A rerun resumes from the newest whole checkpoint of either kind, so a run started on one process can continue
on workers and back. The folder's top-level model is always the best on validation so far.

On a cluster whose nodes share no disk (`--out s3://...` with Ray Train workers) the run folder lives on the object
store: Ray Train keeps its checkpoints under <out>/checkpoint/ray there, every worker starts from a copy of the
folder in a temporary directory of its own (`pull_run`), and rank 0 uploads its log and each new best model before
each checkpoint (`push_run`), so the store never holds a checkpoint newer than the best model beside it. A worker
restarted on another node, or a driver rerun on another machine, finds everything there.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from stepwise import artifacts, storage
from stepwise.training import distributed
from stepwise.training.distributed import World

STATE = "state.json"  # the counters beside the DCP shards
RAY_RUN = "ray"  # Ray Train's run name: its checkpoints live in <out>/checkpoint/ray
LOG_COLUMNS = ["step", "elapsed_s", "lr", "loss", "label_loss", "rationale_loss", "valid_accuracy"]


@dataclass
class Progress:
    """Where a run stands: what a checkpoint stores beside the weights and optimizer moments."""

    step: int = 0
    elapsed_s: float = 0.0  # training time of every session so far, validation included
    best_accuracy: float = -1.0
    best_step: int = 0
    validated_step: int = -1  # the step of the last validation (and checkpoint)


def root(out: Path) -> Path:
    return Path(out) / artifacts.CHECKPOINT


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def read_progress(folder: Path) -> Progress:
    return Progress(**artifacts.read_json(Path(folder) / STATE, "a training checkpoint's counters"))


@dataclass(frozen=True)
class ResumePoint:
    """A whole checkpoint to resume from: a committed local folder, or one Ray Train recorded (on local disk or
    the object store, read through its own filesystem)."""

    progress: Progress
    where: str  # for the log
    ray_checkpoint: Any = None  # a ray.train.Checkpoint; None: `where` is a local committed folder


def ray_storage(out: Path, store: str | None) -> str:
    """Ray Train's `storage_path`: <out>/checkpoint, or <store>/checkpoint when the run folder lives on an object
    store (a run on a cluster whose nodes share no disk)."""
    return str(storage.join(store, artifacts.CHECKPOINT)) if store else str(root(out).resolve())


def _ray_point(checkpoint: Any) -> ResumePoint:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE}") as state:
        progress = Progress(**json.loads(state.read()))
    return ResumePoint(progress, checkpoint.path, checkpoint)


def resume_point(out: Path, store: str | None = None, on_ray: bool = False) -> ResumePoint | None:
    """The newest whole checkpoint of the run in `out` (and `store`): a single process's committed ones, or the
    latest one Ray Train recorded (checkpoints whose upload a kill cut short are not in Ray's record). In a Ray Train
    worker, Ray's own `get_checkpoint` (what it restores after a worker failure) is one more candidate: the highest
    step among them all wins, so a run moved between single-process and Ray resumes from its newest state."""
    # A committed folder is whole; one without its counters is an older one a kill left half removed.
    candidates = [ResumePoint(read_progress(p), str(p)) for p in root(out).glob("step-*") if (p / STATE).exists()]
    if on_ray:
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is not None:
            candidates.append(_ray_point(latest))
    record = storage.join(ray_storage(out, store), RAY_RUN)
    if storage.exists(record):
        from ray.train import Result

        try:
            latest = Result.from_path(str(record)).checkpoint
        except RuntimeError:  # Ray had not recorded a checkpoint yet
            latest = None
        if latest is not None:
            candidates.append(_ray_point(latest))
    return max(candidates, key=lambda point: point.progress.step, default=None)


def restore(point: ResumePoint, model: nn.Module, optimizer: Optimizer) -> Progress:
    if point.ray_checkpoint is None:
        distributed.load_state(Path(point.where), model, optimizer)
    else:  # the folder itself on local disk; a temporary download of it from an object store
        with point.ray_checkpoint.as_directory() as folder:
            distributed.load_state(Path(folder), model, optimizer)
    return point.progress


def save(out: Path, model: nn.Module, optimizer: Optimizer, progress: Progress, world: World, on_ray: bool) -> None:
    """A checkpoint of `progress`: through Ray Train's checkpointing on workers, else committed into <out>.
    Every rank must call it."""
    name = step_name(progress.step)
    if on_ray:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="stepwise-checkpoint-") as local:
            distributed.save_state(Path(local), model, optimizer)
            if world.main:
                artifacts.write_json(Path(local) / STATE, asdict(progress))
            ray.train.report(
                {"step": progress.step, "best_valid_accuracy": progress.best_accuracy},
                checkpoint=ray.train.Checkpoint.from_directory(local),
                checkpoint_dir_name=name,
            )
        return
    staging = root(out) / f".{name}.tmp"
    if world.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier(world)
    distributed.save_state(staging, model, optimizer)
    distributed.barrier(world)
    if world.main:
        artifacts.write_json(staging / STATE, asdict(progress))
        artifacts.commit_folder(staging, root(out) / name)
        for older in root(out).glob("step-*"):  # only once the new one is whole
            if older.name != name:
                shutil.rmtree(older)
    distributed.barrier(world)


def save_best(out: Path, model: nn.Module, world: World) -> list[str]:
    """The current weights become the folder's model: written whole into a temporary folder, fsynced, committed
    by a rename, then moved in file by file (`finish_interrupted_writes` completes an interrupted move). A kill never
    leaves a truncated model.safetensors. Every rank must call it (FSDP gathers the weights); rank 0 gets the names
    of the files written."""
    weights = distributed.full_weights(model, world)
    names = []
    if world.main:
        staging, ready = Path(out) / ".best.tmp", Path(out) / ".best.ready"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, state_dict=weights)
        names = storage.list_files(staging)
        artifacts.commit_folder(staging, ready)
        artifacts.move_files_into(ready, out)
    distributed.barrier(world)
    return names


def remove_all(out: Path, store: str | None) -> None:
    """Drop every checkpoint of the run: in `out`, and under `store` where Ray Train kept them there."""
    shutil.rmtree(root(out), ignore_errors=True)
    if store:
        storage.delete_prefix(str(storage.join(store, artifacts.CHECKPOINT)))


def _run_files(names: list[str]) -> list[str]:
    """The run folder's own files among `names`: not its checkpoints, not hidden ones (the lock, staging folders
    and temporary files)."""
    return [n for n in names if not n.startswith((f"{artifacts.CHECKPOINT}/", ".")) and "/." not in n]


def pull_run(store: str, out: Path) -> None:
    """Make local `out` the run folder as the object store holds it (checkpoints aside, which Ray Train reads from
    the store itself): what a node starting or resuming a run on workers reads. Local files the store lacks are
    removed; the lock this process holds stays."""
    names = _run_files(storage.list_files(store))
    Path(out).mkdir(parents=True, exist_ok=True)
    for stale in set(_run_files(storage.list_files(out))) - set(names):
        (Path(out) / stale).unlink()
    storage.download_files(store, out, names)


def push_run(out: Path, store: str, names: list[str] | None = None) -> None:
    """Upload files of the local run folder to the store: `names`, or all of them."""
    storage.upload_files(out, _run_files(storage.list_files(out)) if names is None else names, store)


def finish_interrupted_writes(out: Path) -> None:
    """Complete a best-model save a kill interrupted and drop checkpoints it cut short (rank 0, at start)."""
    shutil.rmtree(Path(out) / ".best.tmp", ignore_errors=True)  # never committed: the previous best stands
    for staging in root(out).glob(".step-*.tmp"):  # never committed: a model and optimizer's worth of disk each
        shutil.rmtree(staging, ignore_errors=True)
    if (Path(out) / ".best.ready").is_dir():
        artifacts.move_files_into(Path(out) / ".best.ready", out)


def restart_log(out: Path, upto_step: int) -> None:
    """Keep the log rows up to the resumed checkpoint's step (rows written after it are trained again)."""
    path = Path(out) / artifacts.TRAIN_LOG
    rows = []
    if path.exists():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]
    text = io.StringIO()
    writer = csv.DictWriter(text, LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_atomic(path, text.getvalue())


def append_log(out: Path, row: dict) -> None:
    with (Path(out) / artifacts.TRAIN_LOG).open("a", newline="") as f:
        csv.DictWriter(f, LOG_COLUMNS).writerow(row)
