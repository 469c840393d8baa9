"""The vllm backend through the real CPU engine on a tiny local model, and kill -9 + resume of a real run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from stepwise import artifacts, cli, tasks
from stepwise.extraction import read_records, teachers

pytestmark = pytest.mark.slow


def test_vllm_extracts_64_inputs(tiny_teacher, tmp_path):
    # sampled, so prefill chunking meets random generators (a vLLM CPU crash with per-request seeds)
    out = tmp_path / "out"
    cli.main(
        [
            "extract",
            "--task",
            "cqa",
            "--split",
            "train",
            "--teacher",
            "vllm",
            "--model",
            str(tiny_teacher),
            "--limit",
            "64",
            "--chunk-size",
            "16",
            "--max-tokens",
            "32",
            "--temperature",
            "0.7",
            "--enforce-eager",
            "--out",
            str(out),
        ]
    )
    records = read_records(out)
    wanted = [e.id for e in tasks.load_split(tasks.get_task("cqa"), "train")[:64]]
    assert sorted(r["id"] for r in records) == sorted(wanted) and len(artifacts.shard_paths(out)) == 4
    for record in records:
        assert len(record["completions"]) == 1 and record["status"] in ("ok", "malformed")
        assert record["tokens_in"] > 100 and 0 < record["tokens_out"] <= 32
        assert record["teacher"]["model"] == str(tiny_teacher) and record["teacher"]["sampling"]["max_tokens"] == 32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["tokens_out"] == sum(r["tokens_out"] for r in records)
    assert sum(manifest["counts"]["failure_reasons"].values()) == sum(r["status"] != "ok" for r in records)


def test_prompts_longer_than_the_context_become_error_records(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    cli.main(
        [
            "extract",
            "--task",
            "cqa",
            "--split",
            "valid",
            "--teacher",
            "vllm",
            "--model",
            str(tiny_teacher),
            "--limit",
            "5",
            "--max-model-len",
            "512",
            "--max-tokens",
            "16",
            "--enforce-eager",
            "--out",
            str(out),
        ]
    )
    records = read_records(out)
    assert len(records) == 5 and {r["status"] for r in records} == {"error"}
    assert all(r["reason"].startswith("prompt too long") and "max_model_len 512" in r["reason"] for r in records)


def kill_after_new_shards(command: list[str], env: dict, out: Path, new: int) -> int:
    """Start a real `stepwise extract`, SIGKILL it once `new` more shards exist; return the shard count then."""
    before = len(artifacts.shard_paths(out)) if out.exists() else 0
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(artifacts.shard_paths(out)) < before + new and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: raise --limit"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(artifacts.shard_paths(out))


def test_kill_9_then_rerun_gives_exactly_one_record_per_input(tiny_teacher, tmp_path, child_env):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "stepwise",
        "extract",
        "--task",
        "svamp",
        "--split",
        "train",
        "--teacher",
        "vllm",
        "--model",
        str(tiny_teacher),
        "--limit",
        "160",
        "--chunk-size",
        "4",
        "--max-tokens",
        "48",
        "--enforce-eager",
        "--out",
        str(out),
    ]
    first = kill_after_new_shards(command, child_env, out, 2)
    second = kill_after_new_shards(command, child_env, out, 2)
    assert 2 <= first < second < 40
    finished = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resuming: {4 * second} of 160" in finished.stdout
    records = read_records(out)
    counts = Counter(r["id"] for r in records)
    wanted = {e.id for e in tasks.load_split(tasks.get_task("svamp"), "train")[:160]}
    assert set(counts) == wanted and set(counts.values()) == {1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["records"] == 160 and manifest["shards"] == 40
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("task_name", ["esnli", "cqa"])
def test_self_consistency_with_structured_output(tiny_teacher, tmp_path, task_name):
    out = tmp_path / "out"
    cli.main(
        [
            "extract",
            "--task",
            task_name,
            "--split",
            "valid",
            "--teacher",
            "vllm",
            "--model",
            str(tiny_teacher),
            "--limit",
            "6",
            "--n",
            "3",
            "--temperature",
            "1.0",
            "--structured",
            "--max-tokens",
            "320",
            "--enforce-eager",
            "--out",
            str(out),
        ]
    )
    task = tasks.get_task(task_name)
    records = read_records(out)
    assert len(records) == 6
    for record in records:
        assert len(record["completions"]) == 3
        # every sample has the shape the regex allows (the engine honoured it): one rationale line, then an answer
        # the parser accepts, so even a random model gives a parseable answer. (The 300-character bound is not checked
        # on the text: a random model's invalid UTF-8 bytes decode to more replacement characters than it counted.)
        example = tasks.Example(record["id"], record["input"], record["label"], record["choices"])
        shape = teachers.answer_regex(task, example, max_rationale_chars=1200)
        assert all(re.fullmatch(shape, c) for c in record["completions"]), record["completions"]
        assert record["status"] == "ok" and sum(record["votes"].values()) == 3, record["reason"]
        assert max(record["votes"].values()) == record["votes"][tasks.normalize(record["teacher_label"])]
