"""Settings, the request schema and request parsing of the serving app, without starting Ray."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from fastapi import HTTPException
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from stepwise import artifacts, tasks
from stepwise.export.run import ServedRequests, providers_for
from stepwise.serving import app, lifecycle, run, schema
from stepwise.serving.settings import GROUPS, BatchingOptions, FallbackOptions, LimitOptions, ScalingOptions, ServeArgs

from helpers import ROOT


def test_serve_config_file_is_valid_and_builds(tiny_export_dir):
    config = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    (application,) = ServeDeploySchema.model_validate(config).applications
    assert application.import_path == "stepwise.serving.app:build_app"
    args = ServeArgs.from_dict(application.args | {"models": {"esnli": str(tiny_export_dir)}})
    options = app.build_app(
        application.args | {"models": {"esnli": str(tiny_export_dir)}}
    )._bound_deployment._deployment_config
    assert options.max_ongoing_requests == args.batching.max_ongoing_requests >= args.batching.max_batch_size
    assert options.max_queued_requests == args.overload.max_queued_requests
    # Every setting is in the config file, with the defaults `stepwise serve` uses.
    assert set(application.args) == {f.name for f in dataclasses.fields(ServeArgs)}
    for name, group in GROUPS.items():
        assert application.args[name] == dataclasses.asdict(group()), name


def test_autoscaling_settings_become_the_deployment_config(tiny_export_dir):
    args = ServeArgs(
        models={"esnli": str(tiny_export_dir)},
        scaling=ScalingOptions(min_replicas=1, max_replicas=3, target_ongoing_requests=4),
    )
    autoscaling = app.build_app(args)._bound_deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 4)


def test_replicas_get_every_setting_in_one_dict_with_the_model_folders_checked(tiny_export_dir):
    args = ServeArgs(models={"esnli": str(tiny_export_dir)}, limits=LimitOptions(max_items=4), access_log=True)
    (bound,) = app.build_app(args)._bound_deployment.init_args
    checked = app.check_models(args.models, args.allow_unverified)
    assert ServeArgs.from_dict(bound) == dataclasses.replace(args, models=checked)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(5\) must be at least max_batch_size \(16\)"):
        BatchingOptions(max_ongoing_requests=5, max_batch_size=16)
    with pytest.raises(ValueError, match=r"max_replicas \(1\) is below min_replicas \(2\)"):
        ScalingOptions(min_replicas=2, max_replicas=1)
    with pytest.raises(ValueError, match="no models"):
        ServeArgs(models={})
    with pytest.raises(ValueError, match="max_choices must be at most 26"):
        LimitOptions(max_choices=30)
    with pytest.raises(ValueError, match="unknown keys in serve settings: max_itemz"):
        ServeArgs.from_dict({"models": {"a": "b"}, "limits": {"max_itemz": 3}})
    # The Serve config file's args are read as `stepwise serve --config` reads a file: a key under another group's
    # table is named with where it belongs.
    with pytest.raises(
        ValueError, match=r"serve settings: max_items is not an option of \[batching\]; it belongs at \[limits\]"
    ):
        ServeArgs.from_dict({"models": {"a": "b"}, "batching": {"max_items": 3}})


def test_the_fallback_table_under_its_earlier_name_still_reads_with_a_warning(capsys):
    teacher = {"fallback": "http://127.0.0.1:9", "fallback_model": "m", "fallback_margin": 0.2}
    old = ServeArgs.from_dict({"models": {"a": "b"}, "cascade": teacher})
    assert old == ServeArgs.from_dict({"models": {"a": "b"}, "fallback": teacher})
    assert old.fallback == FallbackOptions(**teacher)
    assert "serve settings: cascade is deprecated and goes in the next release: use fallback" in capsys.readouterr().err


def test_model_specs_and_folders(tiny_export_dir, tmp_path):
    assert run.parse_models([str(tiny_export_dir), f"other={tiny_export_dir}"]) == {
        "esnli": str(tiny_export_dir),
        "other": str(tiny_export_dir),
    }
    with pytest.raises(ValueError, match="given twice"):
        run.parse_models([str(tiny_export_dir), str(tiny_export_dir)])
    tasks.save_task(tasks.get_task("esnli"), tmp_path)  # a task.json but no ONNX export
    with pytest.raises(ValueError, match="not an export folder"):
        app.check_models({"esnli": str(tmp_path)}, allow_unverified=False)


@pytest.mark.parametrize(
    "report,reason",
    [
        (None, "has no parity.json"),
        ({"skipped": True, "passed": False, "failures": []}, "parity gate skipped"),
        (
            {"skipped": False, "passed": False, "failures": ["greedy_agreement 0.5 < 0.99"]},
            "failed its parity gate (greedy_agreement 0.5 < 0.99)",
        ),
    ],
)
def test_unverified_exports_are_refused_unless_allowed(tiny_export_dir, tmp_path, report, reason):
    export = Path(shutil.copytree(tiny_export_dir, tmp_path / "export"))
    (export / artifacts.PARITY).unlink()
    if report is not None:
        artifacts.write_json(export / artifacts.PARITY, report)
    with pytest.raises(ValueError, match=rf"{re.escape(reason)}.*--allow-unverified"):
        app.check_models({"esnli": str(export)}, allow_unverified=False)
    assert app.check_models({"esnli": str(export)}, allow_unverified=True) == {"esnli": str(export)}


def tensorrt_export(export: Path, folder: Path, task: str, served: ServedRequests) -> str:
    """A copy of `export` whose config asks for TensorRT with the profiles `stepwise export --target tensorrt` writes
    for `served` and `task` (no GPU needed: serving's check reads the config, it builds no engine)."""
    copy = Path(shutil.copytree(export, folder))
    tasks.save_task(tasks.get_task(task), copy)
    config = artifacts.read_export_config(copy)
    label = config["max_new_tokens"]["label"]
    limits = {"input": config["max_input_tokens"], "label": label, "label_tokens": label}
    limits["rationale"] = config["max_new_tokens"]["rationale"]
    config["providers"] = providers_for("tensorrt", "fp16", served, tasks.load_task(copy), limits, config["model"])
    artifacts.write_json(copy / artifacts.EXPORT_CONFIG, config)
    return str(copy)


@pytest.mark.parametrize(
    "task,served,batching,shortfall",
    [
        ("esnli", ServedRequests(max_batch=8), BatchingOptions(),
         "at most 24 rows for decoder_with_past input_ids, fewer than the max_batch_size=16 x 3 candidates = 48"),
        ("esnli", ServedRequests(), BatchingOptions(max_batch_size=32),
         "at most 48 rows for decoder_with_past input_ids, fewer than the max_batch_size=32 x 3 candidates = 96"),
        ("cqa", ServedRequests(max_choices=8), BatchingOptions(),
         "at most 128 rows for decoder_with_past input_ids, fewer than the max_batch_size=16 x max_choices=16 = 256"),
        ("cqa", ServedRequests(max_choice_tokens=8), BatchingOptions(),
         "at most 8 tokens for decoder_with_past input_ids, fewer than the max_choice_tokens=32"),
    ],
)  # fmt: skip
def test_a_tensorrt_export_narrower_than_the_servers_limits_is_refused(
    tiny_export_dir, tmp_path, task, served, batching, shortfall
):
    folder = tensorrt_export(tiny_export_dir, tmp_path / "trt", task, served)
    with pytest.raises(ValueError) as refused:
        app.build_app(ServeArgs(models={task: folder}, batching=batching))
    message = str(refused.value)
    assert message.startswith(f"model {task!r}: {folder} has a TensorRT profile of {shortfall} this server accepts; ")
    assert "re-export it with `stepwise export --target tensorrt --max-batch" in message and "\n" not in message


@pytest.mark.parametrize("task", ["esnli", "cqa"])
def test_exports_default_tensorrt_profiles_cover_every_request_serving_accepts(tiny_export_dir, tmp_path, task):
    folder = tensorrt_export(tiny_export_dir, tmp_path / "trt", task, ServedRequests())
    app.build_app(ServeArgs(models={task: folder}))


def test_an_export_without_tensorrt_is_served_whatever_the_limits(tiny_export_dir):
    """A CPU export has no shape profiles: ONNX Runtime's CPU provider takes any shape."""
    limits = LimitOptions(max_choices=26, max_choice_tokens=512)
    app.build_app(
        ServeArgs(models={"esnli": str(tiny_export_dir)}, batching=BatchingOptions(max_batch_size=64), limits=limits)
    )


SERVED = {"esnli": tasks.get_task("esnli"), "cqa": tasks.get_task("cqa")}
TICKETS = tasks.Task("tickets", "label", labels=["bug", "question"], input_template="Title: {title}\nBody: {body}")


def request(body: dict, limits: LimitOptions = LimitOptions(max_items=4, max_input_chars=50), served: dict = SERVED):
    return schema.predict_request_model(limits, served).model_validate(body)


def test_request_schema_states_the_limits_the_server_enforces():
    model = schema.predict_request_model(
        LimitOptions(max_items=4, max_input_chars=50, max_choices=3), {"esnli": SERVED["esnli"], "cqa": SERVED["cqa"]}
    )
    text = json.dumps(model.model_json_schema())
    for constraint in (
        '"maxItems": 4',
        '"maxLength": 50',
        '"maxItems": 3',
        '"minLength": 1',
        '"pattern": "[^\\\\s',
        '"additionalProperties": false',
        '"enum": ["esnli", "cqa"]',
    ):
        assert constraint in text, constraint


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"inputs": "ok \ud800"}, 422, "inputs: not valid Unicode text"),
        ({"inputs": [{"premise": "a", "hypothesis": "b \udfff"}]}, 422, "inputs.0.hypothesis: not valid Unicode text"),
        ({"inputs": ["a"] * 5}, 413, "inputs: 5 items, more than max_items=4"),
        (
            {"inputs": {"question": "q", "choices": ["x" * 201]}},
            413,
            "inputs.choices.0: 201 characters, more than max_choice_chars=200",
        ),
        ({"inputs": {"premise": "a"}}, 422, "inputs.hypothesis: required field missing"),
        ({"inputs": {"premise": "a", "hypothesis": "b", "input": "c"}}, 422, "inputs.premise: unknown field"),
        ({"inputs": "a", "model": "svamp"}, 404, "model 'svamp' is not served; models: 'esnli' or 'cqa'"),
    ],
)
def test_request_problems_become_a_status_and_a_message_naming_the_field(body, status, message):
    with pytest.raises(ValidationError) as caught:
        request(body)
    problems = [dict(p, loc=("body", *p["loc"])) for p in caught.value.errors()]  # as FastAPI reports them
    got_status, got_message = schema.describe_problems(problems, LimitOptions(max_items=4, max_input_chars=50))
    assert got_status == status and got_message.startswith(message), got_message


