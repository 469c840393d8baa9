"""Scale-out with Ray Data on a local Ray: an actor pool of real CPU vLLM engines writing the shards."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stepwise import artifacts, cli, tasks
from stepwise.extraction import read_records

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray(run_dir):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(run_dir / "ray"), log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_actor_pool_extracts_and_resumes(tiny_teacher, tmp_path, local_ray):
    out = tmp_path / "out"
    args = [
        "extract",
        "--task",
        "esnli",
        "--split",
        "valid",
        "--teacher",
        "vllm",
        "--model",
        str(tiny_teacher),
        "--on-ray",
        "--ray-actors",
        "1",
        "--chunk-size",
        "3",
        "--max-tokens",
        "16",
        "--enforce-eager",
        "--out",
        str(out),
    ]
    cli.main([*args, "--limit", "9"])
    assert len(artifacts.shard_paths(out)) == 3
    # the same job with more inputs continues: only the new ones go through the engines
    cli.main([*args, "--limit", "12"])
    records = read_records(out)
    wanted = {e.id for e in tasks.load_split(tasks.get_task("esnli"), "valid")[:12]}
    counts = Counter(r["id"] for r in records)
    assert set(counts) == wanted and set(counts.values()) == {1}
    assert all(
        r["tokens_in"] > 100 and 0 < r["tokens_out"] <= 16 and r["status"] in ("ok", "malformed") for r in records
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["last_run"]["records_this_run"] == 3 and manifest["shards"] == 4
