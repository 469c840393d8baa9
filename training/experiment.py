"""`stepwise experiment`: the paper's comparison as a grid of `stepwise train` runs (modes x data
fractions x seeds), summarised as a results table (Markdown, JSON, CSV) and a PNG of test accuracy
against data fraction per mode (mean ± std over seeds). Finished runs are reused, so an interrupted
grid continues where it stopped. With --on-ray every run is one Ray task, several training at once on a
Ray cluster (or a private Ray on this machine).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stepwise import artifacts
from stepwise.training import train

RUN_COLUMNS = [
    "mode",
    "turn",
    "data_fraction",
    "seed",
    "steps",
    "train_minutes",
    "best_step",
    "train_examples",
    "valid_accuracy",
    "test_accuracy",
    "test_examples",
]


@dataclass(frozen=True)
class GridOptions:
    """Where the grid's runs train.

    Args:
        on_ray: Run every (mode, fraction, seed) as one Ray task, as many at once as the cluster has room for: the
            cluster at --ray-address, or a private Ray on this machine (loopback only). Each run trains in one
            process (--workers 1).
        trial_cpus: CPUs (torch threads) per run on Ray.
        trial_gpus: GPUs per run on Ray (0 or 1).
    """

    on_ray: bool = False
    trial_cpus: int = 1
    trial_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.trial_cpus < 1 or self.trial_gpus < 0:
            raise ValueError(
                "--trial-cpus must be 1 or more and --trial-gpus 0 or more, "
                f"got {self.trial_cpus} and {self.trial_gpus}"
            )


def run_folder(out: Path, mode: str, fraction: float, seed: int, turn: str = "") -> Path:
    """out/<mode>_frac<f>_seed<s>; a flywheel turn's "after" runs in out/after/ (its "before" runs are the plain grid's,
    so a grid already trained is reused)."""
    return Path(out) / ("after" if turn == "after" else "") / f"{mode}_frac{fraction}_seed{seed}"


def turns(rationales: train.Rationales, added_rationales: Sequence[str]) -> list[tuple[str, list | None]]:
    """("", sources) for a plain grid; with added sources, ("before", sources) and ("after", sources + added)."""
    given = train.rationale_sources(rationales) or None
    if not added_rationales:
        return [("", given)]
    if not given:
        raise ValueError("--added-rationales are added to --rationales: give the sources the 'before' runs learn from")
    return [("before", given), ("after", [*given, *added_rationales])]


def run_grid(
    task: str,
    out: Path,
    modes: Sequence[str],
    fractions: Sequence[float],
    seeds: Sequence[int],
    grid: GridOptions,
    rationales: train.Rationales = None,
    added_rationales: Sequence[str] = (),
    **train_options,
) -> list[dict]:
    """Train every (mode, fraction, seed), before and after the added sources where some are given, into
    `run_folder`; one row of metrics per run."""
    unknown = [m for m in modes if m not in train.MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}: expected some of {train.MODES}")
    for flag, values in (("--modes", modes), ("--fractions", fractions), ("--seeds", seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:  # one grid point twice: two runs into one folder
            raise ValueError(f"{flag} repeats {', '.join(map(str, repeated))}: give each value once")
    grid_points = [
        (
            turn,
            dict(
                task=task,
                out=run_folder(out, mode, fraction, seed, turn),
                mode=mode,
                data_fraction=fraction,
                seed=seed,
                rationales=sources,
                **train_options,
            ),
        )
        for turn, sources in turns(rationales, added_rationales)
        for mode in modes
        for fraction in fractions
        for seed in seeds
    ]
    runs = [run for _, run in grid_points]
    if grid.on_ray:
        compute: train.ComputeOptions = train_options["compute"]
        if compute.workers > 1:
            raise ValueError("--on-ray runs every grid run as one single-process Ray task: leave --workers at 1")
        import ray

        from stepwise.training import ray_train

        with ray_train.session(compute.ray_address, cpus=os.cpu_count() or 1):
            remote_train = ray_train.remote_call(train.main, grid.trial_cpus, grid.trial_gpus)
            in_task = dataclasses.replace(compute, ray_address="")  # inside its task a run trains in one process
            folders = ray.get([remote_train.remote(**dict(run, compute=in_task)) for run in runs])
    else:
        folders = [train.main(**run) for run in runs]
    rows = []
    for (turn, run), folder in zip(grid_points, folders, strict=True):
        metrics = artifacts.read_metrics(folder)
        rows.append(
            {
                "mode": run["mode"],
                "turn": turn,
                "data_fraction": run["data_fraction"],
                "seed": run["seed"],
                "steps": metrics["steps"],
                "train_minutes": metrics["train_minutes"],
                "best_step": metrics["best_step"],
                "train_examples": metrics["train_examples"]["used"],
                "valid_accuracy": metrics["valid"]["accuracy"],
                "test_accuracy": metrics["test"]["accuracy"] if metrics["test"] else None,
                "test_examples": metrics["test"]["examples"] if metrics["test"] else 0,
            }
        )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (mode, turn, fraction)."""
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["turn"], row["data_fraction"]), []).append(row)
    summary = []
    for (mode, turn, fraction), group in groups.items():
        entry = {
            "mode": mode,
            "turn": turn,
            "data_fraction": fraction,
            "seeds": len(group),
            "mean_steps": statistics.mean(r["steps"] for r in group),
        }
        for split in ("valid", "test"):
            values = [r[f"{split}_accuracy"] for r in group if r[f"{split}_accuracy"] is not None]
            entry[f"{split}_mean"] = statistics.mean(values) if values else None
            entry[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def run_kind(entry: dict) -> str:
    """The mode, and which side of a flywheel turn, as the table and the plot name a line."""
    return f"{entry['mode']} ({entry['turn']})" if entry["turn"] else entry["mode"]


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| mode | data fraction | test accuracy (mean ± std) | valid accuracy (mean ± std) | seeds | mean steps |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        test = f"{s['test_mean']:.4f} ± {s['test_std']:.4f}" if s["test_mean"] is not None else "n/a"
        lines.append(
            f"| {run_kind(s)} | {s['data_fraction']} | {test} | {s['valid_mean']:.4f} ± {s['valid_std']:.4f} | "
            f"{s['seeds']} | {s['mean_steps']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(run_kind(s) for s in summary):
        points = sorted(
            (s for s in summary if run_kind(s) == kind and s["test_mean"] is not None),
            key=lambda s: s["data_fraction"],
        )
        axes.errorbar(
            [p["data_fraction"] for p in points],
            [100 * p["test_mean"] for p in points],
            yerr=[100 * p["test_std"] for p in points],
            marker="o",
            capsize=4,
            label=kind,
        )
    axes.set_xlabel("share of the training set")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    artifacts.write_atomic(path, image.getvalue())


def main(
    task: str,
    out: Path,
    rationales: Sequence[str] | None = None,
    added_rationales: Sequence[str] = (),
    student: str = "tiny",
    modes: Sequence[str] = train.MODES,
    fractions: Sequence[float] = (0.25, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    vocab_size: int = 2000,
    labels: list[str] | None = None,
    data: train.DataOptions = train.DataOptions(),
    optim: train.OptimOptions = train.OptimOptions(),
    evaluation: train.EvalOptions = train.EvalOptions(),
    compute: train.ComputeOptions = train.ComputeOptions(),
    grid: GridOptions = GridOptions(),
    results: Path | None = None,
    name: str = "results",
) -> Path:
    """Run a grid of training runs (modes x data fractions x seeds); write a results table and a PNG.

    Args:
        task: Task name (svamp, cqa, esnli) or a custom task's data file/folder.
        out: Folder of the grid's runs (one model folder per run; finished runs are reused).
        rationales: Extraction output folder(s) (needed by step-by-step and standard-distill), merged by id as
            `stepwise train --rationales A B` merges them.
        added_rationales: Sources of one flywheel turn (a server's --fallback-log folder): every grid point trains
            twice, before (--rationales) and after (--rationales and these), scored on the same validation and test
            splits; the after runs go to <out>/after/. A served input has no gold label: use --label-source teacher.
        student: A T5 checkpoint name or folder, or tiny/small built locally.
        modes: Training modes to compare.
        fractions: Shares of the training set.
        seeds: Seeds per (mode, fraction).
        vocab_size: Tokenizer vocabulary size of a locally built tiny/small student.
        labels: A custom task's closed label set (as `stepwise train --labels`).
        data: What every run's student reads and learns.
        optim: Every run's optimizer, batches and budget.
        evaluation: Every run's validation, test and logging.
        compute: Where every run trains.
        grid: Where the grid's runs train.
        results: Folder for the table (<name>.md/.json/.csv) and the PNG (<name>.png); default --out.
        name: Base name of the result files.
    """
    rows = run_grid(
        task,
        Path(out),
        modes,
        fractions,
        seeds,
        grid,
        rationales=rationales,
        added_rationales=added_rationales,
        student=student,
        vocab_size=vocab_size,
        labels=labels,
        data=data,
        optim=optim,
        evaluation=evaluation,
        compute=compute,
    )
    budget = " and ".join(
        b
        for b in (
            f"{optim.max_steps} steps" if optim.max_steps else "",
            f"{optim.max_minutes:g} min" if optim.max_minutes else "",
        )
        if b
    )
    settings = {
        "task": task,
        "student": student,
        "rationales": [str(source) for source in train.rationale_sources(rationales)],
        "added_rationales": [str(source) for source in added_rationales],
        "label_source": data.label_source,
        "alpha": data.alpha,
        "learning_rate": optim.learning_rate,
        "batch_size": optim.batch_size,
        "budget_per_run": budget,
        "schedule": optim.schedule,
        "warmup_steps": optim.warmup_steps,
        "eval_limit": evaluation.eval_limit,
    }
    return write_results(Path(results or out), name, settings, rows, len(seeds))


def write_results(folder: Path, name: str, settings: dict, rows: list[dict], seeds: int) -> Path:
    """<name>.json (settings, summary, runs), .csv (runs), .md (summary) and .png in `folder`."""
    summary = summarise(rows)
    artifacts.write_json(folder / f"{name}.json", {"settings": settings, "summary": summary, "runs": rows})
    table_csv = io.StringIO()
    writer = csv.DictWriter(table_csv, RUN_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_atomic(folder / f"{name}.csv", table_csv.getvalue())
    table = markdown_table(summary)
    task, student, budget = settings["task"], settings["student"], settings["budget_per_run"]
    artifacts.write_atomic(folder / f"{name}.md", f"{task}, student {student}, budget {budget} per run\n\n{table}")
    title = f"{task}, student {student}, {budget} per run, mean ± std over {seeds} seeds"
    plot(summary, folder / f"{name}.png", title)
    print(table, flush=True)
    return folder
