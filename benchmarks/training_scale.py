"""Training throughput: optimizer steps per second of one process against two Ray Train workers (DDP, FSDP).

Over gloo, at the same global batch and the same recipe (step-by-step on e-SNLI with the shipped PaLM-540B
rationales; a tiny and a t5-small-shaped student from scratch).

Each configuration is a real `stepwise train` command in its own process. Steps per second are read from its
log.csv between the first and the last loss row (validation only once, at the end, outside that window), so
Ray's start-up is reported apart. This machine has 2 cores shared with other jobs: two workers each get one
core where one process gets both, so this measures the cost of the data-parallel machinery here, not a speed-up.

    python3 -m stepwise bench training-scale   # -> benchmarks/results/training_scale.{json,md,png}
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, bench_lock, command_line
from benchmarks.training_grid import extract_rationales
from stepwise import artifacts

# name -> (extra `stepwise train` flags, torch threads of the single process)
CONFIGS: dict[str, tuple[list[str], int]] = {
    "1 process, 1 thread": ([], 1),
    "1 process, 2 threads": ([], 2),
    "2 workers DDP (1 thread each)": (["--workers", "2", "--strategy", "ddp"], 1),
    "2 workers FSDP (1 thread each)": (["--workers", "2", "--strategy", "fsdp"], 1),
}
# student -> (global batch in examples, steps, log every)
SHAPES = {"tiny": (32, 60, 10), "small": (16, 12, 3)}


def run_config(name: str, student: str, rationales: Path, workdir: Path, steps: int, log_every: int) -> dict[str, Any]:
    flags, threads = CONFIGS[name]
    batch = SHAPES[student][0]
    out = workdir / student / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "stepwise",
        "train",
        "--task",
        "esnli",
        "--rationales",
        str(rationales),
        "--student",
        student,
        "--out",
        str(out),
        "--learning-rate",
        "1e-3",
        "--batch-size",
        str(batch),
        "--max-steps",
        str(steps),
        "--eval-every",
        str(steps),
        "--log-every",
        str(log_every),
        "--eval-limit",
        "32",
        "--max-input-tokens",
        "128",
        "--max-target-tokens",
        "64",
        *flags,
    ]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1", PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled"
    )
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"{student} / {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with (out / artifacts.TRAIN_LOG).open() as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    first, last = rows[0], rows[-1]
    measured_steps = int(last["step"]) - int(first["step"])
    seconds = float(last["elapsed_s"]) - float(first["elapsed_s"])
    metrics = artifacts.read_metrics(out)
    return {
        "student": student,
        "config": name,
        "global_batch": batch,
        "steps_measured": measured_steps,
        "seconds": round(seconds, 2),
        "steps_per_s": round(measured_steps / seconds, 3),
        "wall_s": round(wall, 1),
        "first_loss": float(first["loss"]),
        "last_loss": float(last["loss"]),
        "valid_accuracy": metrics["valid"]["accuracy"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(dict.fromkeys(r["student"] for r in rows))
    figure, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 3.6), squeeze=False)
    for axis, student in zip(axes[0], students, strict=True):
        mine = [r for r in rows if r["student"] == student]
        axis.barh(
            [r["config"] for r in mine],
            [r["steps_per_s"] for r in mine],
            color=["tab:blue", "tab:blue", "tab:orange", "tab:green"][: len(mine)],
        )
        axis.invert_yaxis()
        axis.set_xlabel("optimizer steps / s (higher is better)")
        axis.set_title(f"{student} student, global batch {mine[0]['global_batch']} (2-core CPU)", fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(
    students: Sequence[str] = tuple(SHAPES),
    configs: Sequence[str] = tuple(CONFIGS),
    steps: int = 0,
    workdir: Path = ROOT / "runs" / "training-scale",
    out: Path = RESULTS / "training_scale",
) -> Path:
    """Optimizer steps per second: one process against two Ray Train workers (DDP, FSDP) at the same global batch.

    Args:
        students: student shapes (tiny, small = t5-small's shape), trained from scratch
        configs: configurations to time (see CONFIGS)
        steps: optimizer steps per run (0: each shape's own, see SHAPES); at least 2 log rows are timed
        workdir: the extracted rationales and the runs
        out: result files (.json, .md, .png) without suffix
    """
    for what, given, known in (("students", students, SHAPES), ("configs", configs, CONFIGS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; known: {list(known)}")
    if steps < 0 or steps == 1:
        raise ValueError(
            f"--steps must be 0 (each shape's own) or 2 or more (timing runs between two log rows), got {steps}"
        )
    workdir = Path(workdir).resolve()
    rationales = workdir / "esnli-teacher-train"
    if not (rationales / artifacts.MANIFEST).exists():
        extract_rationales("esnli", rationales)
    rows = []
    with bench_lock():
        for student in students:
            shape_steps, log_every = SHAPES[student][1:]
            run_steps = steps or shape_steps
            log_every = min(log_every, max(1, run_steps // 2))
            for name in configs:
                print(f"[bench] {student}: {name}", flush=True)
                rows.append(run_config(name, student, rationales, workdir, run_steps, log_every))
                print(f"[bench]   {rows[-1]['steps_per_s']} steps/s ({rows[-1]['wall_s']} s wall)", flush=True)
    load = os.getloadavg()
    lines = [
        "| student | configuration | global batch | steps/s | steps timed | wall s (incl. start-up, validation) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['student']} | {r['config']} | {r['global_batch']} | {r['steps_per_s']:.3f} | "
        f"{r['steps_measured']} | {r['wall_s']:.0f} |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    out = Path(out)
    report = {
        "command": command_line(),
        "cpus": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in load],
        "rows": rows,
    }
    artifacts.write_json(out.with_suffix(".json"), report)
    artifacts.write_atomic(out.with_suffix(".md"), table)
    plot(rows, out.with_suffix(".png"))
    print(table, flush=True)
    return out.with_suffix(".json")
