"""Writing the extraction output: atomic shards and the counts the manifest reports (reading is
`stepwise.artifacts.read_records`, shared with the training stage).

Layout of an output folder:
    manifest.json       config (+ its hash), counts, the last run's summary; rewritten atomically
    task.json           the task (stepwise.tasks.save_task), as in every stepwise artifact folder
    shard-<hash>.jsonl  one record per line; a shard is written whole (tmp file, fsync, rename) or not at all
    shard-<hash>.parquet  the same records with --shard-format parquet (pyarrow); there the nested `votes` and
                        `teacher` fields are JSON text columns, decoded again by `artifacts.read_records`
    .extract.lock       held (flock) by the run writing the folder, so a second run cannot write into it too

The shards are the truth: the manifest's counts are recomputed from them, so a kill between writing a
shard and updating the manifest loses nothing. An id is in one shard only: a record that is redone (an
error retried, an input that changed), or a second copy of one (a chunk a Ray worker did twice), is dropped
from its shard. On an object store (`s3://bucket/prefix`) the same names are objects, each uploaded whole;
there the lock is replaced by conditional manifest writes (extraction/README.md states the protocol).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from stepwise import artifacts, storage


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def write_shard(out_dir: str | Path, records: list[dict], shard_format: str = "jsonl") -> str | Path:
    """One chunk's records as one shard, named by the ids it holds (a rerun of the same chunk rewrites
    the same file or object)."""
    ids = "\n".join(r["id"] for r in records)
    name = f"shard-{hashlib.sha256(ids.encode()).hexdigest()[:16]}.{shard_format}"
    return _write_records(storage.join(out_dir, name), records)


def _write_records(path: str | Path, records: list[dict]) -> str | Path:
    if str(path).endswith(".parquet"):
        return artifacts.write_atomic(path, parquet_bytes(records))
    return artifacts.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def drop_records(stale: dict[str | Path, set[str]]) -> None:
    """Remove records from their shards (shard path -> ids to drop), before the ids are done again: each shard is
    rewritten in place without them (atomically), or deleted when nothing is left. After a kill midway every
    shard is whole, old or new, so the next run finds the ids still stale or already gone."""
    for path, ids in stale.items():
        kept = [r for r in artifacts.read_shard(path) if r["id"] not in ids]
        if kept:
            _write_records(path, kept)
        else:
            storage.delete(path)
            if not storage.is_remote(path):
                artifacts.fsync_dir(Path(path).parent)


def parquet_bytes(records: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: json.dumps(v) if k in artifacts.JSON_TEXT_IN_PARQUET else v for k, v in r.items()} for r in records]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def count_records(records: list[dict]) -> dict:
    """Counts and rates over records: what the manifest and the closing summary report."""
    statuses = Counter(r["status"] for r in records)
    with_gold = [r for r in records if r.get("label")]
    correct = sum(bool(r.get("correct")) for r in with_gold)
    reasons = Counter(r["reason"].split(":")[0] for r in records if r["status"] != "ok")
    total = len(records)
    return {
        "records": total,
        "ok": statuses["ok"],
        "malformed": statuses["malformed"],
        "error": statuses["error"],
        "parse_rate": statuses["ok"] / total if total else None,
        "teacher_accuracy": correct / len(with_gold) if with_gold else None,
        "tokens_in": sum(r.get("tokens_in", 0) for r in records),
        "tokens_out": sum(r.get("tokens_out", 0) for r in records),
        "failure_reasons": dict(reasons.most_common()),
        "rationale_sources": dict(Counter(r.get("rationale_source", "") for r in records).most_common()),
    }
