"""The ecosystem's conventions on real runs (issue 22, items 1 and 2): extraction, run and export folders carry cards
the Hugging Face libraries load (the dataset card's configs load the shards with `datasets`), and `--report-to`
writes TensorBoard event files (read back) or MLflow runs (queried from the local store)."""

from __future__ import annotations

import json

import pytest

from helpers import stepwise

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    out = tmp_path_factory.mktemp("cards") / "esnli-teacher"
    stepwise("extract", "--task", "esnli", "--split", "train", "--limit", "64", "--chunk-size", "16", "--out", str(out))
    return out


def train(extraction, out, *extra: str) -> dict:
    stepwise("train", "--task", "esnli", "--rationales", str(extraction), "--student", "tiny", "--out", str(out),
             "--max-steps", "6", "--eval-every", "3", "--log-every", "2", "--eval-limit", "8", *extra)  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def test_an_extraction_folder_has_a_dataset_card_that_loads_its_shards(extraction, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(extraction / "README.md")
    manifest = json.loads((extraction / "manifest.json").read_text())
    assert card.data.stepwise["records"] == 64 and card.data.stepwise["labels"] == manifest["config"]["task"]["labels"]
    assert card.data.stepwise["parse_rate"] == manifest["counts"]["parse_rate"] and card.data.license == "unknown"
    assert card.data.stepwise["teacher"]["backend"] == "replay" and card.data.size_categories == ["n<1K"]
    loaded = datasets.load_dataset(str(extraction), cache_dir=str(tmp_path / "hf"))
    by_files = datasets.load_dataset(
        "json", data_files=str(extraction / "shard-*.jsonl"), cache_dir=str(tmp_path / "hf")
    )
    assert loaded["train"].num_rows == by_files["train"].num_rows == 64
    assert set(loaded["train"]["id"]) == {
        json.loads(line)["id"] for p in extraction.glob("shard-*") for line in p.open()
    }


def test_run_and_export_folders_have_model_cards_and_tensorboard_events(extraction, tmp_path):
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    metrics = train(extraction, run, "--report-to", "tensorboard")
    card = ModelCard.load(run / "README.md")
    results = {r.dataset_split: r.metric_value for r in card.data.eval_results}
    assert results == {"valid": metrics["valid"]["accuracy"], "test": metrics["test"]["accuracy"]}
    assert card.data.stepwise["mode"] == "step-by-step" and card.data.library_name == "transformers"

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4, 6] and all(e.value > 0 for e in losses)
    assert [e.step for e in events.Scalars("valid/accuracy")] == [3, 6]
    assert events.Scalars("test/accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"])

    export = tmp_path / "export"
    stepwise("export", "--model", str(run), "--out", str(export), "--parity-limit", "8", "--min-agreement", "0")
    exported = ModelCard.load(export / "README.md")
    parity = json.loads((export / "parity.json").read_text())
    assert exported.data.library_name == "onnx" and exported.data.stepwise["export"]["precision"] == "fp32"
    assert [r.metric_value for r in exported.data.eval_results] == [parity["accuracy_onnx"]]
    assert "# export" in exported.text and "parity gate | passed" in exported.text


def test_report_to_mlflow_logs_the_run_to_a_local_store(extraction, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = train(extraction, tmp_path / "run", "--report-to", "mlflow", "--tracking-uri", uri)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("esnli").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["mode"] == "step-by-step"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
