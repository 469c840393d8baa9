"""The student's whole path through an object store (a real S3 server on loopback, moto in its own process): replay
rationales extracted to s3://, a tiny student trained from them into s3://, exported from s3:// to s3://, and
`stepwise serve --model s3://...` answering over HTTP from the copy its replica downloaded and verified. A file
changed on the store after upload is refused, never served."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from stepwise import artifacts, cli, storage, tasks
from stepwise.extraction.run import main as extract
from stepwise.serving import app
from stepwise.serving.run import serve_args

from helpers import cli_env, free_port, start_stepwise, wait_until_ready

pytestmark = pytest.mark.slow


def test_train_export_and_serve_read_and_write_the_object_store(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rationales, student, export = f"{bucket}/extract", f"{bucket}/student", f"{bucket}/export"
    extract(
        task="esnli", teacher="replay", limit=64, out=rationales
    )  # a call: `cli.main` would run it in the other env
    cli.main(["train", "--task", "esnli", "--rationales", rationales, "--student", "tiny", "--out", student,
              "--max-steps", "4", "--eval-every", "4", "--eval-limit", "8", "--batch-size", "8",
              "--max-input-tokens", "64", "--max-target-tokens", "32"])  # fmt: skip
    assert {"config.json", "model.safetensors", "metrics.json", "task.json", "checksums.json"} <= set(
        storage.list_files(student)
    )
    assert artifacts.read_json(f"{student}/train_config.json", "")["rationales"] == rationales
    cli.main(["export", "--model", student, "--out", export, "--quantize", "int8"])
    assert artifacts.read_parity(export)["passed"] and storage.exists(f"{export}/checksums.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the stages wrote nothing else here

    port, run_dir = free_port(), tmp_path / "serve"
    env = cli_env(STEPWISE_CACHE=str(tmp_path / "replica-cache"))  # the replica's node: a cache of its own
    server = start_stepwise(*serve_args([export], port, run_dir, free_port()), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/healthz", 240, server)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": "Premise: A dog runs.\n"
                            "Hypothesis: An animal moves."}, timeout=30)  # fmt: skip
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in tasks.NLI_LABELS
        downloaded = [p for p in (tmp_path / "replica-cache").iterdir() if not p.name.startswith(".")]
        assert len(downloaded) == 1 and (downloaded[0] / artifacts.PARITY).exists()
    finally:
        server.terminate()
        server.wait(timeout=120)

    # Changed on the store after the upload: a replica (a fresh cache) refuses it before it loads anything.
    storage.write_bytes(f"{export}/{artifacts.PARITY}", b'{"passed": true}')
    monkeypatch.setenv("STEPWISE_CACHE", str(tmp_path / "another-node"))
    with pytest.raises(ValueError, match=f"{export}/parity.json does not match its checksum"):
        app.check_models({"esnli": export}, allow_unverified=False)


def test_a_bad_model_location_is_one_line_before_any_work(s3_env):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["export", "--model", "s3://no-such-bucket-stepwise/student", "--out", "/tmp/unused-export"])
    message = str(stopped.value)
    assert message.startswith("stepwise export: error: --model s3://no-such-bucket-stepwise/student: bucket ")
    assert "\n" not in message


def test_a_calibration_is_written_back_to_an_export_on_the_object_store(tiny_export_dir, bucket, tmp_path, monkeypatch):
    from stepwise.serving import cascade

    monkeypatch.setenv("STEPWISE_CACHE", str(tmp_path / "cache"))
    export = f"{bucket}/export"
    storage.upload_folder(Path(shutil.copytree(tiny_export_dir, tmp_path / "export")), export)
    version = artifacts.read_export_config(export)["version"]
    calibration = cascade.CalibrationOptions(target_share=0.25, calibration_limit=40)
    cascade.main(model=export, limit=40, out=tmp_path / "cascade", calibration=calibration)

    settings = artifacts.read_cascade_settings(export)
    assert settings["target"] == {"share": 0.25} and settings["version"] == version
    listed = storage.read_checksums(export, "the test")["files"]
    assert (
        listed[artifacts.CASCADE_SETTINGS]
        == hashlib.sha256(storage.read_bytes(f"{export}/{artifacts.CASCADE_SETTINGS}")).hexdigest()
    )
    # Another node's cache fetches the changed folder whole and verified, and serving takes its margin.
    copy = storage.cached_download(export, "the test", cache=tmp_path / "another-node")
    assert artifacts.read_cascade_settings(copy) == settings
    assert cascade.calibrated_margin(export, 0.25) == settings["threshold"]
    assert artifacts.read_export_config(export)["version"] == version
