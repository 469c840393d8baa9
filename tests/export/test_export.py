"""`stepwise export` end to end on tiny students: the folder it writes, the parity gate, int8, fp16,
and the errors it gives for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stepwise import artifacts, tasks
from stepwise.export import parity
from stepwise.export.run import ParityOptions, ServedRequests
from stepwise.export.run import main as export_main
from stepwise.export.runtime import configured_providers, load_runtime, predict

from helpers import stepwise


def test_export_folder_is_self_contained(tiny_export_dir, tmp_path):
    config = json.loads((tiny_export_dir / "export_config.json").read_text())
    for name in [*config["files"].values(), "task.json", "parity.json", "tokenizer.json", "config.json"]:
        assert (tiny_export_dir / name).exists(), name
    assert config["providers"] == [{"name": "CPUExecutionProvider"}] and config["precision"] == "fp32"
    # Moved away from the student folder it came from, it still loads and predicts.
    moved = shutil.copytree(tiny_export_dir, tmp_path / "moved")
    runtime = load_runtime(moved, threads=1)
    labels = [p.label for p in predict(runtime, tasks.load_split(runtime.task, "valid")[:4])]
    assert set(labels) <= set(runtime.task.labels)


def test_fp32_parity_report(tiny_export_dir):
    report = json.loads((tiny_export_dir / "parity.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert report["examples"] == 32 and report["served_path"] == "fast_path"
    assert report["greedy_agreement"] >= 0.99 and report["fast_path_agreement"] >= 0.99
    assert 0 < report["max_abs_logit_diff"] < 1e-3
    assert report["max_abs_probability_diff"] < 1e-4  # the batched label path's probabilities against PyTorch's


def test_gate_names_each_failure():
    report = {
        "served_path": "greedy",
        "greedy_agreement": 0.5,
        "fast_path_agreement": None,
        "accuracy_delta": -0.1,
        "max_abs_logit_diff": 0.5,
    }
    failures = parity.gate(report, "fp32", min_agreement=0.99, max_accuracy_drop=0.02, max_logit_diff=1e-3)
    assert (
        len(failures) == 3
        and "greedy_agreement" in failures[0]
        and "accuracy" in failures[1]
        and "logit" in failures[2]
    )
    assert parity.gate(report | {"greedy_agreement": 1.0, "accuracy_delta": 0.0}, "int8", 0.9, 0.02, 1e-3) == []


def test_bad_input_gives_clear_errors(tiny_student_dir, tiny_export_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        export_main(model=tmp_path / "nope", out=tmp_path / "out")
    with pytest.raises(ValueError, match="not a trained student folder"):
        export_main(model=tiny_export_dir, out=tmp_path / "out")  # an export folder has no weights
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_main(model=tiny_student_dir, out=tiny_export_dir)
    with pytest.raises(ValueError, match="split decoder layout"):
        export_main(model=tiny_student_dir, out=tmp_path / "out", target="tensorrt", decoder_layout="merged")
    with pytest.raises(ValueError, match="choose one of"):
        export_main(model=tiny_student_dir, out=tmp_path / "out", quantize="int8", precision="fp16")
    with pytest.raises(ValueError, match="parity-limit"):
        ParityOptions(parity_limit=-1)
    with pytest.raises(ValueError, match="--max-choice-tokens must be 1 or more, got 0"):
        ServedRequests(max_choice_tokens=0)


def test_overwrite_never_deletes_the_model_or_a_foreign_folder(tiny_student_dir, tmp_path):
    model = Path(shutil.copytree(tiny_student_dir, tmp_path / "runs" / "s"))
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "onnx", model.parent):  # the model, a folder inside it, a folder holding it
        with pytest.raises(ValueError, match="is the model folder, holds it or lies inside it"):
            export_main(model=model, out=out, overwrite=True)
    assert sorted(p.name for p in model.iterdir()) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="replaces only a folder `stepwise export` wrote"):
        export_main(model=model, out=foreign, overwrite=True)
    assert (foreign / "todo.txt").read_text() == "keep me"


@pytest.mark.slow
def test_cli_int8_export_reports_accuracy_delta(tiny_student_dir, tiny_export_dir, tmp_path):
    out = tmp_path / "int8"
    done = stepwise(
        "export",
        "--model",
        str(tiny_student_dir),
        "--out",
        str(out),
        "--quantize",
        "int8",
        "--parity-limit",
        "32",
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy" in done.stdout and "delta" in done.stdout
    config = json.loads((out / "export_config.json").read_text())
    report = json.loads((out / "parity.json").read_text())
    assert config["precision"] == "int8" and all(name.endswith("_int8.onnx") for name in config["files"].values())
    assert report["passed"] and report["accuracy_delta"] >= -0.02
    int8_bytes = sum((out / n).stat().st_size for n in config["files"].values())
    fp32_bytes = sum(
        (tiny_export_dir / n).stat().st_size
        for n in json.loads((tiny_export_dir / "export_config.json").read_text())["files"].values()
    )
    assert int8_bytes < 0.75 * fp32_bytes


@pytest.mark.slow
def test_cli_fails_loudly_when_parity_fails(tiny_student_dir, tmp_path):
    out = tmp_path / "strict"
    done = stepwise(
        "export",
        "--model",
        str(tiny_student_dir),
        "--out",
        str(out),
        "--parity-limit",
        "16",
        "--max-logit-diff",
        "1e-12",
        check=False,
    )
    assert done.returncode == 1
    assert (
        "PARITY FAILED" in done.stderr
        and "parity gate failed" in done.stderr
        and "max abs logit difference" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not out.exists(), "a failed export must not land where serving would load it"
    rejected = tmp_path / "strict.rejected"
    assert json.loads((rejected / "parity.json").read_text())["passed"] is False  # kept for inspection
    assert not list(tmp_path.glob(".strict.*")), "no staging folder left behind"


@pytest.mark.slow
def test_skipped_gate_is_written_as_unverified_and_overwrite_replaces_an_export(tiny_student_dir, tmp_path):
    out = tmp_path / "unverified"
    assert export_main(model=tiny_student_dir, out=out, parity=ParityOptions(parity_limit=0)) == out
    report = json.loads((out / "parity.json").read_text())
    assert report["skipped"] is True and report["passed"] is False
    assert "| parity gate | skipped (--parity-limit 0): unverified" in (out / "README.md").read_text()
    version = json.loads((out / "export_config.json").read_text())["exported_at"]
    assert export_main(model=tiny_student_dir, out=out, parity=ParityOptions(parity_limit=8), overwrite=True) == out
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    assert json.loads((out / "export_config.json").read_text())["exported_at"] >= version


@pytest.mark.slow
def test_one_export_per_out_and_an_interrupted_replacement_is_put_back(tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    with artifacts.folder_lock(tmp_path / ".onnx.export.lock", "export", out):  # another export on this --out
        with pytest.raises(ValueError, match=f"{out} is being written by another `stepwise export`"):
            export_main(model=tiny_student_dir, out=out, parity=ParityOptions(parity_limit=0))
    export_main(model=tiny_student_dir, out=out, parity=ParityOptions(parity_limit=0))
    version = json.loads((out / "export_config.json").read_text())["version"]
    out.rename(artifacts.previous_name(out))  # what a kill between the two renames of a replacement leaves
    with pytest.raises(ValueError, match="pass --overwrite to replace an earlier export"):
        export_main(model=tiny_student_dir, out=out, parity=ParityOptions(parity_limit=0))
    assert "put back the export an interrupted replacement had moved aside" in capsys.readouterr().out
    assert json.loads((out / "export_config.json").read_text())["version"] == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"], "no lock, staging or .previous folder left"


@pytest.mark.slow
def test_fp16_gpu_export_writes_tensorrt_options_and_runs_on_cpu(tiny_student_dir, tmp_path):
    """The GPU artifact: fp16 with T5's overflow-prone ops kept in fp32, TensorRT EP options in the config, shape
    profiles for the batch it will be served with (and parity run in batches no larger). No GPU here: ONNX Runtime
    falls back to the CPU EP, where the fp16 model must still agree with PyTorch."""
    out = tmp_path / "trt"
    served = ServedRequests(max_batch=4)
    parity_options = ParityOptions(parity_limit=16)
    assert (
        export_main(
            model=tiny_student_dir, out=out, precision="fp16", target="tensorrt", served=served, parity=parity_options
        )
        == out
    )
    config = json.loads((out / "export_config.json").read_text())
    trt = config["providers"][0]
    assert [p["name"] for p in config["providers"]] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert trt["options"]["trt_fp16_enable"] and trt["options"]["trt_engine_cache_enable"] and config["io_binding"]
    assert set(trt["profiles"]) == {"encoder", "decoder", "decoder_with_past"} and config["decoder_layout"] == "split"
    # What serving hands ONNX Runtime on a GPU box, per session: the session's own shape profile, the cache in the
    # folder.
    name, options = configured_providers(out, config, "decoder_with_past")[0]
    assert name == "TensorrtExecutionProvider" and options["trt_engine_cache_path"] == str(
        (out / "trt_cache").resolve()
    )
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
    assert (
        "past_key_values.0.encoder.key:" in options["trt_profile_max_shapes"]
        and "encoder_hidden_states" not in options["trt_profile_max_shapes"]
    )
    new_tokens = options["trt_profile_max_shapes"].split("input_ids:")[1].split(",")[0].split("x")[1]
    assert (
        int(new_tokens) == config["max_new_tokens"]["label"] > 1
    )  # label scoring feeds a candidate's remaining tokens in one call
    import onnx

    decoder = onnx.load(str(out / config["files"]["decoder"]))
    weight_types = {t.name: t.data_type for t in decoder.graph.initializer}
    ffn = {
        n.name: weight_types[n.input[1]]
        for n in decoder.graph.node
        if n.op_type == "MatMul" and "/DenseReluDense/" in n.name
    }
    assert ffn and all(t == onnx.TensorProto.FLOAT for name, t in ffn.items() if "/wo/" in name)  # overflow-prone: fp32
    assert all(t == onnx.TensorProto.FLOAT16 for name, t in ffn.items() if "/wi" in name)
    report = json.loads((out / "parity.json").read_text())
    assert report["providers"] == ["CPUExecutionProvider"] and report["passed"] and report["batch_size"] == 4
    assert trt["profiles"]["decoder_with_past"]["trt_profile_max_shapes"].startswith("input_ids:12x")  # 4 x 3 labels


@pytest.mark.slow
def test_choice_task_scores_each_examples_choices_and_open_task_generates(choice_and_open_students, tmp_path):
    for name, student in choice_and_open_students.items():
        out = tmp_path / name
        assert (
            export_main(model=student, out=out, parity=ParityOptions(parity_limit=16), decoder_layout="merged") == out
        )
        runtime = load_runtime(out, threads=1)
        examples = tasks.load_split(runtime.task, "valid")[:8]
        predictions = predict(runtime, examples)
        model, tokenizer = parity.load_torch_model(student)
        if name == "cqa":
            assert all(p.label in e.choices for p, e in zip(predictions, examples, strict=True))
            assert [p.label for p in predictions] == parity.torch_fast_path_labels(
                model, tokenizer, runtime.task, examples
            )
        else:
            assert not runtime.task.closed_label_set
            expected = parity.torch_greedy_labels(
                model,
                tokenizer,
                [tasks.label_input(e) for e in examples],
                runtime.export_config["max_new_tokens"]["label"],
            )
            assert [p.label for p in predictions] == expected
