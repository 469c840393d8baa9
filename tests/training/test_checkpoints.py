"""Nothing already trained is lost on a crash, and nothing in a checkpoint runs code (issue 11, items 13 and 14).

The crashes are real SIGKILLs: the training process kills itself from a Python audit hook at the exact
file-system call named (the commit of a checkpoint, the removal of the previous one), or the test kills it
while it writes its best model."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from training import checkpoints

from helpers import ROOT, cli_env, start_stepwise, stepwise
from training_helpers import esnli_train

pytestmark = pytest.mark.slow

# Runs `stepwise` and SIGKILLs the process when the KILL_AT-th file-system call of the KILL_ON kind happens:
# "commit": renaming a finished checkpoint folder (*.tmp) into place; "cleanup": removing an older checkpoint.
KILLING_CLI = """
import os, signal, sys
from pathlib import Path
seen = []
def hook(event, args):
    if event == "os.rename" and os.environ["KILL_ON"] == "commit":
        source = Path(os.fsdecode(args[0]))
        # a finished checkpoint folder about to get its name: <out>/checkpoint/.step-N.tmp (before the fix:
        # <out>/.checkpoint.tmp)
        folder = source.parent.name == "checkpoint" or source.name == ".checkpoint.tmp"
        hit = source.is_dir() and source.name.endswith(".tmp") and folder
    elif event == "shutil.rmtree" and os.environ["KILL_ON"] == "cleanup":
        removed = Path(os.fsdecode(args[0]))
        hit = removed.parent.name == "checkpoint" and removed.name.startswith("step-")
    else:
        return
    if hit:
        seen.append(args[0])
        if len(seen) == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from stepwise.cli import main
main(sys.argv[1:])
"""


def train_args(out: Path, rationales: Path) -> list[str]:
    return esnli_train(out, rationales, "--max-steps", "8", "--eval-every", "4")


def killed_run(out: Path, rationales: Path, kill_on: str, kill_at: int) -> None:
    process = subprocess.run(
        [sys.executable, "-c", KILLING_CLI, *train_args(out, rationales)],
        cwd=ROOT,
        env=cli_env(KILL_ON=kill_on, KILL_AT=str(kill_at)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == -9, (
        f"the run was not killed where asked:\n{process.stdout[-2000:]}\n{process.stderr[-2000:]}"
    )


@pytest.mark.parametrize("kill_on, kill_at, resumes_at", [("commit", 2, 4), ("cleanup", 1, 8)])
def test_a_kill_inside_the_checkpoint_swap_resumes_from_a_whole_checkpoint(
    tmp_path, esnli_rationales, kill_on, kill_at, resumes_at
):
    """Killed while the step-8 checkpoint is committed (before its rename), or after it while the step-4 one is
    removed: the rerun resumes from the newest whole one, never from step 0."""
    out = tmp_path / "run"
    killed_run(out, esnli_rationales, kill_on, kill_at)
    assert not (out / "metrics.json").exists()
    if kill_on == "commit":  # the uncommitted step-8 checkpoint: gone as soon as the rerun starts
        (staging,) = (out / "checkpoint").glob(".step-*.tmp")
        checkpoints.finish_interrupted_writes(out)
        assert not staging.exists() and (out / "checkpoint" / "step-00000004").is_dir()
    resumed = stepwise(*train_args(out, esnli_rationales))
    assert f"at step {resumes_at} " in resumed.stdout and "done: 8 steps" in resumed.stdout


CONTRACT = {
    "README.md",  # the model card
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "task.json",
    "train_config.json",
    "metrics.json",
    "log.csv",
}


def test_a_kill_while_the_best_model_is_written_leaves_no_partial_model(tmp_path, esnli_rationales):
    """SIGKILL while the first best model (a 'small' student, ~140 MB) is being written: the folder holds no
    partial model and no stray file, before or after the rerun that finishes the run."""
    out = tmp_path / "run"
    args = esnli_train(out, esnli_rationales, "--student", "small", "--data-fraction", "0.01", "--batch-size", "4",
                       "--max-steps", "2", "--eval-every", "1", "--eval-limit", "4",
                       "--max-input-tokens", "64")  # fmt: skip
    process = start_stepwise(*args)
    deadline = time.monotonic() + 300
    writing = []
    while not writing and process.poll() is None and time.monotonic() < deadline:
        # safetensors writes through a temporary file beside the target, then renames it
        writing = [p for p in out.rglob(".tmp*") if p.is_file() and p.stat().st_size > 2**20] if out.exists() else []
        time.sleep(0.002)
    process.kill()
    process.wait()
    assert writing, "the model write was not caught"
    model = out / "model.safetensors"
    if model.exists():  # a model here must be whole: every tensor readable
        with safe_open(model, "pt") as f:
            assert all(f.get_tensor(name).numel() for name in f.keys())
    stepwise(*args)
    with safe_open(model, "pt") as f:
        assert len(list(f.keys())) > 10
    assert {p.name for p in out.iterdir()} == CONTRACT


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_a_tampered_checkpoint_is_refused_not_executed(tmp_path, esnli_rationales):
    """A checkpoint whose pickled parts were replaced by a payload: resuming refuses it with a message naming
    it, and the payload never runs (torch.load with weights_only=False, or plain pickle, would run it)."""
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    args = [*train_args(out, esnli_rationales), "--max-steps", "40"]
    process = start_stepwise(*args)
    deadline = time.monotonic() + 300
    while (
        process.poll() is None and time.monotonic() < deadline
    ):  # a whole checkpoint (before the fix: checkpoint/state.pt)
        if list(out.glob("checkpoint/step-*/state.json")) or list(out.glob("checkpoint/state.pt")):
            break
        time.sleep(0.02)
    process.kill()
    process.wait()
    pickled = [p for p in (out / "checkpoint").rglob("*") if p.name in (".metadata", "state.pt")]
    assert pickled and not (out / "metrics.json").exists()
    for path in pickled:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    refused = stepwise(*args, check=False)
    assert not marker.exists()
    assert refused.returncode != 0 and "refusing" in refused.stderr and ".metadata" in refused.stderr, (
        refused.stdout[-3000:] + refused.stderr[-3000:]
    )
