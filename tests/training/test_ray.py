"""`stepwise train --workers 2` on Ray Train (gloo, this machine's CPUs): the same recipe as one process.

Tolerance. Both runs learn from the same examples at every step (the batch is fixed by seed and step and each
worker takes a fixed half) with the loss normalised by the whole step's token counts, so the gradients are the
same sums; what differs is float32 rounding: the two halves are padded to their own lengths (other matrix
shapes) and summed by an all-reduce instead of inside one backward pass, about 1e-7 relative per operation.
Over six Adam steps that stays near 1e-5 relative; log.csv rounds losses to 4 decimals. So each logged loss
must agree within 1e-4 relative + 1e-4 absolute (one unit of the log's rounding) and the final weights within
1e-3 relative: far below what a wrong shard, a double-counted example or a mis-scaled gradient gives (the
losses move by percents from the first step on).
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from stepwise import artifacts
from stepwise.training import checkpoints, ray_train, train
from stepwise.training.train import ComputeOptions, DataOptions, EvalOptions, OptimOptions

from helpers import loopback

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """One private Ray for the module's runs (each run would otherwise start and stop its own)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only: Ray's token auth is on everywhere else
    with ray_train.session("", cpus=2):
        yield


def run(out, rationales, compute: ComputeOptions):
    return train.main(
        task="esnli",
        out=out,
        rationales=rationales,
        student="tiny",
        mode="step-by-step",
        data_fraction=0.03,
        seed=0,
        data=DataOptions(max_input_tokens=96, max_target_tokens=48),
        optim=OptimOptions(learning_rate=1e-3, batch_size=16, max_steps=6),
        evaluation=EvalOptions(eval_every=3, eval_limit=16, log_every=1),
        compute=compute,
    )


def log_rows(out) -> list[dict]:
    with (out / "log.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, esnli_rationales):
    return run(tmp_path_factory.mktemp("one") / "run", esnli_rationales, ComputeOptions())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_reproduce_one_process(tmp_path, esnli_rationales, one_process, local_ray, strategy):
    two = run(tmp_path / "two", esnli_rationales, ComputeOptions(workers=2, strategy=strategy))
    alone, paired = log_rows(one_process), log_rows(two)
    assert [r["step"] for r in paired] == [r["step"] for r in alone] and len(alone) == 8  # 6 loss rows, 2 validations
    for a, b in zip(alone, paired, strict=True):
        for column in ("loss", "label_loss", "rationale_loss"):
            if a[column]:
                assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-4, abs=1e-4), (a["step"], column)
        assert a["valid_accuracy"] == b["valid_accuracy"]
    one_metrics, two_metrics = (json.loads((out / "metrics.json").read_text()) for out in (one_process, two))
    assert (two_metrics["best_step"], two_metrics["valid"], two_metrics["test"]) == (
        one_metrics["best_step"],
        one_metrics["valid"],
        one_metrics["test"],
    )
    one_weights, two_weights = load_file(one_process / "model.safetensors"), load_file(two / "model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
    assert not (two / "checkpoint").exists() and json.loads((two / "train_config.json").read_text()) == json.loads(
        (one_process / "train_config.json").read_text()
    )


def test_resume_takes_the_highest_step_of_ray_and_local_checkpoints(tmp_path, local_ray):
    """Ray's own restore point is one candidate, not the answer: a newer local checkpoint (the run went on in one
    process after its Ray session) wins."""
    from ray.train import Checkpoint, RunConfig, ScalingConfig, report
    from ray.train.torch import TorchTrainer

    def checkpoint_at(folder: Path, step: int) -> Path:
        folder.mkdir(parents=True)
        artifacts.write_json(folder / checkpoints.STATE, asdict(checkpoints.Progress(step=step)))
        return folder

    def ray_checkpoint_at_step_2(config: dict) -> None:
        report({"step": 2}, checkpoint=Checkpoint.from_directory(str(checkpoint_at(Path(config["local"]), 2))))

    def resume(config: dict) -> None:
        chosen = checkpoints.resume_point(Path(config["out"]), on_ray=True)
        (Path(config["out"]) / "chosen").write_text(str(chosen.progress.step))

    out = tmp_path / "run"
    run_config = RunConfig(name="resume", storage_path=str(tmp_path / "ray"))
    one = ScalingConfig(num_workers=1)
    TorchTrainer(
        ray_checkpoint_at_step_2,
        train_loop_config={"local": str(tmp_path / "two")},
        scaling_config=one,
        run_config=run_config,
    ).fit()
    checkpoint_at(checkpoints.root(out) / checkpoints.step_name(4), 4)
    # The same run name and storage: Ray restores the run, and get_checkpoint() answers its step-2 checkpoint.
    TorchTrainer(resume, train_loop_config={"out": str(out)}, scaling_config=one, run_config=run_config).fit()
    assert (out / "chosen").read_text() == "4"


def test_the_process_group_listens_on_the_node_address_only(tmp_path, esnli_rationales, local_ray):
    """torch's rendezvous store binds every interface when it opens its own socket; Ray Train's workers get it on
    the node's address (127.0.0.1 for the private Ray). Every listening socket of Ray's process tree, sampled while
    a 2-worker run trains, is on loopback, the store's among them."""
    seen: set[tuple[str, int, str]] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for process in psutil.Process().children(recursive=True):
                try:
                    seen.update(
                        (c.laddr.ip, c.laddr.port, " ".join(process.cmdline())[:80])
                        for c in process.net_connections(kind="tcp")
                        if c.status == psutil.CONN_LISTEN
                    )
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run(tmp_path / "two", esnli_rationales, ComputeOptions(workers=2))
    finally:
        done.set()
        sampler.join()
    assert any("RayTrainWorker" in where for _, _, where in seen)  # the workers were sampled while they listened
    assert [s for s in seen if not loopback(s[0])] == []
