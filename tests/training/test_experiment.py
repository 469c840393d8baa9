"""`stepwise experiment`: a (small) grid of real training runs summarised as a table and a PNG, in this process
or as Ray tasks."""

from __future__ import annotations

import json
import os

import pytest

from stepwise import tasks
from stepwise.export.runtime import Prediction
from stepwise.serving.fallback_log import FallbackLog, served_record
from stepwise.training import experiment
from stepwise.training.experiment import GridOptions
from stepwise.training.train import DataOptions, EvalOptions, OptimOptions

pytestmark = pytest.mark.slow

SMALL = dict(
    data=DataOptions(max_input_tokens=96, max_target_tokens=32),
    optim=OptimOptions(learning_rate=1e-3, batch_size=8, max_steps=2),
    evaluation=EvalOptions(eval_every=2, eval_limit=8),
)


def test_grid_writes_table_and_plot_and_reuses_finished_runs(tmp_path, esnli_rationales, capsys):
    options = dict(
        task="esnli",
        out=tmp_path / "grid",
        rationales=esnli_rationales,
        student="tiny",
        modes=["step-by-step", "standard-finetune"],
        fractions=[0.01, 0.02],
        seeds=[0, 1],
        results=tmp_path / "results",
        name="grid",
        **SMALL,
    )
    assert experiment.main(**options) == tmp_path / "results"
    saved = json.loads((tmp_path / "results" / "grid.json").read_text())
    assert len(saved["runs"]) == 8 and len(saved["summary"]) == 4
    assert saved["settings"]["budget_per_run"] == "2 steps"
    by_key = {(s["mode"], s["data_fraction"]): s for s in saved["summary"]}
    runs = [r for r in saved["runs"] if r["mode"] == "standard-finetune" and r["data_fraction"] == 0.02]
    assert by_key[("standard-finetune", 0.02)]["test_mean"] == pytest.approx(sum(r["test_accuracy"] for r in runs) / 2)
    assert max(r["train_examples"] for r in saved["runs"] if r["data_fraction"] == 0.01) < min(
        r["train_examples"] for r in saved["runs"] if r["data_fraction"] == 0.02
    )
    table = (tmp_path / "results" / "grid.md").read_text()
    assert "| step-by-step | 0.01 |" in table and "| standard-finetune | 0.02 |" in table
    assert (tmp_path / "results" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "results" / "grid.csv").read_text().splitlines()) == 9

    capsys.readouterr()
    experiment.main(**options)  # a rerun trains nothing: every run folder is finished with the same options
    assert capsys.readouterr().out.count("reusing it") == 8


def test_a_grid_on_ray_writes_what_the_grid_in_this_process_writes(tmp_path, esnli_rationales, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # tests only: Ray's token auth is on everywhere else
    options = dict(
        task="esnli",
        rationales=esnli_rationales,
        student="tiny",
        modes=["standard-finetune"],
        fractions=[0.02],
        seeds=[0, 1],
        name="grid",
        **SMALL,
    )
    here = experiment.main(out=tmp_path / "here", **options)
    on_ray = experiment.main(out=tmp_path / "ray", grid=GridOptions(on_ray=True), **options)
    assert sorted(p.name for p in on_ray.iterdir() if p.is_file()) == sorted(
        p.name for p in here.iterdir() if p.is_file()
    )
    assert {"grid.md", "grid.json", "grid.csv", "grid.png"} <= set(os.listdir(on_ray))
    ran_here, ran_on_ray = (json.loads((folder / "grid.json").read_text()) for folder in (here, on_ray))
    assert ran_on_ray["summary"] == ran_here["summary"]  # the same runs: the same accuracies and steps
    assert [{k: v for k, v in r.items() if k != "train_minutes"} for r in ran_on_ray["runs"]] == [
        {k: v for k, v in r.items() if k != "train_minutes"} for r in ran_here["runs"]
    ]
    assert (tmp_path / "ray" / "grid.md").read_text().split("\n", 1)[1] == (
        tmp_path / "here" / "grid.md"
    ).read_text().split("\n", 1)[1]

    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*/model.safetensors")}
    experiment.main(
        out=tmp_path / "ray", grid=GridOptions(on_ray=True), **options
    )  # finished runs are reused on Ray too
    assert len(finished) == 2 and finished == {p: p.stat().st_mtime_ns for p in finished}


def served_log(folder, premises: list[str]):
    """A server's fallback log (its own writer) holding the teacher's answers to inputs outside e-SNLI's splits."""
    esnli = tasks.get_task("esnli")
    log = FallbackLog(folder, esnli, dropped=lambda reason: pytest.fail(f"a row was dropped: {reason}"))
    for premise in premises:
        example = tasks.Example("", tasks.format_input(esnli, {"premise": premise, "hypothesis": "It moves."}), "")
        student = Prediction("neutral", None, 0.4, 0.05, None)
        teacher = Prediction("entailment", "Something that runs moves.", 1.0, 1.0, None)
        log.add(served_record(esnli, example, student, teacher, "esnli", "v1", "margin"))
    log.close()
    return folder


def test_a_flywheel_turn_trains_every_grid_point_before_and_after(tmp_path, esnli_rationales):
    log = served_log(tmp_path / "log", ["A horse runs.", "A child runs to school.", "A train runs on time."])
    options = dict(task="esnli", out=tmp_path / "grid", rationales=[str(esnli_rationales)], modes=["step-by-step"],
                   fractions=[0.01], seeds=[0], name="turn")  # fmt: skip
    small = dict(SMALL, data=DataOptions(label_source="teacher", max_input_tokens=96, max_target_tokens=32))
    experiment.main(added_rationales=[str(log)], **options, **small)
    saved = json.loads((tmp_path / "grid" / "turn.json").read_text())
    before, after = sorted(saved["runs"], key=lambda r: r["turn"] != "before")
    assert (before["turn"], after["turn"]) == ("before", "after")
    assert after["train_examples"] == before["train_examples"] + 3  # the served inputs, on the same train share
    assert after["test_examples"] == before["test_examples"] > 0  # scored on the same held-out split
    assert (tmp_path / "grid" / "after" / "step-by-step_frac0.01_seed0" / "metrics.json").exists()
    table = (tmp_path / "grid" / "turn.md").read_text()
    assert "| step-by-step (before) | 0.01 |" in table and "| step-by-step (after) | 0.01 |" in table
    assert saved["settings"]["added_rationales"] == [str(log)]
    with pytest.raises(ValueError, match="--added-rationales are added to --rationales"):
        experiment.main(**dict(options, rationales=None), added_rationales=[str(log)], **small)


def test_a_grid_point_given_twice_is_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--fractions repeats 0.5: give each value once"):
        experiment.run_grid("esnli", tmp_path, ["standard-finetune"], [0.5, 0.5], [0], experiment.GridOptions())
    assert not any(tmp_path.iterdir())
