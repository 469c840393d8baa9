"""What changes with the number of training processes: this process's place in the group, how the student is
wrapped (DDP, or FSDP2's `fully_shard` with bf16 compute on a GPU), the few collectives the training loop needs,
and the training state on disk (PyTorch Distributed Checkpoint: every rank writes its own shard, and a run
resumes on any number of workers).

With no process group (the default single process) every helper falls back to plain single-process behaviour,
so the training loop is one code path for 1 process, N Ray Train workers, or a torchrun-style group.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

Strategy = Literal["ddp", "fsdp"]
DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 writes the run folder)."""

    rank: int
    size: int
    device: torch.device
    strategy: Literal["single", "ddp", "fsdp"]

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_strategy(strategy: Strategy, group_coming: bool) -> None:
    """FSDP shards over a process group: Ray Train makes one (`group_coming`), or the caller already did."""
    if strategy == "fsdp" and not group_coming and not dist.is_initialized():
        raise ValueError(
            "--strategy fsdp shards the student over a process group: run with --workers N (Ray Train) or --ray-address"
        )


def join(strategy: Strategy, device: torch.device) -> World:
    """The world of an initialized process group (Ray Train's, or one a launcher made), else a world of one."""
    check_strategy(strategy, group_coming=False)
    if not dist.is_initialized():
        return World(0, 1, device, "single")
    return World(dist.get_rank(), dist.get_world_size(), device, strategy)


def empty_on_meta(world: World) -> bool:
    """Under FSDP only rank 0 materialises the initial weights (on the CPU); the others build the student on the
    meta device and receive their shards from rank 0, so no rank but one ever holds the whole model."""
    return world.strategy == "fsdp" and not world.main


def wrap(model: nn.Module, world: World, bf16: bool) -> nn.Module:
    """The module the training step calls: `model` itself (single process; FSDP shards it in place) or its DDP
    wrapper. Parameters, optimizer and checkpoints always go through `model`."""
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute and all-gathers, fp32 gradient reduction and fp32 master weights (the optimizer's).
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16 and world.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        initial = model.state_dict() if world.main else {}  # rank 0's full weights, kept for the broadcast below
        for stack in (model.encoder, model.decoder):
            for block in stack.block:  # one unit per T5 block: only a block or two is ever gathered at once
                fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norms, lm_head
        model.to_empty(device=world.device)
        load_full_weights(model, initial, world)
        return model
    model.to(world.device)
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Gradients live in the all-reduce buckets themselves: no second copy of them.
        return DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    return model


@contextlib.contextmanager
def gradient_sync(forward: nn.Module, world: World, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if world.strategy == "ddp" and not enabled:
        with forward.no_sync():
            yield
        return
    if world.strategy == "fsdp":
        forward.set_requires_gradient_sync(enabled)
    yield


@contextlib.contextmanager
def generation_ready(model: nn.Module, world: World) -> Iterator[bool]:
    """`generate` calls the encoder and embeddings outside the root module's forward, where FSDP would leave
    them sharded: gather the root's own parameters for the duration (the blocks gather themselves). Yields
    whether ranks must keep stepping together (HF's `synced_gpus`)."""
    if world.strategy != "fsdp":
        yield False
        return
    model.unshard()
    try:
        yield True
    finally:
        model.reshard()


# ---------------------------------------------------------------- collectives (no-ops in a world of one)


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_rank0(value: float, world: World) -> float:
    """Rank 0's value on every rank (a decision that must not differ between ranks, e.g. the time budget)."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


# ---------------------------------------------------------------- weights


def own_names(model: nn.Module) -> set[str]:
    """The names of the model's parameters and buffers, a tied parameter under its first name only (T5's shared
    embedding, which `state_dict()` also lists as encoder/decoder.embed_tokens.weight)."""
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}


def full_weights(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (an FSDP all-gather; every rank must call it); {} elsewhere."""
    if world.strategy == "fsdp":
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = model.state_dict() if world.main else {}
    names = own_names(model)
    return {name: value for name, value in weights.items() if name in names} if world.main else {}


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor], world: World) -> None:
    """Rank 0's full `weights` (a `state_dict()` of the same class) into every rank's model; each FSDP rank
    keeps only its shard. A tied parameter (T5's shared embedding, which `state_dict()` lists under each module
    holding it) goes under its first name only, as the broadcast and FSDP's resharding expect."""
    names = own_names(model)
    if world.main:
        missing = sorted(names - weights.keys())
        if missing:
            raise ValueError(
                f"the weights to load lack {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                "not this student's"
            )
        weights = {name: value for name, value in weights.items() if name in names}
    # Not strict: every name was checked above, and the tied names dropped on purpose.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.size > 1, strict=False)
    set_model_state_dict(model, weights if world.main else {}, options=options)


# ---------------------------------------------------------------- the training state on disk


def save_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and AdamW moments into `folder` with DCP: each rank writes its own shard (rank 0 adds the
    metadata). Only tensors are stored: DCP would unpickle anything else on load. Every rank must call it."""
    weights, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optimizer_state["state"]}, checkpoint_id=str(folder))


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The state `save_state` wrote, resharded onto this world (any number of ranks, any strategy)."""
    reader = _CheckedReader(folder)
    weights, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill (shapes, shards)
    state = {"model": weights, "optimizer": optimizer_state["state"]}
    dcp.load(state, storage_reader=reader)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={"state": state["optimizer"], "param_groups": optimizer_state["param_groups"]},
    )


# Every global a DCP metadata file names, as exact (module, name) pairs: pickle would otherwise walk a dotted
# name from any allowed module (`torch.distributed.checkpoint.metadata` + `os.system`), and each allowed global
# is called with arguments from the file, so each must be a plain constructor.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch layout lookup
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)  # torch.float32 etc.: values, not callables


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch sizes, dtypes and layouts, paths: nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and name.isidentifier() and isinstance(torch.__dict__.get(name), _TORCH_CONSTANTS)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class _CheckedReader(dcp.FileSystemReader):
    """DCP's file reader, with the metadata read once by `read_checked_metadata` (DCP's own reader unpickles it
    with plain pickle): what was checked is what is loaded."""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self._metadata = read_checked_metadata(Path(folder))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def read_checked_metadata(folder: Path) -> Any:
    """DCP reads its metadata with plain pickle and non-tensor entries with torch.load(weights_only=False);
    refuse a checkpoint whose metadata names anything but DCP's own classes, or holds non-tensor entries
    (tensors themselves load with weights_only=True)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    path = Path(folder) / DCP_METADATA
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no {DCP_METADATA}: not a complete checkpoint")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError, KeyError) as problem:
        raise ValueError(f"checkpoint {folder}: refusing {path.name}: {problem}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"checkpoint {folder}: {path.name} holds a {type(metadata).__name__}, not DCP metadata")
    untensored = [key for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)]
    if untensored:
        raise ValueError(f"checkpoint {folder}: refusing non-tensor entries {untensored[:3]} (they would be unpickled)")
    return metadata
