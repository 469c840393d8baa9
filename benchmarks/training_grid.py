"""The training grid of issue #4 on this CPU: step-by-step vs standard fine-tuning vs standard
distillation on e-SNLI (train on the shipped valid file, i.e. our train split; test on the test split),
a tiny T5 from scratch, data fractions 0.25 and 1.0, 3 seeds, a fixed wall-clock budget per run.

The teacher is the shipped PaLM-540B output, extracted by the real extraction stage (`--teacher replay`).
Writes benchmarks/results/training_grid.{md,json,csv,png}. Run it alone (timings are wall-clock budgets):

    flock /tmp/stepwise-bench.lock .venv/student/bin/python -m benchmarks.training_grid --minutes 2.5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from stepwise.training import experiment
from stepwise.training.train import DataOptions, EvalOptions, OptimOptions

ROOT = Path(__file__).resolve().parent.parent


def extract_rationales(task: str, out: Path) -> Path:
    """The train split's teacher records through the extraction stage (it runs in the teacher environment)."""
    command = [sys.executable, "-m", "stepwise", "extract", "--task", task, "--split", "train", "--teacher", "replay", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"), check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="esnli")
    parser.add_argument("--minutes", type=float, default=2.5, help="wall-clock training budget per run (validation included)")
    parser.add_argument("--eval-limit", type=int, default=500, help="validation and test examples per run (the same ones in every run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "training-grid", help="folder of the runs (reused when rerun)")
    args = parser.parse_args()
    rationales = extract_rationales(args.task, args.runs / f"{args.task}-teacher-train")
    experiment.main(
        task=args.task, out=args.runs, rationales=rationales, student="tiny", seeds=args.seeds, fractions=[0.25, 1.0],
        data=DataOptions(max_input_length=128, max_target_length=64),
        optim=OptimOptions(learning_rate=1e-3, batch_size=32, max_steps=0, max_minutes=args.minutes, schedule="linear", warmup_steps=20),
        evaluation=EvalOptions(eval_every=100, eval_limit=args.eval_limit),
        results=ROOT / "benchmarks" / "results", name="training_grid",
    )


if __name__ == "__main__":
    main()
