"""The loopback cluster the scale-out tests run on is what they claim: three raylets, work on each worker node
reaching the object store from there, and a worker node's raylet killed with SIGKILL seen dead by the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from benchmarks import harness
from stepwise import storage

from helpers import ROOT, cli_env

pytestmark = pytest.mark.slow

ON_EACH_NODE = """
import json, sys, ray
from stepwise import storage
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=1)
def write(node, target):
    storage.write_bytes(f"{target}/from-{node}", ray.get_runtime_context().get_node_id().encode())
    return ray.get_runtime_context().get_node_id()

ids = ray.get([write.options(resources={f"node-{i}": 1}).remote(i, sys.argv[2]) for i in (0, 1)])
print("seen:", json.dumps({"ids": ids, "alive": sum(n["Alive"] for n in ray.nodes())}))
"""


def test_three_raylets_reach_the_object_store_and_a_killed_node_is_seen_dead(s3_env, bucket):
    env = cli_env(**s3_env)
    with harness.ray_nodes(env) as cluster:
        run = subprocess.run([sys.executable, "-c", ON_EACH_NODE, cluster.address, bucket], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        # Ray may print notices of its own to stdout: the result is the marked line
        seen = json.loads([line for line in run.stdout.splitlines() if line.startswith("seen: ")][-1][len("seen: ") :])
        assert seen["alive"] == 3 and len(set(seen["ids"])) == 2
        assert [storage.read_bytes(f"{bucket}/from-{i}").decode() for i in (0, 1)] == seen["ids"]

        cluster.kill_node(1)
        deadline = time.monotonic() + 120
        while harness.alive_nodes(cluster.address, env) != 2:
            assert time.monotonic() < deadline, "the killed node is still counted alive"
            time.sleep(2)
