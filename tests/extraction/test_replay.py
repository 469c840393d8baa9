"""The replay teacher (shipped PaLM completions) through the real parser, writer, resume and config check."""

from __future__ import annotations

import json
import re

import pytest

from stepwise import artifacts, cli, tasks
from stepwise.extraction import read_records


def extract(*args: str) -> None:
    cli.main(["extract", *args])


@pytest.mark.parametrize("task_name", ["svamp", "cqa", "esnli"])
def test_replay_writes_the_whole_parsed_split(tmp_path, task_name):
    out = tmp_path / "out"
    extract("--task", task_name, "--split", "train", "--teacher", "replay", "--out", str(out))
    task = tasks.get_task(task_name)
    examples = {e.id: e for e in tasks.load_split(task, "train")}
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(examples)
    for record in records:
        example = examples[record["id"]]
        parsed = tasks.parse_completion(task, example.teacher_completion, example.choices)
        assert (record["status"], record["teacher_label"], record["rationale"], record["reason"]) == (
            parsed.status,
            parsed.label,
            parsed.rationale,
            parsed.reason,
        )
        assert (
            record["input"] == example.input
            and record["label"] == example.label
            and record["completions"] == [example.teacher_completion]
        )
        assert record["correct"] == (parsed.status == "ok" and tasks.is_correct(task, parsed.label, example.label))
        assert record["teacher"]["backend"] == "replay" and len(record["teacher"]["prompt_hash"]) == 16
    assert tasks.load_task(out) == task
    manifest = json.loads((out / "manifest.json").read_text())
    ok = sum(r["status"] == "ok" for r in records)
    assert manifest["complete"] and manifest["counts"]["records"] == len(examples) and manifest["counts"]["ok"] == ok
    assert manifest["counts"]["parse_rate"] == pytest.approx(ok / len(examples))
    assert sum(manifest["counts"]["failure_reasons"].values()) == len(examples) - ok


def test_resume_regenerates_only_what_is_missing(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--task", "cqa", "--split", "valid", "--limit", "100", "--chunk-size", "7", "--out", str(out)]
    extract(*args)
    before = {r["id"]: r for r in read_records(out)}
    lost = artifacts.shard_paths(out)[3]  # as if the run had died before writing this chunk
    lost_ids = {json.loads(line)["id"] for line in lost.read_text().splitlines()}
    lost.unlink()
    (out / ".shard-deadbeef.jsonl.123.tmp").write_text('{"id": "half a line')  # a write cut short by kill -9
    capsys.readouterr()
    extract(*args)
    assert f"resuming: {100 - len(lost_ids)} of 100" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"]["records_this_run"] == len(lost_ids)
    after = read_records(out)
    assert sorted(r["id"] for r in after) == sorted(before)
    assert not list(out.glob(".*.tmp"))


def test_other_config_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    extract("--task", "esnli", "--split", "valid", "--limit", "20", "--out", str(out))
    with pytest.raises(SystemExit, match="differs in: split.*--overwrite"):
        extract("--task", "esnli", "--split", "test", "--limit", "20", "--out", str(out))
    assert len(read_records(out)) == 20  # nothing already done is lost
    extract("--task", "esnli", "--split", "test", "--limit", "20", "--out", str(out), "--overwrite")
    test_ids = {e.id for e in tasks.load_split(tasks.get_task("esnli"), "test")[:20]}
    assert {r["id"] for r in read_records(out)} == test_ids


def test_overwrite_replaces_shards_that_have_no_manifest_never_resumes_them(tmp_path):
    out = tmp_path / "out"
    extract("--task", "esnli", "--split", "valid", "--limit", "5", "--out", str(out))
    (out / "manifest.json").unlink()  # shards of no known config: whatever made them, they are not this run's
    with pytest.raises(SystemExit, match="holds no manifest.json"):
        extract("--task", "esnli", "--split", "test", "--limit", "5", "--out", str(out))
    extract("--task", "esnli", "--split", "test", "--limit", "5", "--out", str(out), "--overwrite")
    test_ids = {e.id for e in tasks.load_split(tasks.get_task("esnli"), "test")[:5]}
    assert {r["id"] for r in read_records(out)} == test_ids
    assert json.loads((out / "manifest.json").read_text())["last_run"]["records_this_run"] == 5


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not ours")
    with pytest.raises(SystemExit, match="not empty"):
        extract("--task", "svamp", "--limit", "5", "--out", str(tmp_path))


def test_reader_names_a_missing_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="stepwise extract"):
        read_records(tmp_path)


def test_parquet_shards_hold_the_same_records_and_resume_across_formats(tmp_path):
    args = ["--task", "cqa", "--split", "valid", "--chunk-size", "16"]
    extract(*args, "--limit", "40", "--out", str(tmp_path / "jsonl"))
    extract(*args, "--limit", "20", "--shard-format", "parquet", "--out", str(tmp_path / "mixed"))
    extract(*args, "--limit", "40", "--out", str(tmp_path / "mixed"))  # continues in JSONL
    assert {p.suffix for p in artifacts.shard_paths(tmp_path / "mixed")} == {".parquet", ".jsonl"}
    mixed, plain = (sorted(read_records(tmp_path / name), key=lambda r: r["id"]) for name in ("mixed", "jsonl"))
    assert mixed == plain


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--teacher", "vllm", "--model", "m", "--n", "3"],
            "--n 3 with --temperature 0 draws the same greedy completion",
        ),
        (["--teacher", "openai", "--model", "m", "--base-url", "localhost:8000"], "--base-url must start with http://"),
        (["--structured"], "--structured constrains the vllm engine's output; pass --teacher vllm"),
        (["--on-ray"], "--on-ray runs the vllm teacher"),
        (["--teacher", "vllm", "--model", "m", "--on-ray", "--ray-actors", "0"], "--ray-actors must be 1 or more"),
        (["--teacher", "vllm"], "--teacher vllm needs --model"),
        (["--split", "test", "--labels", "a", "b"], "--labels is for custom tasks"),
    ],
)
def test_option_groups_check_their_flags_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        extract("--task", "svamp", "--out", str(tmp_path / "out"), *flags)
    assert not (tmp_path / "out").exists()