def test_inputs_become_task_examples():
    esnli, cqa = tasks.get_task("esnli"), tasks.get_task("cqa")
    nli = schema.to_example(
        request({"inputs": {"premise": "A dog runs.", "hypothesis": "An animal moves."}}).inputs, esnli, "inputs"
    )
    assert nli.input == tasks.nli_input("A dog runs.", "An animal moves.") and nli.choices is None
    question = schema.to_example(
        request({"inputs": {"question": "Where?", "choices": ["home", "park"]}}).inputs, cqa, "inputs"
    )
    assert question.input == tasks.cqa_input("Where?", ["home", "park"]) and question.choices == ["home", "park"]
    assert (
        schema.to_example(
            request({"inputs": {"input": "Where?", "choices": ["home", "park"]}}).inputs, cqa, "inputs"
        ).input
        == question.input
    )
    with pytest.raises(HTTPException, match="multiple-choice"):
        schema.to_example("Where?", cqa, "inputs.3")
    with pytest.raises(HTTPException, match="labels are fixed"):
        schema.to_example(request({"inputs": {"input": "q", "choices": ["a", "b"]}}).inputs, esnli, "inputs")


def test_a_custom_task_takes_its_own_input_fields():
    served = {"tickets": TICKETS, "esnli": SERVED["esnli"]}
    body = request(
        {"inputs": [{"title": "Crash", "body": "It fails on start."}, {"premise": "a", "hypothesis": "b"}]},
        served=served,
    )
    assert schema.to_example(body.inputs[0], TICKETS, "inputs.0").input == "Title: Crash\nBody: It fails on start."
    assert schema.to_example(body.inputs[1], SERVED["esnli"], "inputs.1").input == tasks.nli_input("a", "b")
    with pytest.raises(HTTPException, match="inputs.1: missing or empty field 'title'"):
        schema.to_example(body.inputs[1], TICKETS, "inputs.1")  # esnli's fields sent to the tickets model
    with pytest.raises(ValidationError, match="body"):
        request({"inputs": {"title": "Crash"}}, served=served)  # the form with the most shared fields, incomplete
    assert '"title"' in json.dumps(schema.predict_request_model(LimitOptions(), served).model_json_schema())


