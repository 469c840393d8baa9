"""What object storage costs the stages against local disk, side by side in one run: extraction (the replay teacher,
so the teacher costs nothing and the writes are what is measured), reading the records back, and training a tiny
student (rationales read from, and the run folder uploaded to, the store). The store is moto's S3 server on
loopback (benchmarks.harness.s3_server): a real HTTP server with no network latency and this machine's CPUs, so
this measures stepwise's own overhead per request and per byte, not a cloud store's round trips.

    python3 -m stepwise bench storage   # -> benchmarks/results/storage.{json,md}
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness import RESULTS, ROOT, bench_lock, command_line, machine, new_bucket, s3_server, write_results

TASK = "esnli"


def timed(work: Callable[[int], Any], run: int) -> float:
    started = time.perf_counter()
    work(run)
    return time.perf_counter() - started


def measure_pair(name: str, local: Callable[[int], Any], remote: Callable[[int], Any], repeats: int) -> dict:
    """`local(i)` and `remote(i)` `repeats` times each, alternating which goes first (the machine is noisy)."""
    seconds: dict[str, list[float]] = {"local": [], "s3": []}
    for i in range(repeats):
        order = [("local", local), ("s3", remote)] if i % 2 == 0 else [("s3", remote), ("local", local)]
        for where, work in order:
            seconds[where].append(timed(work, i))
            print(f"[storage] {name} on {where}: {seconds[where][-1]:.2f} s", flush=True)
    local_s, s3_s = statistics.median(seconds["local"]), statistics.median(seconds["s3"])
    return {"stage": name, "local_s": local_s, "s3_s": s3_s, "s3_over_local": s3_s / local_s, "runs": seconds}


def main(
    records: int = 2000,
    chunk_size: int = 256,
    train_steps: int = 20,
    repeats: int = 3,
    workdir: Path = ROOT / "runs" / "storage-bench",
    out: Path = RESULTS / "storage",
) -> Path:
    """Extraction, reading records and training on local disk against the loopback S3 server.

    Args:
        records: e-SNLI train inputs extracted per run
        chunk_size: records per shard
        train_steps: optimizer steps of each training run (a tiny student)
        repeats: runs per stage and location (medians reported)
        workdir: local outputs and the download cache (removed first)
        out: result files (.json, .md) without suffix
    """
    from stepwise import artifacts
    from stepwise.extraction.run import main as extract
    from stepwise.training import train

    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    os.environ["STEPWISE_CACHE"] = str(workdir / "cache")
    rows = []
    with bench_lock(), s3_server() as env:
        os.environ.update(env)
        bucket = new_bucket()

        def extract_to(where: str) -> None:
            extract(task=TASK, teacher="replay", limit=records, chunk_size=chunk_size, out=where)

        rows.append(
            measure_pair(
                "extract",
                lambda i: extract_to(str(workdir / f"extract-{i}")),
                lambda i: extract_to(f"{bucket}/extract-{i}"),
                repeats,
            )
        )
        rows.append(
            measure_pair(
                "read records",
                lambda i: artifacts.read_records(workdir / "extract-0"),
                lambda i: artifacts.read_records(f"{bucket}/extract-0"),
                repeats,
            )
        )

        def train_to(rationales: str, where: str) -> None:
            train.main(
                task=TASK, out=where, rationales=rationales, student="tiny", data_fraction=0.05, vocab_size=500,
                optim=train.OptimOptions(batch_size=8, max_steps=train_steps),
                evaluation=train.EvalOptions(eval_every=train_steps, eval_limit=16),
                data=train.DataOptions(max_input_tokens=64, max_target_tokens=32),
            )  # fmt: skip

        rows.append(
            measure_pair(
                "train (read rationales, write the run)",
                lambda i: train_to(str(workdir / "extract-0"), str(workdir / f"train-{i}")),
                lambda i: train_to(f"{bucket}/extract-0", f"{bucket}/train-{i}"),
                repeats,
            )
        )
    report = {
        "command": command_line(),
        "machine": machine(),
        "store": "moto S3 server on 127.0.0.1 (one process, this machine's CPUs)",
        "records": records,
        "chunk_size": chunk_size,
        "train_steps": train_steps,
        "rows": rows,
    }
    return write_results(Path(out), report, render_table(rows, records))


def render_table(rows: list[dict], records: int) -> str:
    lines = [
        f"Medians over alternating runs; {records} e-SNLI records. S3 = moto on loopback: stepwise's overhead, "
        "not a cloud store's latency.",
        "",
        "| stage | local disk s | S3 (loopback) s | S3 / local |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['local_s']:.2f} | {row['s3_s']:.2f} | {row['s3_over_local']:.2f}x |")
    return "\n".join(lines)
