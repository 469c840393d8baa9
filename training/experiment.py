"""`stepwise experiment`: the paper's comparison as a grid of `stepwise train` runs (modes x data
fractions x seeds), summarised as a results table (Markdown, JSON, CSV) and a PNG of test accuracy
against data fraction per mode (mean ± std over seeds). Finished runs are reused, so an interrupted
grid continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from stepwise import artifacts
from stepwise.training import train

RUN_COLUMNS = ["mode", "data_fraction", "seed", "steps", "train_minutes", "best_step", "train_examples", "valid_accuracy", "test_accuracy", "test_examples"]


def run_grid(task: str, out: Path, modes: list[str], fractions: list[float], seeds: list[int], **train_options) -> list[dict]:
    """Train every (mode, fraction, seed) into out/<mode>_frac<f>_seed<s>; one row of metrics per run."""
    unknown = [m for m in modes if m not in train.MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}: expected some of {train.MODES}")
    rows = []
    for mode in modes:
        for fraction in fractions:
            for seed in seeds:
                folder = train.main(task=task, out=Path(out) / f"{mode}_frac{fraction}_seed{seed}", mode=mode, data_fraction=fraction, seed=seed, **train_options)
                metrics = artifacts.read_metrics(folder)
                rows.append({
                    "mode": mode, "data_fraction": fraction, "seed": seed, "steps": metrics["steps"],
                    "train_minutes": metrics["train_minutes"], "best_step": metrics["best_step"],
                    "train_examples": metrics["train_examples"]["used"], "valid_accuracy": metrics["valid"]["accuracy"],
                    "test_accuracy": metrics["test"]["accuracy"] if metrics["test"] else None,
                    "test_examples": metrics["test"]["examples"] if metrics["test"] else 0,
                })
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (mode, fraction)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["data_fraction"]), []).append(row)
    summary = []
    for (mode, fraction), group in groups.items():
        entry = {"mode": mode, "data_fraction": fraction, "seeds": len(group), "mean_steps": statistics.mean(r["steps"] for r in group)}
        for split in ("valid", "test"):
            values = [r[f"{split}_accuracy"] for r in group if r[f"{split}_accuracy"] is not None]
            entry[f"{split}_mean"] = statistics.mean(values) if values else None
            entry[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict]) -> str:
    lines = ["| mode | data fraction | test accuracy (mean ± std) | valid accuracy (mean ± std) | seeds | mean steps |", "|---|---|---|---|---|---|"]
    for s in summary:
        test = f"{s['test_mean']:.4f} ± {s['test_std']:.4f}" if s["test_mean"] is not None else "n/a"
        lines.append(f"| {s['mode']} | {s['data_fraction']} | {test} | {s['valid_mean']:.4f} ± {s['valid_std']:.4f} | {s['seeds']} | {s['mean_steps']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(s["mode"] for s in summary):
        points = sorted((s for s in summary if s["mode"] == mode and s["test_mean"] is not None), key=lambda s: s["data_fraction"])
        axes.errorbar([p["data_fraction"] for p in points], [100 * p["test_mean"] for p in points], yerr=[100 * p["test_std"] for p in points], marker="o", capsize=4, label=mode)
    axes.set_xlabel("share of the training set")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(
    task: str,
    out: Path,
    rationales: Path | None = None,
    student: str = "tiny",
    modes: list[str] = list(train.MODES),
    fractions: list[float] = [0.25, 1.0],
    seeds: list[int] = [0, 1, 2],
    label_source: str = "gold",
    alpha: float = 0.5,
    learning_rate: float = 5e-5,
    batch_size: int = 64,
    grad_accum: int = 1,
    max_steps: int = 10000,
    max_minutes: float = 0.0,
    schedule: str = "linear",
    warmup_steps: int = 0,
    max_input_length: int = 1024,
    max_target_length: int = 256,
    eval_every: int = 250,
    eval_limit: int = 0,
    results: Path | None = None,
    name: str = "results",
) -> dict:
    """Run a grid of training runs (modes x data fractions x seeds); write a results table and a PNG.

    Args:
        task: Task name (svamp, cqa, esnli) or a custom task's data file/folder.
        out: Folder of the grid's runs (one model folder per run; finished runs are reused).
        rationales: Extraction output folder (needed by step-by-step and standard-distill).
        student: A T5 checkpoint name or folder, or tiny/small built locally.
        modes: Training modes to compare.
        fractions: Shares of the training set.
        seeds: Seeds per (mode, fraction).
        label_source: Labels of the step-by-step runs: gold or teacher.
        alpha: Weight of the label loss in step-by-step runs.
        learning_rate: Peak learning rate of every run.
        batch_size: Examples per optimizer step.
        grad_accum: Micro-batches per optimizer step.
        max_steps: Step budget per run (0: none).
        max_minutes: Wall-clock budget per run in minutes (0: none).
        schedule: linear or constant learning rate after warmup.
        warmup_steps: Linear warmup steps.
        max_input_length: Input tokens kept.
        max_target_length: Label and rationale tokens kept.
        eval_every: Steps between validations (best-checkpoint selection).
        eval_limit: Validation and test examples evaluated per run (0: all).
        results: Folder for the table (<name>.md/.json/.csv) and the PNG (<name>.png); default --out.
        name: Base name of the result files.
    """
    rows = run_grid(
        task, Path(out), modes, fractions, seeds, rationales=rationales, student=student, label_source=label_source,
        alpha=alpha, learning_rate=learning_rate, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, max_minutes=max_minutes, schedule=schedule,
        warmup_steps=warmup_steps, max_input_length=max_input_length, max_target_length=max_target_length,
        eval_every=eval_every, eval_limit=eval_limit,
    )
    summary = summarise(rows)
    results_dir = Path(results or out)
    results_dir.mkdir(parents=True, exist_ok=True)
    budget = " and ".join(b for b in (f"{max_steps} steps" if max_steps else "", f"{max_minutes:g} min" if max_minutes else "") if b)
    settings = {"task": task, "student": student, "label_source": label_source, "alpha": alpha, "learning_rate": learning_rate, "batch_size": batch_size, "budget_per_run": budget, "schedule": schedule, "warmup_steps": warmup_steps, "eval_limit": eval_limit}
    (results_dir / f"{name}.json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2) + "\n")
    with (results_dir / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, RUN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(summary)
    (results_dir / f"{name}.md").write_text(f"{task}, student {student}, budget {budget} per run\n\n{table}")
    plot(summary, results_dir / f"{name}.png", f"{task}, student {student}, {budget} per run, mean ± std over {len(seeds)} seeds")
    print(table, flush=True)
    return {"summary": summary, "runs": rows}