def test_replicas_reserve_a_gpu_when_the_export_targets_one(tiny_export_dir, tmp_path):
    def actor_options(folder: Path, **scaling) -> dict:
        return app.build_app(
            ServeArgs(models={"m": str(folder)}, scaling=ScalingOptions(**scaling))
        )._bound_deployment.ray_actor_options

    assert actor_options(tiny_export_dir)["num_gpus"] == 0
    gpu_export = Path(shutil.copytree(tiny_export_dir, tmp_path / "gpu-export"))
    config = json.loads((gpu_export / artifacts.EXPORT_CONFIG).read_text())
    (gpu_export / artifacts.EXPORT_CONFIG).write_text(json.dumps(config | {"target": "cuda"}))
    assert actor_options(gpu_export)["num_gpus"] == 1
    assert actor_options(gpu_export, replica_gpus=0.5)["num_gpus"] == 0.5


def test_network_settings_keep_ray_on_loopback_and_require_auth_beyond_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    local = lifecycle.ray_environment("127.0.0.1", tmp_path, tmp_path / "hx")
    assert local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and local["RAY_AUTH_MODE"] == "disabled"
    public = lifecycle.ray_environment("0.0.0.0", tmp_path, tmp_path / "hx")
    assert public["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and public["RAY_AUTH_MODE"] == "token"
    token = Path(public["RAY_AUTH_TOKEN_PATH"])
    assert len(token.read_text()) == 64 and token.stat().st_mode & 0o077 == 0  # readable by its owner only
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ValueError, match="beyond loopback, which needs Ray's token authentication"):
        lifecycle.ray_environment("0.0.0.0", tmp_path, tmp_path / "hx")


def test_stepwise_serve_refuses_bad_folders_settings_and_taken_ports_before_starting_ray(tiny_export_dir, tmp_path):
    import socket

    import ray

    with pytest.raises(FileNotFoundError, match="has no task.json"):
        run.main(model=[str(tmp_path)])
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(4\) must be at least max_batch_size \(16\)"):
        run.main(model=[str(tiny_export_dir)], batching=BatchingOptions(max_ongoing_requests=4))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"HTTP port {port} on 127.0.0.1 is not available"):
            run.main(model=[str(tiny_export_dir)], port=port, run_dir=tmp_path / "run")
        with pytest.raises(ValueError, match=f"metrics port {port} on 127.0.0.1 is not available"):
            run.main(model=[str(tiny_export_dir)], port=0, metrics_port=port, run_dir=tmp_path / "run")
    assert not ray.is_initialized()
