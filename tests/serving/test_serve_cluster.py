"""`stepwise serve --ray-address` on a real multi-node Ray cluster on loopback (a head and two worker nodes as
separate raylets, each with a disk of its own), the export on the loopback S3 server: one replica on each worker
node, each downloading and verifying its own copy. The node of one replica is killed with SIGKILL: requests keep
being answered (one in flight on the killed node may fail), and Serve replaces the lost replica."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from benchmarks import harness
from stepwise import storage, tasks
from stepwise.serving.run import serve_args

from helpers import cli_env, free_port, start_stepwise, wait_until_ready

pytestmark = pytest.mark.slow

REPLICA = "ray::ServeReplica:stepwise"  # the app's replica processes
REQUEST = {"inputs": "Premise: A dog runs.\nHypothesis: An animal moves."}


def test_two_replicas_on_two_nodes_keep_answering_when_one_node_dies(tiny_export_dir, s3_env, bucket, tmp_path):
    export = f"{bucket}/export"
    shutil.copytree(tiny_export_dir, tmp_path / "export")
    storage.upload_folder(tmp_path / "export", export)
    env = cli_env(**s3_env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with harness.ray_nodes(env, worker_cpus=2) as cluster:
        on_cluster = ["--ray-address", cluster.address, "--replicas", "2"]
        server = start_stepwise(*serve_args([export], port, flags=on_cluster),
                                env=env | {"STEPWISE_CACHE": str(tmp_path / "driver-cache")},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            wait_until_ready(f"{url}/healthz", 300, server)
            deadline = time.monotonic() + 120
            # Serve spreads the replicas over the nodes
            while sorted(cluster.running(REPLICA)) != [0, 1]:
                assert time.monotonic() < deadline, f"replicas not one per node: {cluster.running(REPLICA)}"
                time.sleep(0.5)
            for node in (0, 1):  # each node downloaded the export into its own cache and verified it there
                assert [p for p in (cluster.disk(node) / "cache").iterdir() if not p.name.startswith(".")]
            with httpx.Client(base_url=url, timeout=30) as client:
                assert all(client.post("/v1/predict", json=REQUEST).status_code == 200 for _ in range(8))
                cluster.kill_node(0)
                answers = []
                deadline = time.monotonic() + 180
                while cluster.running(REPLICA) != [1, 1] or len(answers) < 20:  # the lost replica comes back
                    assert time.monotonic() < deadline, f"not replaced: {cluster.running(REPLICA)}"
                    try:
                        answers.append(client.post("/v1/predict", json=REQUEST).status_code)
                    except httpx.TransportError:
                        answers.append(0)
                    time.sleep(0.1)
                after = [client.post("/v1/predict", json=REQUEST) for _ in range(20)]
        finally:
            server.terminate()
            output, _ = server.communicate(timeout=120)
    failed = [code for code in answers if code != 200]
    assert len(failed) <= 2, f"{len(failed)} of {len(answers)} requests failed after the node died: {answers}"
    assert all(r.status_code == 200 and r.json()["predictions"][0]["label"] in tasks.NLI_LABELS for r in after)
    assert server.returncode == 0 and "shutting down" in output, output[-3000:]
