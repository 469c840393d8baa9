"""Ray Train on a real multi-node Ray cluster on loopback (a head and two worker nodes as separate raylets, each
node with a disk of its own), the run folder and Ray's checkpoints on the loopback S3 server. The node the two
workers train on is killed with SIGKILL after the first checkpoint: Ray Train restarts the group on the other node,
which resumes from the checkpoint on the store, and the run finishes and uploads its folder."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import harness
from stepwise import artifacts, storage
from stepwise.extraction.run import main as extract
from stepwise.training import checkpoints

from helpers import cli_env
from training_helpers import esnli_train

pytestmark = pytest.mark.slow


def recorded_step(out: str, scratch: Path) -> int:
    """The step of the newest checkpoint Ray Train recorded on the store (0: none yet), as a rerun would find it."""
    point = checkpoints.resume_point(scratch, store=out)
    return point.progress.step if point else 0


def test_training_on_three_nodes_resumes_from_the_store_after_a_killed_node(s3_env, bucket, tmp_path):
    rationales, out = f"{bucket}/rationales", f"{bucket}/student"
    extract(task="esnli", teacher="replay", out=rationales)  # a call: `cli.main` would run it in the other env
    env = cli_env(**s3_env)
    # two CPUs per worker node: both workers pack onto one node, and after it dies both fit on the other
    with harness.ray_nodes(env, worker_cpus=2, dashboard=True) as cluster:
        args = esnli_train(out, rationales, "--max-steps", "24", "--eval-every", "4", "--log-every", "4",
                           "--workers", "2", "--ray-address", cluster.address)  # fmt: skip
        driver = subprocess.Popen([sys.executable, "-m", "stepwise", *args], cwd=tmp_path,
                                  env=env | {"STEPWISE_CACHE": str(tmp_path / "driver-cache")},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 420
            while not (recorded_step(out, tmp_path / "scratch") and cluster.running("RayTrainWorker")):
                assert driver.poll() is None, f"the run ended before its first checkpoint:\n{driver.stdout.read()}"
                assert time.monotonic() < deadline, "no checkpoint on the store within the time"
                time.sleep(0.5)
            (first,) = set(cluster.running("RayTrainWorker"))  # both workers on one node
            assert storage.exists(f"{out}/{artifacts.TRAIN_CONFIG}") and not storage.exists(f"{out}/checksums.json")
            cluster.kill_node(first)
            while not cluster.running("RayTrainWorker"):  # the group comes back on the surviving node
                assert driver.poll() is None, f"the run ended before it moved:\n{driver.stdout.read()}"
                assert time.monotonic() < deadline, "the workers did not restart on the other node"
                time.sleep(0.5)
            output, _ = driver.communicate(timeout=600)
        finally:
            driver.kill()
    assert driver.returncode == 0, output[-4000:]
    assert f"resuming {out} at step " in output and "done: 24 steps" in output, output[-4000:]
    log = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/{artifacts.TRAIN_LOG}").decode())))
    assert [int(r["step"]) for r in log if r["loss"]] == list(range(4, 25, 4))  # every step logged once
    assert artifacts.read_json(f"{out}/{artifacts.METRICS}", "")["steps"] == 24
    assert not [n for n in storage.list_files(out) if n.startswith("checkpoint/")] and storage.exists(
        f"{out}/checksums.json"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver-cache"]  # nothing beside the driver
