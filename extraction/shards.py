"""The extraction output on disk: atomic JSONL shards, a manifest, and the reader the training stage uses.

Standard library only, so `read_records` imports in the student environment too.

Layout of an output folder:
    manifest.json       config (+ its hash), counts, the last run's summary; rewritten atomically
    shard-<hash>.jsonl  one record per line; a shard is written whole (tmp file, fsync, rename) or not at all

The shards are the truth: the manifest's counts are recomputed from them, so a kill between writing a
shard and updating the manifest loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.jsonl"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a restart after kill -9) sees all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_shard(out_dir: Path, records: list[dict]) -> Path:
    """One chunk's records as one shard, named by the ids it holds (a rerun of the same chunk rewrites
    the same file, so two shards never share an id)."""
    ids = "\n".join(r["id"] for r in records)
    path = out_dir / f"shard-{hashlib.sha256(ids.encode()).hexdigest()[:16]}.jsonl"
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def shard_paths(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob(SHARD_GLOB))


def iter_records(out_dir: Path) -> Iterator[dict]:
    for path in shard_paths(out_dir):
        with path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def read_records(out_dir: str | Path) -> list[dict]:
    """All records of an extraction output folder (see `extraction` for the fields)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        raise FileNotFoundError(f"{out_dir} is not an extraction output: no {MANIFEST} (run `stepwise extract` first)")
    return list(iter_records(out_dir))


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def remove_partial_files(out_dir: Path) -> None:
    """Temp files of a write that a kill interrupted; their records are regenerated."""
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink()


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
    }
