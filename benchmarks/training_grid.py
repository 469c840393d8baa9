"""The training grid of issue #4: step-by-step vs standard fine-tuning vs distillation, 3 seeds, 2 data fractions.

On e-SNLI (train on the shipped valid file, i.e. our train split; test on the test split), a tiny T5 from
scratch, data fractions 0.25 and 1.0, 3 seeds, a fixed wall-clock budget per run. The teacher is the shipped
PaLM-540B output, extracted by the real extraction stage (`--teacher replay`, in the teacher environment).
Timings are wall-clock budgets, so the runs hold the benchmark lock.

    python3 -m stepwise bench training-grid --minutes 2.5   # -> benchmarks/results/training_grid.{md,json,csv,png}
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import RESULTS, ROOT, bench_lock


def extract_rationales(task: str, out: Path) -> Path:
    """The train split's teacher records through the extraction stage (it runs in the teacher environment)."""
    command = [
        sys.executable,
        "-m",
        "stepwise",
        "extract",
        "--task",
        task,
        "--split",
        "train",
        "--teacher",
        "replay",
        "--out",
        str(out),
    ]
    subprocess.run(command, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"), check=True)
    return out


def main(
    task: str = "esnli",
    minutes: float = 2.5,
    eval_limit: int = 500,
    seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] = (0.25, 1.0),
    runs: Path = ROOT / "runs" / "training-grid",
    out: Path = RESULTS / "training_grid",
) -> Path:
    """The training grid: every mode x data fraction x seed, a tiny student, a fixed wall-clock budget per run.

    Args:
        task: the task (its train split is extracted with the replay teacher)
        minutes: wall-clock training budget per run (validation included)
        eval_limit: validation and test examples per run (the same ones in every run)
        seeds: seeds per (mode, fraction)
        fractions: shares of the training set
        runs: folder of the runs (finished runs are reused when rerun)
        out: result files (.md, .json, .csv, .png) without suffix
    """
    from stepwise.training import experiment
    from stepwise.training.train import DataOptions, EvalOptions, OptimOptions

    rationales = extract_rationales(task, Path(runs) / f"{task}-teacher-train")
    with bench_lock():
        experiment.main(
            task=task,
            out=Path(runs),
            rationales=rationales,
            student="tiny",
            seeds=seeds,
            fractions=fractions,
            data=DataOptions(max_input_tokens=128, max_target_tokens=64),
            optim=OptimOptions(
                learning_rate=1e-3, batch_size=32, max_steps=0, max_minutes=minutes, schedule="linear", warmup_steps=20
            ),
            evaluation=EvalOptions(eval_every=100, eval_limit=eval_limit),
            results=Path(out).parent,
            name=Path(out).name,
        )
    return Path(out).with_suffix(".json")
