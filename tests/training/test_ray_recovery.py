"""A run on two Ray Train workers survives a killed worker (Ray Train restarts the group from the last
checkpoint) and a killed driver (the same command resumes from Ray's record); the finished folder exports."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stepwise.export.run import ParityOptions
from stepwise.export.run import main as export

from helpers import descendants, start_stepwise, stepwise
from training_helpers import esnli_train

pytestmark = pytest.mark.slow


def train_args(out: Path, rationales: Path) -> list[str]:
    return esnli_train(out, rationales, "--max-steps", "24", "--eval-every", "4", "--log-every", "4", "--workers", "2")


def ray_checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoint" / "ray").glob("step-*/state.json"))


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)


def end_session(session: int) -> None:
    """Some of Ray's daemons outlive a SIGKILLed driver: end the process session the test started."""
    while True:
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def test_a_killed_worker_and_a_killed_driver_resume_and_the_folder_exports(tmp_path, esnli_rationales):
    out = tmp_path / "run"
    driver = start_stepwise(*train_args(out, esnli_rationales), start_new_session=True)
    try:
        wait_for(lambda: ray_checkpoint_steps(out), driver, "first checkpoint")
        workers = {pid: command for pid, command in descendants(driver.pid).items() if "RayTrainWorker" in command}
        assert len(workers) == 2, workers
        os.kill(next(iter(workers)), signal.SIGKILL)  # one worker dies: Ray Train restarts both from the checkpoint
        wait_for(lambda: max(ray_checkpoint_steps(out)) >= 12, driver, "a checkpoint after the worker's death")
        survivors = {pid for pid, command in descendants(driver.pid).items() if "RayTrainWorker" in command}
        assert not survivors & set(workers), "the worker group was not restarted"
        driver.kill()  # then the driver dies too
        driver.wait()
    finally:
        end_session(driver.pid)
    assert not (out / "metrics.json").exists()

    resumed = stepwise(*train_args(out, esnli_rationales))
    assert "resuming" in resumed.stdout + resumed.stderr and "done: 24 steps" in resumed.stdout
    with (out / "log.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]
    assert steps == list(range(4, 25, 4))  # every step logged once, across two restarts
    assert json.loads((out / "metrics.json").read_text())["steps"] == 24 and not (out / "checkpoint").exists()

    exported = export(model=out, out=tmp_path / "onnx", parity=ParityOptions(parity_limit=16))
    assert json.loads((exported / "parity.json").read_text())["passed"]
