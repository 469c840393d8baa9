"""The KubeRay RayJob runs a `stepwise extract` command its signature accepts, on the object store, with one vLLM
engine per GPU worker (issue 18, item 4)."""

from __future__ import annotations

import re
import shlex

import yaml

from stepwise import cli, storage
from stepwise.extraction import run as extraction_run

from helpers import ROOT

RAY_PIN = re.search(r'"ray\[data\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def test_the_rayjob_runs_an_extract_command_its_signature_accepts():
    job = yaml.safe_load((ROOT / "extraction" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == RAY_PIN
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "stepwise", "extract"]
    options = cli.arguments(extraction_run.main, argv[4:])
    assert options["cluster"].on_ray and options["cluster"].ray_address == "auto"
    assert storage.is_remote(options["out"]) and storage.is_remote(options["task"])  # the pods share no disk
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == options["cluster"].ray_actors  # one engine per GPU worker
