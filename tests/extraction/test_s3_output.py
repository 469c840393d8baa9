"""Extraction written to an object store: a real S3 server on loopback (moto, a separate process), the real CLI.
No local output folder exists; resume, a chunk done twice and a second writer behave as on local disk."""

from __future__ import annotations

import json

import pytest

from stepwise import artifacts, cli, storage, tasks
from stepwise.extraction import read_records, run

ARGS = ["--task", "cqa", "--split", "valid", "--limit", "60", "--chunk-size", "8", "--teacher", "replay"]


def extract(out: str, *args: str) -> None:
    cli.main(["extract", *ARGS, "--out", out, *args])


def test_extract_writes_its_shards_manifest_and_card_as_objects_and_resumes(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = f"{bucket}/cqa/valid"
    extract(out)
    wanted = [e.id for e in tasks.load_split(tasks.get_task("cqa"), "valid")[:60]]
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(wanted)
    names = storage.list_files(out)
    assert {"manifest.json", "task.json", "README.md"} <= set(names) and len(artifacts.shard_paths(out)) == 8
    manifest = artifacts.read_manifest(out)
    assert manifest["complete"] and manifest["counts"]["records"] == 60 and manifest["shards"] == 8
    assert tasks.load_task(out) == tasks.get_task("cqa")
    assert not list(tmp_path.iterdir())  # nothing was written beside the driver

    # A chunk lost (the run died before uploading it) and a chunk uploaded twice by two workers under other
    # names (a retry after a node died that batched its inputs differently): the next run does the lost chunk
    # again and keeps one copy of each record.
    shard_objects = artifacts.shard_paths(out)
    lost_ids = {r["id"] for r in artifacts.read_shard(shard_objects[2])}
    storage.delete(shard_objects[2])
    twice = list(artifacts.read_shard(shard_objects[5]))
    storage.write_bytes(f"{out}/shard-0000retried0000.jsonl", "".join(json.dumps(r) + "\n" for r in twice).encode())
    capsys.readouterr()
    extract(out)
    lost = len(lost_ids)
    assert f"resuming: {60 - lost} of 60 records already in {out}, {lost} to go" in capsys.readouterr().out
    again = read_records(out)
    assert sorted(r["id"] for r in again) == sorted(wanted)  # every record once
    assert lost_ids <= {r["id"] for r in again} and artifacts.read_manifest(out)["complete"]


def test_a_second_run_writing_the_same_prefix_is_refused_at_its_next_manifest_write(bucket):
    out = f"{bucket}/shared"
    extract(out)
    task = tasks.get_task("cqa")
    manifest = artifacts.read_manifest(out)
    job = run.Job(task, "valid", [], manifest["config"], out, 8, "jsonl", 60)
    job.manifest_etag["etag"] = storage.etag(f"{out}/manifest.json")
    run.write_manifest(job, [])  # this run's own writes chain: each is conditional on the one before
    run.write_manifest(job, [])
    extract(out)  # meanwhile another run wrote the manifest
    with pytest.raises(RuntimeError, match=f"another `stepwise extract` is writing {out}"):
        run.write_manifest(job, [])


@pytest.mark.parametrize(
    "where, message",
    [
        ("s3://no-such-bucket-stepwise/x", "--out s3://no-such-bucket-stepwise/x: bucket no-such-bucket-stepwise does "
                                           "not exist"),
        ("nope://b/x", "--out nope://b/x: unknown storage scheme nope://"),
    ],
)  # fmt: skip
def test_a_bad_output_location_is_one_line_before_any_work(s3_env, where, message):
    with pytest.raises(SystemExit) as stopped:
        extract(where)
    assert str(stopped.value).startswith(f"stepwise extract: error: {message}") and "\n" not in str(stopped.value)


def test_a_custom_dataset_on_the_object_store_is_read_where_it_is_and_resumes(bucket, custom_nli_rows, tmp_path):
    """`--task s3://.../nli.jsonl` with its task file beside it: the records match the same file read locally, and
    the same command resumes (the task is named by its location, not by the local copy's path)."""
    data = "".join(json.dumps(row) + "\n" for row in custom_nli_rows).encode()
    task_file = json.dumps({"name": "my-nli", "labels": ["entailment", "neutral", "contradiction"]}).encode()
    (tmp_path / "nli.jsonl").write_bytes(data)
    (tmp_path / "nli.task.json").write_bytes(task_file)
    storage.write_bytes(f"{bucket}/data/nli.jsonl", data)
    storage.write_bytes(f"{bucket}/data/nli.task.json", task_file)
    args = ["--split", "train", "--teacher", "replay", "--limit", "40", "--chunk-size", "16"]
    cli.main(["extract", "--task", f"{bucket}/data/nli.jsonl", *args, "--out", f"{bucket}/out"])
    cli.main(["extract", "--task", str(tmp_path / "nli.jsonl"), *args, "--out", str(tmp_path / "out")])
    remote, local = read_records(f"{bucket}/out"), read_records(tmp_path / "out")
    assert len(remote) == 40 and {r["id"]: r["teacher_label"] for r in remote} == {
        r["id"]: r["teacher_label"] for r in local
    }
    assert tasks.load_task(f"{bucket}/out").source == f"{bucket}/data/nli.jsonl"
    assert tasks.load_task(f"{bucket}/out").labels == tasks.load_task(tmp_path / "out").labels
    cli.main(["extract", "--task", f"{bucket}/data/nli.jsonl", *args, "--limit", "48", "--out", f"{bucket}/out"])
    assert artifacts.read_manifest(f"{bucket}/out")["last_run"]["records_this_run"] == 8
