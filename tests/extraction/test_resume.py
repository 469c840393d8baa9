"""What a rerun does with what it finds (issue 11): error records are retried, a folder being written refuses a
second run, and a record whose input changed is done again. Each time an id stays in exactly one shard."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from stepwise import artifacts, cli, tasks
from stepwise.extraction import read_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def extract(*args: str) -> None:
    cli.main(["extract", *args])


def one_record_per_id(out) -> Counter:
    counts = Counter(r["id"] for r in read_records(out))
    assert set(counts.values()) == {1}, [i for i, n in counts.items() if n > 1]
    return counts


def test_error_records_are_retried_and_complete_means_none_remain(tmp_path, custom_nli_rows, capsys):
    test_ids = [r["id"] for r in custom_nli_rows if r["split"] == "test"]
    lacking = set(test_ids[3:5])
    path = write_jsonl(
        tmp_path / "nli.jsonl", [dict(r, completion=None) if r["id"] in lacking else r for r in custom_nli_rows]
    )
    out = tmp_path / "out"
    args = ["--task", str(path), "--split", "test", "--chunk-size", "8", "--out", str(out)]
    extract(*args)
    manifest = artifacts.read_manifest(out)
    assert manifest["counts"]["error"] == 2 and manifest["counts"]["records"] == 60 and not manifest["complete"]
    assert "2 error records remain: rerun the same command to retry them" in capsys.readouterr().out

    write_jsonl(path, custom_nli_rows)  # the completions are there now
    extract(*args, "--no-retry-errors")
    assert artifacts.read_manifest(out)["counts"]["error"] == 2 and not artifacts.read_manifest(out)["complete"]

    capsys.readouterr()
    extract(*args)
    assert "resuming: 58 of 60 records already in" in capsys.readouterr().out
    manifest = artifacts.read_manifest(out)
    assert manifest["complete"] and manifest["counts"]["error"] == 0 and manifest["last_run"]["records_this_run"] == 2
    assert set(one_record_per_id(out)) == set(test_ids)
    assert {r["id"]: r["status"] for r in read_records(out) if r["id"] in lacking} == {i: "ok" for i in lacking}


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, child_env):
    out = tmp_path / "out"
    args = ["extract", "--task", "cqa", "--split", "train", "--limit", "3000", "--chunk-size", "1", "--out", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-m", "stepwise", *args],
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while len(artifacts.shard_paths(out)) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, f"the first run ended before the second could start: {first.stderr.read()[-2000:]}"
        with pytest.raises(
            SystemExit, match=rf"{out} is being written by another `stepwise extract` \(pid {first.pid}\); wait for it"
        ):
            cli.main(args)
        assert first.poll() is None, "the refused run must not disturb the first"
    finally:
        first.kill()  # kill -9: the lock goes with its process
        first.wait()
    cli.main([*args, "--chunk-size", "500"])  # the same job (the chunk size is not part of it) finishes
    assert len(one_record_per_id(out)) == 3000 and artifacts.read_manifest(out)["complete"]


def test_a_record_whose_input_changed_is_done_again(tmp_path, custom_nli_rows, capsys):
    path = write_jsonl(tmp_path / "nli.jsonl", custom_nli_rows)
    out = tmp_path / "out"
    args = ["--task", str(path), "--split", "test", "--chunk-size", "16", "--out", str(out)]
    extract(*args)
    edited_id = next(r["id"] for r in custom_nli_rows if r["split"] == "test")
    edited = [dict(r, input=r["input"] + " (edited)") if r["id"] == edited_id else r for r in custom_nli_rows]
    write_jsonl(path, edited)
    capsys.readouterr()
    extract(*args)
    printed = capsys.readouterr().out
    assert "resuming: 59 of 60 records already in" in printed and "1 to go (1 input changed)" in printed
    record = next(r for r in read_records(out) if r["id"] == edited_id)
    example = next(e for e in tasks.load_split(tasks.get_task(str(path)), "test") if e.id == edited_id)
    assert record["input"].endswith(" (edited)") and record["fingerprint"] == tasks.input_fingerprint(example)
    assert len(one_record_per_id(out)) == 60 and artifacts.read_manifest(out)["last_run"]["records_this_run"] == 1
