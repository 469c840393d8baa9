"""Settings and request parsing of the serving app, without starting Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from fastapi import HTTPException
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from stepwise.serving import app
from stepwise import tasks

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_file_is_valid_and_builds(tiny_export_dir):
    config = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "stepwise.serving.app:build_app"
    args = app.ServeArgs.model_validate(application.args | {"models": {"esnli": str(tiny_export_dir)}})
    options = app.build_app(args)._bound_deployment._deployment_config
    assert options.max_ongoing_requests == args.max_ongoing_requests >= args.max_batch_size
    assert options.max_queued_requests == args.max_queued_requests
    # Every `stepwise serve` setting is in the config file and vice versa.
    assert set(application.args) == set(app.ServeArgs.model_fields)


def test_autoscaling_settings_become_the_deployment_config(tiny_export_dir):
    args = app.ServeArgs(models={"esnli": str(tiny_export_dir)}, min_replicas=1, max_replicas=3, target_ongoing_requests=4)
    scaling = app.build_app(args)._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValidationError, match="max_ongoing_requests .5. must be at least max_batch_size .16."):
        app.ServeArgs(models={"a": "b"}, max_ongoing_requests=5, max_batch_size=16)
    with pytest.raises(ValidationError, match="max_replicas .1. is below min_replicas .2."):
        app.ServeArgs(models={"a": "b"}, min_replicas=2, max_replicas=1)
    with pytest.raises(ValidationError, match="models"):
        app.ServeArgs(models={})


def test_model_specs_and_folders(tiny_export_dir, tmp_path):
    assert app.parse_models([str(tiny_export_dir), f"other={tiny_export_dir}"]) == {"esnli": str(tiny_export_dir), "other": str(tiny_export_dir)}
    with pytest.raises(ValueError, match="given twice"):
        app.parse_models([str(tiny_export_dir), str(tiny_export_dir)])
    tasks.save_task(tasks.get_task("esnli"), tmp_path)  # a task.json but no ONNX export
    with pytest.raises(ValueError, match="not an export folder"):
        app.check_models({"esnli": str(tmp_path)})


def test_inputs_become_task_examples():
    esnli, cqa = tasks.get_task("esnli"), tasks.get_task("cqa")
    nli = app.to_example(app.InputItem(premise="A dog runs.", hypothesis="An animal moves."), esnli, "inputs", 100)
    assert nli.input == tasks.nli_input("A dog runs.", "An animal moves.") and nli.choices is None
    question = app.to_example(app.InputItem(question="Where?", choices=["home", "park"]), cqa, "inputs", 100)
    assert question.input == tasks.cqa_input("Where?", ["home", "park"]) and question.choices == ["home", "park"]
    assert app.to_example(app.InputItem(input="Where?", choices=["home", "park"]), cqa, "inputs", 100).input == question.input
    with pytest.raises(HTTPException, match="multiple-choice"):
        app.to_example("Where?", cqa, "inputs.3", 100)
    with pytest.raises(HTTPException, match="inputs.0.choices.1: empty input"):
        app.to_example(app.InputItem(question="Where?", choices=["home", " "]), cqa, "inputs.0", 100)


def test_replicas_reserve_a_gpu_when_the_export_targets_one(tiny_export_dir, tmp_path):
    def actor_options(folder: Path, **settings) -> dict:
        args = app.ServeArgs(models={"m": str(folder)}, **settings)
        return app.build_app(args)._bound_deployment.ray_actor_options

    assert actor_options(tiny_export_dir)["num_gpus"] == 0
    gpu_export = tmp_path / "gpu-export"
    shutil.copytree(tiny_export_dir, gpu_export)
    config = json.loads((gpu_export / "export_config.json").read_text())
    (gpu_export / "export_config.json").write_text(json.dumps(config | {"target": "cuda"}))
    assert actor_options(gpu_export)["num_gpus"] == 1
    assert actor_options(gpu_export, replica_gpus=0.5)["num_gpus"] == 0.5


def test_stepwise_serve_refuses_bad_folders_and_settings_before_starting_ray(tiny_export_dir, tmp_path):
    with pytest.raises(SystemExit, match="has no task.json"):
        app.main(model=[str(tmp_path)])
    with pytest.raises(SystemExit, match=r"max_ongoing_requests \(4\) must be at least max_batch_size \(16\)"):
        app.main(model=[str(tiny_export_dir)], max_ongoing_requests=4)
