"""The KubeRay RayService is what a cluster would take: its embedded Serve config passes Ray's own schema and the
app's settings validation and keeps every setting of serving/serve_config.yaml; no credential is written in it or in
extraction/rayjob.yaml (issue 18, item 4; the RayJob's command is checked in tests/extraction/test_kuberay.py)."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import yaml
from ray.serve.schema import ServeDeploySchema

from stepwise import storage
from stepwise.serving.settings import ServeArgs

from helpers import ROOT

RAY_PIN = re.search(r'"ray\[[^]]+\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
# What the cluster changes from serve_config.yaml's local defaults, and why: the pods' address, a proxy per node,
# the model on the object store, a replica per worker node with room to scale.
CLUSTER_SETTINGS = {("http_options", "host"), ("proxy_location",), ("args", "models"), ("args", "scaling")}


def manifest(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_the_rayservice_carries_a_serve_config_the_app_accepts():
    service = manifest("serving/rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == RAY_PIN
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = ServeDeploySchema.model_validate(serve_config).applications
    args = ServeArgs.from_dict(application.args)  # the app's own validation of every group
    assert all(storage.is_remote(folder) for folder in args.models.values())
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert args.scaling.min_replicas == workers["minReplicas"]  # a replica per worker node

    local = manifest("serving/serve_config.yaml")
    local_app, cluster_app = local["applications"][0], serve_config["applications"][0]
    assert set(cluster_app["args"]) == {f.name for f in dataclasses.fields(ServeArgs)} == set(local_app["args"])
    for name, value in local_app["args"].items():
        if ("args", name) not in CLUSTER_SETTINGS:
            assert cluster_app["args"][name] == value, f"serveConfigV2 args.{name} drifted from serve_config.yaml"
    for key in ("import_path", "route_prefix", "runtime_env"):
        assert cluster_app[key] == local_app[key], key
    assert serve_config["http_options"]["request_timeout_s"] == local["http_options"]["request_timeout_s"]


def containers(node: object) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    if isinstance(node, dict):
        found = [c for c in node.get("containers", [])]
        return found + [c for value in node.values() for c in containers(value)]
    return [c for value in node for c in containers(value)] if isinstance(node, list) else []


def test_no_credentials_are_written_in_the_manifests():
    """Keys come from the pods' role or a Secret: no literal value for a secret-looking variable, none on a command."""
    for path in ("extraction/rayjob.yaml", "serving/rayservice.yaml"):
        found = containers(manifest(path))
        assert len(found) == 2, path  # the head's and the worker group's
        for container in found:
            literal = [e["name"] for e in container.get("env", []) if re.search("SECRET|KEY|TOKEN|PASSWORD", e["name"])]
            assert literal == [], f"{path}: {literal} written in the manifest"
        assert "--api-key" not in manifest(path)["spec"].get("entrypoint", ""), path


def test_the_image_installs_what_pyproject_pins():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(p.startswith(f"ray[serve,train]=={RAY_PIN}") for p in pins["student"])
    assert any(p.startswith(f"ray[data]=={RAY_PIN}") for p in pins["teacher"])
