"""A checkpoint's DCP metadata is read by an exact allowlist, and what was checked is what DCP loads (issue 19,
item 1): a crafted `.metadata` naming a dotted global through an allowed module never runs."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
from torch import nn

from stepwise.training import distributed


def short_unicode(text: str) -> bytes:
    return b"\x8c" + bytes([len(text.encode())]) + text.encode()


def crafted_metadata(module: str, name: str, argument: str) -> bytes:
    """Protocol-4 pickle of `module.name(argument)` (STACK_GLOBAL, TUPLE1, REDUCE): the call a loader makes."""
    return b"\x80\x04" + short_unicode(module) + short_unicode(name) + b"\x93" + short_unicode(argument) + b"\x85R."


@pytest.mark.parametrize(
    "module, name",
    [
        ("torch.distributed.checkpoint.metadata", "os.mkdir"),  # passed the old prefix rule: the module imports os
        ("torch.distributed.checkpoint.filesystem", "os.mkdir"),
        ("torch", "serialization.os.mkdir"),
        ("pathlib", "os.mkdir"),
        ("os", "mkdir"),
    ],
)
def test_crafted_metadata_is_refused_and_never_runs(tmp_path, module, name):
    assert hasattr(importlib.import_module(module), name.split(".")[0])  # the walk the unpickler would take
    checkpoint, marker = tmp_path / "step-1", tmp_path / "payload-ran"
    checkpoint.mkdir()
    (checkpoint / distributed.DCP_METADATA).write_bytes(crafted_metadata(module, name, str(marker)))
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"refusing \.metadata: .* is not part of a checkpoint's metadata"):
        distributed.load_state(checkpoint, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


def test_a_real_checkpoint_round_trips_through_the_checked_reader(tmp_path):
    """Every global DCP writes for a model and AdamW (float32 and the int64 step, bf16 weights) is allowed."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW(model.parameters())
    model[2](model[:2](torch.randn(2, 3)).bfloat16()).float().sum().backward()
    optimizer.step()
    distributed.save_state(tmp_path, model, optimizer)

    restored = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, dtype=torch.bfloat16))
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    distributed.load_state(tmp_path, restored, restored_optimizer)
    for saved, loaded in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(saved, loaded)
    moments = [state["exp_avg"] for state in restored_optimizer.state.values()]
    assert moments and all(m.abs().sum() > 0 for m in moments)


def test_plain_pickle_of_other_objects_is_refused(tmp_path):
    (tmp_path / distributed.DCP_METADATA).write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="holds a dict, not DCP metadata"):
        distributed.read_checked_metadata(tmp_path)
