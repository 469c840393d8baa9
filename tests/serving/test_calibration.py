"""The calibrated router: `stepwise cascade --target-share` picks the margin on the validation split and writes it into
the export folder; on the test split the share below it matches the target within a binomial tolerance, offline and
served (`stepwise serve --fallback-share`, a real vLLM teacher, the share read from the server's metrics)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from stepwise import artifacts, cli, storage, tasks
from stepwise.export.runtime import load_runtime, predict
from stepwise.serving import cascade, lifecycle
from stepwise.serving.cascade import CalibrationOptions
from stepwise.serving.run import serve_args
from stepwise.serving.settings import FallbackOptions, ScalingOptions, ServeArgs

from helpers import free_port
from serving_helpers import premise_hypothesis, wait_for_metric

ESNLI = tasks.get_task("esnli")
SHARE = 0.2
TEST_INPUTS = 400
VALID_INPUTS = len(tasks.load_split(ESNLI, "valid"))  # 958, all of it
# The threshold is a quantile of the validation margins and the check counts test inputs below it: two independent
# binomial samples of the same share, so 3 standard deviations of their difference.
TOLERANCE = 3 * math.sqrt(SHARE * (1 - SHARE) * (1 / VALID_INPUTS + 1 / TEST_INPUTS))  # 0.071


def margins_of(folder: Path, examples: list[tasks.Example]) -> list[float]:
    """The student's margins, in batches of 16 as `stepwise cascade` labels them."""
    runtime = load_runtime(folder, threads=1)
    return [p.margin for start in range(0, len(examples), 16) for p in predict(runtime, examples[start : start + 16])]


# ---------------------------------------------------------------- the calibration, on its own


def test_the_threshold_falls_halfway_between_the_sent_margins_and_the_rest():
    margins = [0.5, 0.1, 0.3, 0.9, 0.2]
    assert cascade.threshold_for(margins, 2) == pytest.approx(0.25)  # 0.1 and 0.2 below it
    assert cascade.threshold_for(margins, 0) == 0.0 and cascade.threshold_for(margins, 5) == 1.0


def test_the_accuracy_target_takes_the_fewest_teacher_calls_that_reach_it():
    examples = tasks.load_split(ESNLI, "valid")[:4]
    golds = [e.label for e in examples]
    wrong = [next(label for label in ESNLI.labels if label != gold) for gold in golds]
    # The student is wrong on its two least sure inputs, where the teacher is right, and wrong on one more where the
    # teacher is wrong too.
    labels = [wrong[0], wrong[1], wrong[2], golds[3]]
    margins = [0.05, 0.1, 0.6, 0.8]
    answers = {examples[0].id: golds[0], examples[1].id: golds[1], examples[2].id: wrong[2]}
    reach = [cascade.sent_for_accuracy(ESNLI, examples, labels, margins, answers, t) for t in (0.25, 0.5, 0.75)]
    assert reach == [0, 1, 2]
    with pytest.raises(ValueError, match=r"no share of teacher calls reaches accuracy 0.9 .* the best is 0.750"):
        cascade.sent_for_accuracy(ESNLI, examples, labels, margins, answers, 0.9)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"target_share": 0.1, "target_accuracy": 0.5}, "not both"),
        ({"target_share": 1.0}, r"in \(0, 1\)"),
        ({"target_accuracy": 1.5}, r"in \(0, 1\]"),
        ({"target_share": 0.1, "calibrate_on": "test"}, "the test split checks it"),
    ],
)
def test_bad_calibration_targets_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CalibrationOptions(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fallback_share": 0.1, "fallback_margin": 0.3}, "give --fallback-margin or --fallback-share, not both"),
        ({"fallback_share": 0.1}, "--fallback-share sends predictions to the teacher: it needs --fallback"),
        ({"fallback_share": 1.0}, r"in \(0, 1\)"),
    ],
)
def test_bad_share_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        FallbackOptions(**fields)


def serve_error(folder: Path, tmp_path: Path, monkeypatch, *flags: str) -> str:
    """`stepwise serve`'s one-line error for these fallback flags (it fails before Ray starts)."""
    monkeypatch.setenv("STEPWISE_INPROCESS", "1")
    teacher = ["--fallback", "http://127.0.0.1:9", "--fallback-model", "m", *flags]
    argv = serve_args([folder], free_port(), tmp_path / "run", free_port(), teacher)
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    return str(refused.value)


def test_serving_a_share_the_export_was_not_calibrated_for_is_refused_at_start(tiny_export_dir, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "export"))
    rerun = f"calibrate it with `stepwise cascade --target-share 0.2 --model {folder}`"
    assert serve_error(folder, tmp_path, monkeypatch, "--fallback-share", "0.2") == (
        f"stepwise serve: error: model 'esnli': {folder} has no cascade_settings.json for --fallback-share: {rerun}"
    )
    assert serve_error(folder, tmp_path, monkeypatch, "--fallback-share", "0.2", "--fallback-margin", "0.3") == (
        "stepwise serve: error: give --fallback-margin or --fallback-share, not both "
        "(a share sends by the export's calibrated margin)"
    )
    version = artifacts.read_export_config(folder)["version"]
    settings = {"target": {"share": 0.1}, "threshold": 0.3, "share": 0.1, "accuracy": 0.5, "split": "valid",
                "examples": 10, "teacher": "t", "version": version}  # fmt: skip
    artifacts.write_cascade_settings(folder, settings)
    assert serve_error(folder, tmp_path, monkeypatch, "--fallback-share", "0.2") == (
        f"stepwise serve: error: model 'esnli': {folder} was calibrated for target share 0.1, not share 0.2: {rerun}"
    )
    artifacts.write_cascade_settings(folder, {**settings, "target": {"share": 0.2}, "version": "0123456789ab"})
    assert serve_error(folder, tmp_path, monkeypatch, "--fallback-share", "0.2") == (
        f"stepwise serve: error: model 'esnli': {folder} was calibrated on export version 0123456789ab, "
        f"not {version}: {rerun}"
    )
    artifacts.write_cascade_settings(folder, {**settings, "target": {"share": 0.2}})
    assert cascade.calibrated_margin(folder, 0.2) == 0.3


