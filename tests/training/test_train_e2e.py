"""End to end: the real `stepwise train` on a tiny student from scratch; the saved folder reloads with plain
from_pretrained and predicts what metrics.json says; a rerun reuses the finished run; a killed run resumes
from its checkpoint and logs what an uninterrupted run logs."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, T5ForConditionalGeneration

from stepwise import artifacts, tasks
from stepwise.training.train import evaluation_subset, predict

from helpers import start_stepwise, stepwise
from training_helpers import esnli_train

pytestmark = pytest.mark.slow


def train_args(out: Path, rationales: Path, *extra: str) -> list[str]:
    return esnli_train(out, rationales, "--max-steps", "6", "--eval-every", "3", "--eval-limit", "24",
                       "--max-input-tokens", "128", "--max-target-tokens", "64", *extra)  # fmt: skip


def log_rows(out: Path) -> list[dict]:
    with (out / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_train_saves_a_folder_that_reloads_and_predicts(tmp_path, esnli_rationales):
    out = tmp_path / "student"
    result = stepwise(*train_args(out, esnli_rationales))
    assert "done: 6 steps" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["mode"] == "step-by-step" and metrics["best_step"] in (3, 6)
    assert metrics["valid"]["examples"] == 24 and metrics["test"]["examples"] == 24
    assert metrics["train_examples"]["used"] == metrics["train_examples"]["selected"] - metrics["train_examples"].get(
        "skipped_not_ok", 0
    )
    config = json.loads((out / "train_config.json").read_text())
    assert (
        config["mode"] == "step-by-step"
        and config["alpha"] == 0.5
        and config["max_steps"] == 6
        and "workers" not in config
    )
    losses = [r for r in log_rows(out) if r["loss"]]
    assert [int(r["step"]) for r in losses] == [6]  # log_every 10: the row the end of the budget writes
    assert all(float(r["label_loss"]) > 0 and float(r["rationale_loss"]) > 0 for r in losses)
    assert not (out / "checkpoint").exists() and not list(out.glob(".best*"))

    # The contract export and serving rely on: plain from_pretrained + task.json, nothing else; the folder's model
    # is the one metrics.json scored (the same test subset, the same greedy label-only decoding).
    model = T5ForConditionalGeneration.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    task = tasks.load_task(out)
    test = evaluation_subset(tasks.load_split(task, "test"), 24)
    predictions = predict(
        model, tokenizer, test, max_input_tokens=128, max_new_tokens=model.generation_config.max_new_tokens
    )
    assert tasks.accuracy(task, predictions, [e.label for e in test]) == metrics["test"]["accuracy"]
    assert set(predictions) - {""}  # it generates text, not nothing

    # Same options again: the finished run is reused, not retrained.
    modified = (out / "model.safetensors").stat().st_mtime_ns
    assert "reusing it" in stepwise(*train_args(out, esnli_rationales)).stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == modified
    # Other options into the same folder: refused, naming what differs. Where it trains is not an option of the run.
    refused = stepwise(*train_args(out, esnli_rationales, "--alpha", "0.7"), check=False)
    assert refused.returncode != 0 and "alpha" in refused.stderr and "--overwrite" in refused.stderr
    assert "reusing it" in stepwise(*train_args(out, esnli_rationales, "--workers", "2", "--strategy", "fsdp")).stdout
    # The run's own train_config.json, as --config, asks for this run again.
    assert "reusing it" in stepwise("train", "--config", str(out / "train_config.json"), "--out", str(out)).stdout

    # A folder an earlier stepwise trained (its settings say max_input_length/max_target_length) is still this run,
    # as its own file and as a --config; the old flags work, with a warning; the file is rewritten in today's names.
    old_name = {new: old for old, new in artifacts.RENAMED_SETTINGS.items()}
    old_names = {old_name.get(key, key): value for key, value in config.items()}
    assert {"max_input_length", "max_target_length"} <= set(old_names) and "max_input_tokens" not in old_names
    earlier = tmp_path / "earlier-config.json"
    earlier.write_text(json.dumps(old_names))
    (out / "train_config.json").write_text(json.dumps(old_names))
    again = stepwise("train", "--config", str(earlier), "--out", str(out))
    assert "reusing it" in again.stdout and "max_input_length is deprecated" in again.stderr
    assert json.loads((out / "train_config.json").read_text()) == config
    renamed = [{"--max-input-tokens": "--max-input-length", "--max-target-tokens": "--max-target-length"}.get(a, a)
               for a in train_args(out, esnli_rationales)]  # fmt: skip
    assert "--max-input-length" in renamed and "reusing it" in stepwise(*renamed).stdout


def test_standard_finetune_needs_no_rationales(tmp_path):
    out = tmp_path / "finetune"
    stepwise(
        "train",
        "--task",
        "esnli",
        "--mode",
        "standard-finetune",
        "--student",
        "tiny",
        "--out",
        str(out),
        "--data-fraction",
        "0.02",
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--eval-every",
        "2",
        "--eval-limit",
        "8",
        "--max-input-tokens",
        "96",
    )
    assert json.loads((out / "metrics.json").read_text())["label_source"] == "gold"
    rows = log_rows(out)
    assert rows and all(not r["rationale_loss"] for r in rows) and any(r["label_loss"] for r in rows)


def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, esnli_rationales):
    args = ["--max-steps", "24", "--eval-every", "4", "--log-every", "4"]
    straight = tmp_path / "straight"
    stepwise(*train_args(straight, esnli_rationales, *args))

    interrupted = tmp_path / "interrupted"
    process = start_stepwise(*train_args(interrupted, esnli_rationales, *args))
    deadline = time.monotonic() + 240
    while (
        not list((interrupted / "checkpoint").glob("step-*/state.json"))
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = stepwise(*train_args(interrupted, esnli_rationales, *args))
    assert "resuming" in resumed.stdout and "done: 24 steps" in resumed.stdout
    straight_log, resumed_log = log_rows(straight), log_rows(interrupted)
    assert [r["step"] for r in resumed_log] == [r["step"] for r in straight_log]  # no step logged twice or lost
    for a, b in zip(straight_log, resumed_log, strict=True):  # the same batches and optimizer state: the same losses
        for column in ("loss", "label_loss", "rationale_loss", "valid_accuracy"):
            assert (a[column] == b[column]) or float(a[column]) == pytest.approx(float(b[column]), rel=1e-3, abs=1e-4)
    assert (
        json.loads((interrupted / "metrics.json").read_text())["test"]
        == json.loads((straight / "metrics.json").read_text())["test"]
    )
