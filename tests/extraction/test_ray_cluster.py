"""Extraction on a real multi-node Ray cluster on loopback: a head and two worker nodes as separate raylets, the
driver sharing no output path with them (the output is a prefix on the loopback S3 server), two vLLM engine
actors spread over the worker nodes. One worker node's raylet is killed with SIGKILL in the middle of the job:
Ray Data restarts its engine on the other node and redoes its chunk, and the job still ends with every record
exactly once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from benchmarks import harness
from stepwise import artifacts, storage, tasks
from stepwise.extraction import read_records

pytestmark = pytest.mark.slow

LIMIT = 40


def test_extraction_on_three_nodes_survives_a_killed_worker_node(tiny_teacher, child_env, s3_env, bucket, tmp_path):
    out = f"{bucket}/esnli/valid"
    env = child_env | s3_env
    # two CPUs per worker node: after one node dies, the engine it ran has a place on the other
    with harness.ray_nodes(env, worker_cpus=2) as cluster:
        driver = subprocess.Popen(
            [sys.executable, "-m", "stepwise", "extract", "--task", "esnli", "--split", "valid", "--limit",
             str(LIMIT), "--teacher", "vllm", "--model", str(tiny_teacher), "--max-tokens", "32", "--enforce-eager",
             "--chunk-size", "2", "--on-ray", "--ray-address", cluster.address, "--ray-actors", "2", "--out", out],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 420
            while not (artifacts.shard_paths(out) and len(cluster.running("EngineActor")) == 2):
                assert driver.poll() is None, f"the job ended before both engines were up:\n{driver.stdout.read()}"
                assert time.monotonic() < deadline, "no shard within the time"
                time.sleep(0.5)
            written_before = len(artifacts.shard_paths(out))
            cluster.kill_node(cluster.running("EngineActor")[0])
            output, _ = driver.communicate(timeout=600)
        finally:
            driver.kill()
    assert driver.returncode == 0, output[-4000:]
    assert written_before < LIMIT // 2, "the node was killed after the job's end"
    records = read_records(out)
    wanted = [e.id for e in tasks.load_split(tasks.get_task("esnli"), "valid")[:LIMIT]]
    counts = Counter(r["id"] for r in records)
    assert sorted(counts) == sorted(wanted) and set(counts.values()) == {1}
    manifest = artifacts.read_manifest(out)
    assert manifest["complete"] and manifest["counts"]["records"] == LIMIT
    assert not list(tmp_path.iterdir())  # the driver wrote nothing beside itself: all of it went to the store
    assert "README.md" in storage.list_files(out)