def test_the_settings_file_keeps_a_checksummed_folder_whole(tiny_export_dir, tmp_path):
    """A folder with a checksum list (as uploaded or downloaded) still verifies with the settings written into it, and
    the export's version (a hash of its ONNX files) does not move."""
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "export"))
    storage.write_checksums(folder)
    version = artifacts.read_export_config(folder)["version"]
    artifacts.write_cascade_settings(folder, {"target": {"share": 0.1}, "threshold": 0.3, "share": 0.1,
                                              "accuracy": 0.5, "split": "valid", "examples": 10, "teacher": "t",
                                              "version": version})  # fmt: skip
    listed = json.loads((folder / storage.CHECKSUMS).read_text())
    assert listed == storage.folder_checksums(folder) and artifacts.CASCADE_SETTINGS in listed["files"]
    assert load_runtime(folder, threads=1).version == version


# ---------------------------------------------------------------- calibrated on valid, checked on test


@pytest.fixture(scope="module")
def calibrated(trained_export_dir, tmp_path_factory) -> SimpleNamespace:
    """The 60-step student (margins spread), copied, calibrated at SHARE on all of valid; the curve on TEST_INPUTS
    test inputs."""
    work = tmp_path_factory.mktemp("calibration")
    folder = Path(shutil.copytree(trained_export_dir, work / "export"))
    out = cascade.main(
        model=folder,
        split="test",
        limit=TEST_INPUTS,
        out=work / "cascade",
        calibration=CalibrationOptions(target_share=SHARE),
    )
    examples = tasks.load_split(ESNLI, "test")[:TEST_INPUTS]
    margins = margins_of(folder, examples)
    return SimpleNamespace(
        folder=folder,
        result=json.loads((out / "cascade.json").read_text()),
        settings=artifacts.read_cascade_settings(folder),
        examples=examples,
        margins=margins,
    )


def test_the_threshold_is_chosen_on_valid_and_recorded_in_the_export(calibrated):
    settings = calibrated.settings
    assert settings["target"] == {"share": SHARE} and settings["split"] == "valid"
    assert settings["examples"] == VALID_INPUTS and settings["share"] == pytest.approx(SHARE, abs=1 / VALID_INPUTS)
    assert settings["version"] == artifacts.read_export_config(calibrated.folder)["version"]
    assert settings["teacher"] == "shipped completions of esnli/valid" and 0 < settings["threshold"] < 1
    valid_margins = margins_of(calibrated.folder, tasks.load_split(ESNLI, "valid"))
    assert sum(m < settings["threshold"] for m in valid_margins) == round(SHARE * VALID_INPUTS)


def test_on_test_the_share_below_the_threshold_matches_the_target(calibrated):
    share = sum(m < calibrated.settings["threshold"] for m in calibrated.margins) / TEST_INPUTS
    print(f"[calibration] offline test share {share:.4f} (target {SHARE}, tolerance {TOLERANCE:.4f})")
    assert abs(share - SHARE) <= TOLERANCE, share
    on_test = calibrated.result["calibrated"]["on_split"]
    assert on_test["split"] == "test" and on_test["share"] == pytest.approx(share)


@pytest.mark.slow
def test_served_with_the_share_the_teacher_answers_that_share(calibrated, teacher_url, tmp_path):
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    metrics_port = free_port()
    teacher = FallbackOptions(
        fallback=teacher_url,
        fallback_share=SHARE,
        fallback_model="tiny",
        fallback_max_tokens=320,
        fallback_timeout_s=120,
        fallback_retries=0,
    )
    url = lifecycle.start(
        ServeArgs(
            models={"esnli": str(calibrated.folder)}, scaling=ScalingOptions(replica_cpus=0.25), fallback=teacher
        ),
        port=free_port(),
        run_dir=tmp_path / "run",
        metrics_port=metrics_port,
    )
    try:

        async def send_all() -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                gate = asyncio.Semaphore(8)

                async def one(example: tasks.Example) -> dict:
                    async with gate:
                        response = await client.post("/v1/predict", json={"inputs": premise_hypothesis(example)})
                    assert response.status_code == 200, response.text
                    return response.json()["predictions"][0]

                return await asyncio.gather(*(one(e) for e in calibrated.examples))

        answers = asyncio.run(send_all())
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        samples = wait_for_metric(metrics, "ray_stepwise_predictions_total", total=TEST_INPUTS, model="esnli")
    finally:
        lifecycle.stop()
    counted = {
        source: sum(v for labels, v in samples if labels["source"] == source) for source in ("student", "teacher")
    }
    assert counted["student"] + counted["teacher"] == TEST_INPUTS, counted
    assert counted["teacher"] == sum(a["source"] == "teacher" for a in answers)
    share = counted["teacher"] / TEST_INPUTS
    print(f"[calibration] served teacher share {share:.4f} (target {SHARE}, tolerance {TOLERANCE:.4f})")
    assert abs(share - SHARE) <= TOLERANCE, share
    # What the server sent is what the threshold sends offline (up to margins within float noise of it).
    offline = sum(m < calibrated.settings["threshold"] for m in calibrated.margins)
    assert abs(counted["teacher"] - offline) <= 2, (counted, offline)
