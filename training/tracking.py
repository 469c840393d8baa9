"""Experiment tracking, as transformers' `report_to` names it: `--report-to tensorboard` writes TensorBoard event files
into the run folder (`<out>/tensorboard/`, `tensorboard --logdir <out>`), `--report-to mlflow` logs to an MLflow
tracking URI (`--tracking-uri`, else $MLFLOW_TRACKING_URI, else MLflow's own default: a local SQLite store,
`mlflow.db` in the working folder; `mlflow ui --backend-store-uri sqlite:///mlflow.db`). Every row of log.csv goes
to the tracker as it is written (rank 0 only), the run's settings as parameters, and the final metrics at the end.
A resumed run continues its own MLflow run (its id is kept with the checkpoint) and its TensorBoard steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ReportTo = Literal["none", "tensorboard", "mlflow"]
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_ID = "mlflow_run_id"  # inside the checkpoint folder: a resumed run logs into the same MLflow run


@dataclass(frozen=True)
class Tracker:
    """Where the rows go: `log(row, step)` for every log.csv row, `finish(metrics)` once at the end."""

    log: Callable[[dict[str, Any], int], None]
    finish: Callable[[dict[str, Any]], None]


NO_TRACKER = Tracker(log=lambda row, step: None, finish=lambda metrics: None)


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) row or metrics mapping, flattened to `a/b` names; `step` itself is the x axis."""
    found: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found |= scalars(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            found[name] = float(value)
    return found


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The run's end: the best validation accuracy (the kept model's) and the test accuracy of that model."""
    return scalars({"best_valid": metrics["valid"], **({"test": metrics["test"]} if metrics.get("test") else {})})


def open_tracker(
    report_to: ReportTo, out: Path, checkpoint_dir: Path, run_name: str, params: dict[str, Any], tracking_uri: str,
    resume_step: int,
) -> Tracker:  # fmt: skip
    """The tracker `report_to` names, opened for the run writing `out` (resuming at `resume_step`)."""
    if report_to == "tensorboard":
        return tensorboard_tracker(Path(out) / TENSORBOARD_DIR, params, resume_step)
    if report_to == "mlflow":
        return mlflow_tracker(Path(checkpoint_dir), run_name, params, tracking_uri)
    return NO_TRACKER


def tensorboard_tracker(folder: Path, params: dict[str, Any], resume_step: int) -> Tracker:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: after a resume, events a killed run wrote past its last checkpoint are dropped, not doubled.
    writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step or None)
    if not resume_step:
        writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))

    def log(row: dict[str, Any], step: int) -> None:
        for name, value in scalars(row).items():
            writer.add_scalar(f"train/{name}" if name != "valid_accuracy" else "valid/accuracy", value, step)
        writer.flush()

    def finish(metrics: dict[str, Any]) -> None:
        for name, value in final_scalars(metrics).items():
            writer.add_scalar(name, value, metrics["steps"])
        writer.close()

    return Tracker(log, finish)


def mlflow_tracker(checkpoint_dir: Path, run_name: str, params: dict[str, Any], tracking_uri: str) -> Tracker:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)
    experiment = params["task"]
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    id_file = Path(checkpoint_dir) / MLFLOW_RUN_ID
    if id_file.exists():  # a resumed run: the same MLflow run goes on
        run_id = id_file.read_text().strip()
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={"stepwise.stage": "train"}).info.run_id
        for name, value in sorted(params.items()):
            client.log_param(run_id, name, str(value)[:500])  # MLflow's limit on a parameter's value
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")

    def log(row: dict[str, Any], step: int) -> None:
        for name, value in scalars(row).items():
            client.log_metric(run_id, name, value, step=step)

    def finish(metrics: dict[str, Any]) -> None:
        for name, value in final_scalars(metrics).items():
            client.log_metric(run_id, name, value, step=metrics["steps"])
        client.set_terminated(run_id)

    return Tracker(log, finish)
