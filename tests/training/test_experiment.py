"""`stepwise experiment`: a (small) grid of real training runs summarised as a table and a PNG."""

from __future__ import annotations

import json

import pytest

from stepwise.training import experiment

pytestmark = pytest.mark.slow


def test_grid_writes_table_and_plot_and_reuses_finished_runs(tmp_path, esnli_rationales, capsys):
    options = dict(task="esnli", out=tmp_path / "grid", rationales=esnli_rationales, student="tiny", modes=["step-by-step", "standard-finetune"],
                   fractions=[0.01, 0.02], seeds=[0, 1], learning_rate=1e-3, batch_size=8, max_steps=2, eval_every=2, eval_limit=8,
                   max_input_length=96, max_target_length=32, results=tmp_path / "results", name="grid")
    result = experiment.main(**options)
    assert len(result["runs"]) == 8 and len(result["summary"]) == 4
    saved = json.loads((tmp_path / "results" / "grid.json").read_text())
    assert saved["settings"]["budget_per_run"] == "2 steps"
    by_key = {(s["mode"], s["data_fraction"]): s for s in saved["summary"]}
    runs = [r for r in saved["runs"] if r["mode"] == "standard-finetune" and r["data_fraction"] == 0.02]
    assert by_key[("standard-finetune", 0.02)]["test_mean"] == pytest.approx(sum(r["test_accuracy"] for r in runs) / 2)
    assert max(r["train_examples"] for r in saved["runs"] if r["data_fraction"] == 0.01) < min(r["train_examples"] for r in saved["runs"] if r["data_fraction"] == 0.02)
    table = (tmp_path / "results" / "grid.md").read_text()
    assert "| step-by-step | 0.01 |" in table and "| standard-finetune | 0.02 |" in table
    assert (tmp_path / "results" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "results" / "grid.csv").read_text().splitlines()) == 9

    capsys.readouterr()
    experiment.main(**options)  # a rerun trains nothing: every run folder is finished with the same options
    assert capsys.readouterr().out.count("reusing it") == 8
