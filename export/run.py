"""`stepwise export`: a trained student folder -> a self-contained ONNX folder (encoder + decoder(s),
tokenizer, task.json, export_config.json, parity.json), int8 for CPU or fp16/TensorRT for GPU, gated by
parity with the PyTorch model on the validation split."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepwise import artifacts, cards, request_limits, storage, tasks

ONNX_FILES = {
    "encoder": "encoder_model.onnx",
    "decoder": "decoder_model.onnx",
    "decoder_with_past": "decoder_with_past_model.onnx",
    "decoder_merged": "decoder_model_merged.onnx",
}
COPIED_FILES = (artifacts.TASK, artifacts.TRAIN_CONFIG)
RATIONALE_TOKENS = 128  # the rationale limit of a checkpoint that brings no train_config.json
# CPU: split, measured (export/README.md, `stepwise bench export`: int8 split 2.9x faster greedy at batch 1,
# fp32 a tie). TensorRT: split, it cannot build one engine across the merged decoder's If node. CUDA EP:
# merged, one decoder's weights in GPU memory instead of two (not measured: no GPU here).
DEFAULT_LAYOUT = {"cpu": "split", "cuda": "merged", "tensorrt": "split"}
# T5 overflows fp16 (activations past 65504) in the FFN output projection and in the residual stream /
# RMS layer norm (Pow, ReduceMean): keep those, and softmax, in fp32; the other matmuls run in fp16.
FP16_BLOCKED_OPS = ["Add", "Pow", "ReduceMean", "Sqrt", "Div", "Softmax"]
FP16_BLOCKED_NODE_MARKERS = ("/DenseReluDense/wo/",)
# The LM head stays fp32: quantizing it moved labels most (trained tiny e-SNLI student, 200 valid examples:
# greedy agreement 0.875 -> 0.970, fast-path 0.910 -> 0.955 with it kept in fp32).
INT8_EXCLUDED_NODES = ["/lm_head/MatMul"]
DEFAULT_MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.95, "int8": 0.9}


def check_model_folder(model: Path) -> tasks.Task:
    if not model.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    missing = [f for f in ("config.json", artifacts.TASK) if not (model / f).exists()]
    if not any((model / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors")
    if not any((model / f).exists() for f in ("tokenizer.json", "spiece.model")):
        missing.append("tokenizer.json or spiece.model")
    if missing:
        raise ValueError(f"{model} is not a trained student folder (missing {', '.join(missing)})")
    config = json.loads((model / "config.json").read_text())
    if config.get("model_type") != "t5":
        raise ValueError(f"{model} holds a {config.get('model_type')!r} model; export supports T5 students")
    return tasks.load_task(model)


def export_onnx(model: Path, out: Path) -> None:
    """Optimum's T5 export: encoder, decoder, decoder with past and the merged decoder, plus tokenizer.
    Its own validation is off: the parity gate below checks more (labels, accuracy, logits)."""
    from optimum.exporters.onnx import main_export

    main_export(str(model), out, task="text2text-generation-with-past", do_validation=False, device="cpu")


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(path: Path) -> Path:
    """Dynamic int8 (weights int8 per channel, activations quantized at run time) for the weight
    matmuls but the LM head. With VNNI the full u8*s8 range is safe; without it reduce the range (AVX2 saturation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(path.stem + "_int8.onnx")
    quantize_dynamic(
        path,
        quantized,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=not cpu_has_vnni(),
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=INT8_EXCLUDED_NODES,
        extra_options={"MatMulConstBOnly": True},
    )
    return quantized


def convert_fp16(path: Path) -> Path:
    """fp16 weights and compute with the overflow-prone ops kept in fp32; inputs/outputs stay fp32 so
    the runtime feeds every precision the same way."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    blocked_nodes = [n.name for n in model.graph.node if any(m in n.name for m in FP16_BLOCKED_NODE_MARKERS)]
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_BLOCKED_OPS, node_block_list=blocked_nodes
    )
    target = path.with_name(path.stem + "_fp16.onnx")
    onnx.save(converted, str(target))
    return target


def providers_for(
    target: str,
    precision: str,
    served: ServedRequests,
    task: tasks.Task,
    limits: dict[str, int],
    model_config: dict[str, Any],
) -> list[dict[str, Any]]:
    """Execution providers with their options, in priority order; serving passes them to ORT as they are."""
    cpu = {"name": "CPUExecutionProvider"}
    cuda = {
        "name": "CUDAExecutionProvider",
        "options": {
            "device_id": 0,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": True,
        },
    }
    if target == "cpu":
        return [cpu]
    if target == "cuda":
        return [cuda, cpu]
    trt = {
        "name": "TensorrtExecutionProvider",
        "options": {
            "device_id": 0,
            "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": "trt_cache",  # relative: resolved against the export folder
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": "trt_cache",
            "trt_max_workspace_size": 2 * 1024**3,
            "trt_builder_optimization_level": 3,
        },
        # Per session; the merged decoder (If node, past inputs) gets none: TensorRT targets use the split layout.
        "profiles": trt_profiles(served, task, limits, model_config),
    }
    return [trt, cuda, cpu]


def trt_profiles(
    served: ServedRequests, task: tasks.Task, limits: dict[str, int], model: dict[str, Any]
) -> dict[str, dict[str, str]]:
    """TensorRT optimisation profiles (min/opt/max shapes) per session, so engines are built once for every
    request serving accepts (`served`) instead of rebuilt per new shape. Scoring runs batch x candidates decoder
    rows, each as long as the longest candidate: a label seen in training, or a choice of max_choice_tokens."""
    heads, d_kv, d_model = model["num_heads"], model["d_kv"], model["d_model"]
    choice = task.answer_style == "choice"
    seq, rows, label, total = (
        limits["input"],
        served.max_batch * request_limits.candidates_per_input(task, served.max_choices),
        max(limits["label_tokens"], served.max_choice_tokens) if choice else limits["label_tokens"],
        max(limits["label"], limits["rationale"]),
    )

    def shapes(batch: int, source: int, target: int, past: int) -> dict[str, str]:
        return {
            "encoder": f"input_ids:{batch}x{source},attention_mask:{batch}x{source}",
            "decoder": f"input_ids:{batch}x{target},encoder_attention_mask:{batch}x{source},"
            f"encoder_hidden_states:{batch}x{source}x{d_model}",
            "decoder_with_past": ",".join(
                # A generation step feeds one token; label scoring feeds a candidate's remaining tokens at once.
                [f"input_ids:{batch}x{target}", f"encoder_attention_mask:{batch}x{source}"]
                + [
                    f"past_key_values.{i}.{kind}.{kv}:{batch}x{heads}x{past if kind == 'decoder' else source}x{d_kv}"
                    for i in range(model["num_decoder_layers"])
                    for kind in ("decoder", "encoder")
                    for kv in ("key", "value")
                ]
            ),
        }

    low, opt, high = (
        shapes(1, 1, 1, 1),
        shapes(max(1, served.max_batch // 4), min(128, seq), label, 8),
        shapes(rows, seq, label, total),
    )
    return {
        session: {
            "trt_profile_min_shapes": low[session],
            "trt_profile_opt_shapes": opt[session],
            "trt_profile_max_shapes": high[session],
        }
        for session in low
    }


def token_limits(task: tasks.Task, tokenizer: Any, max_rationale_tokens: int) -> dict[str, int]:
    """Tight generation limits: the longest label seen in training (+ EOS and a small margin)."""
    train = tasks.load_split(task, "train")[:5000]
    labels = {e.label for e in train} | set(task.labels) | {c for e in train for c in (e.choices or [])}
    longest = max((len(tokenizer(label).input_ids) for label in labels), default=16)
    return {
        "label": longest + (0 if task.closed_label_set else 2),
        "label_tokens": longest,
        "rationale": max_rationale_tokens,
    }


def folder_version(out: Path, files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files.values()):
        with (out / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class ServedRequests:
    """The largest request the export will be served with, which a TensorRT export's shape profiles cover: serving
    refuses at start a TensorRT export narrower than its own limits. Defaults: serving's (stepwise.request_limits).

    Args:
        max_batch: most inputs serving decodes together (its --max-batch-size)
        max_choices: most answer choices of one input, for a multiple-choice task (serving's --max-choices)
        max_choice_tokens: longest answer choice in tokens, EOS included (serving's --max-choice-tokens)
    """

    max_batch: int = request_limits.DEFAULT_MAX_BATCH
    max_choices: int = request_limits.DEFAULT_MAX_CHOICES
    max_choice_tokens: int = request_limits.DEFAULT_MAX_CHOICE_TOKENS

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_choices", "max_choice_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")


@dataclass(frozen=True)
class ParityOptions:
    """The parity gate: the export against its PyTorch model on the validation split, before it lands.

    Args:
        parity_limit: validation examples compared against PyTorch (0: skip the gate; serving then refuses the export
            unless --allow-unverified)
        parity_providers: providers for the parity run; default the config's (falls back to CPU where the GPU is absent)
        min_agreement: minimum ONNX-vs-PyTorch label agreement; default 0.99 fp32, 0.95 fp16, 0.9 int8
        max_accuracy_drop: maximum validation accuracy the ONNX model may lose against PyTorch
        max_logit_diff: maximum absolute teacher-forced logit difference (fp32 only)
    """

    parity_limit: int = 200
    parity_providers: list[str] | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float = 0.02
    max_logit_diff: float = 1e-3

    def __post_init__(self) -> None:
        if self.parity_limit < 0:
            raise ValueError(f"--parity-limit must be 0 or more, got {self.parity_limit}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")


def check_out(model: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output folder that would destroy something: the model itself (or a folder holding it, or
    one inside it), or a non-empty folder that `stepwise export` did not write."""
    model_path, out_path = model.resolve(), out.resolve()
    if out_path == model_path or out_path in model_path.parents or model_path in out_path.parents:
        raise ValueError(
            f"--out {out} is the model folder, holds it or lies inside it: choose a folder apart from {model}"
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace an earlier export)")
        if not (out / artifacts.EXPORT_CONFIG).exists():
            raise ValueError(
                f"{out} holds no {artifacts.EXPORT_CONFIG}: --overwrite replaces only a folder `stepwise export` wrote"
            )


def write_onnx_files(model: Path, folder: Path, kind: str, layout: str) -> dict[str, str]:
    """The ONNX files of `layout`, converted to `kind`, with the tokenizer, task.json and train_config.json, into
    `folder`; role (encoder, decoder, decoder_with_past, decoder_merged) -> file name."""
    export_onnx(model, folder)
    for name in COPIED_FILES:
        if (model / name).exists():
            shutil.copy2(model / name, folder / name)
    keep = ["encoder", "decoder_merged"] if layout == "merged" else ["encoder", "decoder", "decoder_with_past"]
    files = {key: ONNX_FILES[key] for key in keep}
    for key, name in ONNX_FILES.items():
        if key not in keep:
            (folder / name).unlink(missing_ok=True)
    convert = {"int8": quantize_int8, "fp16": convert_fp16}.get(kind)
    if convert:
        for key, name in list(files.items()):
            converted = convert(folder / name)
            (folder / name).unlink()
            files[key] = converted.name
            print(f"[export] {kind}: {converted.name} ({converted.stat().st_size / 1e6:.1f} MB)", flush=True)
    return files


def export_settings(
    model: Path,
    folder: Path,
    files: dict[str, str],
    task: tasks.Task,
    kind: str,
    layout: str,
    target: str,
    threads: int,
    max_input_tokens: int,
    max_rationale_tokens: int,
    served: ServedRequests,
) -> dict[str, Any]:
    """export_config.json: what the runtime opens and how, the model's shape, the token limits, and the version (a
    hash of the ONNX files written to `folder`)."""
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model_config = {
        k: getattr(hf_config, k)
        for k in (
            "d_model",
            "num_heads",
            "d_kv",
            "num_decoder_layers",
            "vocab_size",
            "eos_token_id",
            "pad_token_id",
            "decoder_start_token_id",
        )
    }
    trained = artifacts.read_train_config(model)
    max_input_tokens = max_input_tokens or (trained["max_input_tokens"] if trained else artifacts.T5_MAX_INPUT_TOKENS)
    max_rationale_tokens = max_rationale_tokens or (trained["max_target_tokens"] if trained else RATIONALE_TOKENS)
    limits = token_limits(task, tokenizer, max_rationale_tokens) | {"input": max_input_tokens}
    settings = {
        "model_id": model.resolve().name,
        "source_model": str(model.resolve()),
        "target": target,
        "precision": kind,
        "decoder_layout": layout,
        # The runtime opens "decoder" as the no-past (split) or merged decoder.
        "files": {
            "encoder": files["encoder"],
            "decoder": files.get("decoder_merged", files.get("decoder")),
            **({"decoder_with_past": files["decoder_with_past"]} if layout == "split" else {}),
        },
        "providers": providers_for(target, kind, served, task, limits, model_config),
        "io_binding": target in ("cuda", "tensorrt"),
        "threads": threads,
        "session_config": {"graph_optimization_level": "ORT_ENABLE_ALL", "session.intra_op.allow_spinning": "0 on CPU"},
        "quantization": {
            "method": "dynamic",
            "weights": "int8 per-channel",
            "ops": ["MatMul"],
            "excluded_nodes": INT8_EXCLUDED_NODES,
            "vnni": cpu_has_vnni(),
        }
        if kind == "int8"
        else None,
        "fp16": {
            "blocked_ops": FP16_BLOCKED_OPS,
            "blocked_nodes": list(FP16_BLOCKED_NODE_MARKERS),
            "keep_io_types": True,
        }
        if kind == "fp16"
        else None,
        "model": model_config,
        "max_input_tokens": max_input_tokens,
        "max_new_tokens": {"label": limits["label"], "rationale": limits["rationale"]},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return settings | {"version": folder_version(folder, settings["files"])}


def main(
    model: str | Path,
    out: str | Path,
    quantize: Literal["none", "int8"] = "none",
    precision: Literal["fp32", "fp16"] = "fp32",
    target: Literal["cpu", "cuda", "tensorrt"] = "cpu",
    decoder_layout: Literal["auto", "split", "merged"] = "auto",
    threads: int = 0,
    max_input_tokens: int = 0,
    max_rationale_tokens: int = 0,
    served: ServedRequests = ServedRequests(),
    parity: ParityOptions = ParityOptions(),
    overwrite: bool = False,
) -> str | Path:
    """Export a trained student to ONNX with Optimum, optionally int8 (CPU) or fp16 (GPU), and gate it on parity.

    The export is written into a staging folder beside --out and moves into place only once the parity gate
    passes; a failed export is left in <out>.rejected for inspection and raises ParityFailed.

    Args:
        model: trained student folder (config.json, model.safetensors, tokenizer, task.json), or its prefix on an
            object store (s3://bucket/prefix, as `stepwise train --out s3://...` uploads it; checksums verified)
        out: export folder to write (self-contained: ONNX files, tokenizer, task.json, export_config.json, parity.json),
            or a prefix on an object store (exported locally, then uploaded with checksums.json last)
        quantize: int8: dynamic int8 quantization of the weight matmuls (CPU target)
        precision: fp16: half precision with T5's overflow-prone ops kept in fp32 (GPU targets)
        target: where it will be served: cpu (CPU EP), cuda (CUDA EP, IO binding), tensorrt (TensorRT EP, then CUDA)
        decoder_layout: split (decoder + decoder_with_past) or merged (one decoder with an If on the cache); auto picks
            per target
        threads: intra-op threads per ONNX session written into the config (0: ONNX Runtime decides)
        max_input_tokens: inputs are truncated to this many tokens (0: train_config.json's max_input_tokens, else 512)
        max_rationale_tokens: generation limit for rationales (0: train_config.json's max_target_tokens, else 128)
        served: the largest request serving will send (TensorRT shape profiles)
        parity: the parity gate's settings
        overwrite: replace an earlier export at --out (only a folder `stepwise export` wrote)
    """
    model_at, out_at = storage.as_location(model), storage.as_location(out)
    if storage.is_remote(model_at):  # a local one is checked by check_model_folder, naming what it lacks
        storage.check_location(model_at, "--model", must_exist=True)
    storage.check_location(out_at, "--out")
    model = storage.local_folder(model_at, "the trained student (--model)")
    task = check_model_folder(model)
    if quantize == "int8" and precision == "fp16":
        raise ValueError("choose one of --quantize int8 (CPU) and --precision fp16 (GPU)")
    if quantize == "int8" and target != "cpu":
        raise ValueError("int8 dynamic quantization is a CPU target; use --precision fp16 for cuda/tensorrt")
    layout = DEFAULT_LAYOUT[target] if decoder_layout == "auto" else decoder_layout
    if target == "tensorrt" and layout == "merged":
        raise ValueError(
            "the tensorrt target needs the split decoder layout "
            "(TensorRT cannot build engines across the merged decoder's If node)"
        )

    def write_into(folder: Path) -> Path:
        return write_and_place(model, folder, task, quantize, precision, target, layout, threads,
                               max_input_tokens, max_rationale_tokens, served, parity)  # fmt: skip

    if storage.is_remote(out_at):  # exported into a scratch folder, then uploaded with checksums.json last
        if storage.exists(storage.join(out_at, storage.CHECKSUMS)) and not overwrite:
            raise ValueError(f"{out_at} holds an export already; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="stepwise-export-") as scratch:
            storage.upload_folder(write_into(Path(scratch) / "export"), str(out_at))
        print(f"[export] uploaded to {out_at}", flush=True)
        return out_at
    out = Path(out_at)
    # One export per --out: the lock lives beside it (the folder itself is swapped whole).
    with artifacts.folder_lock(out.with_name(f".{out.name}.export.lock"), "export", out, remove=True):
        if artifacts.recover_previous(out):
            print(f"[export] {out}: put back the export an interrupted replacement had moved aside", flush=True)
        check_out(model, out, overwrite)
        return write_into(out)


def write_and_place(
    model: Path,
    out: Path,
    task: tasks.Task,
    quantize: str,
    precision: str,
    target: str,
    layout: str,
    threads: int,
    max_input_tokens: int,
    max_rationale_tokens: int,
    served: ServedRequests,
    parity: ParityOptions,
) -> Path:
    """Write the export into a staging folder beside `out`, gate it, and swap it into place whole."""
    kind = "int8" if quantize == "int8" else precision
    started = time.time()
    rejected = out.with_name(f"{out.name}.rejected")
    for stale in [rejected, *out.parent.glob(f".{glob.escape(out.name)}.*.staging")]:  # killed runs' (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.staging")
    staging.mkdir(parents=True)

    print(f"[export] {model} -> {out} ({kind}, {layout} decoder, target {target})", flush=True)
    try:
        files = write_onnx_files(model, staging, kind, layout)
        settings = export_settings(model, staging, files, task, kind, layout, target, threads, max_input_tokens,
                                   max_rationale_tokens, served)  # fmt: skip
        artifacts.write_json(staging / artifacts.EXPORT_CONFIG, settings)
        report = parity_gate(staging, model, task, kind, parity, served.max_batch)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not (report["passed"] or report["skipped"]):  # a skipped gate lands, marked unverified
        staging.rename(rejected)
        raise artifacts.ParityFailed(rejected, report)
    cards.write_model_card(staging, name=out.name)
    artifacts.replace_folder(staging, out)
    print(f"[export] done in {time.time() - started:.0f} s: {out}", flush=True)
    return out


def parity_gate(
    out: Path, model: Path, task: tasks.Task, precision: str, options: ParityOptions, max_batch: int
) -> artifacts.ParityReport:
    """Compare the export with the PyTorch model on the validation split, in batches of at most `max_batch` (what
    serving sends, and what a TensorRT export's profiles hold); write parity.json; say loudly when it fails."""
    from stepwise.export import parity
    from stepwise.export.runtime import load_runtime

    threshold = DEFAULT_MIN_AGREEMENT[precision] if options.min_agreement is None else options.min_agreement
    if options.parity_limit == 0:
        # Written as not passed: serving refuses an unverified export unless told --allow-unverified.
        report: dict[str, Any] = {"skipped": True, "passed": False, "reason": "--parity-limit 0", "failures": []}
        artifacts.write_json(out / artifacts.PARITY, report)
        print(
            "[export] WARNING: parity gate skipped (--parity-limit 0); `stepwise serve` will need --allow-unverified",
            file=sys.stderr,
        )
        return report
    examples = tasks.load_split(task, "valid")[: options.parity_limit]
    if not examples:
        raise ValueError(f"task {task.name} has no validation examples for the parity gate")
    runtime = load_runtime(out, providers=options.parity_providers)
    report = parity.compare(runtime, model, examples, batch_size=max_batch)
    failures = parity.gate(report, precision, threshold, options.max_accuracy_drop, options.max_logit_diff)
    report |= {
        "skipped": False,
        "precision": precision,
        "providers": runtime.providers,
        "thresholds": {
            "min_agreement": threshold,
            "max_accuracy_drop": options.max_accuracy_drop,
            "max_logit_diff": options.max_logit_diff if precision == "fp32" else None,
        },
        "failures": failures,
        "passed": not failures,
    }
    artifacts.write_json(out / artifacts.PARITY, report)
    fast = (
        f", fast-path agreement {report['fast_path_agreement']:.3f}"
        if report["fast_path_agreement"] is not None
        else ""
    )
    print(
        f"[export] parity on {report['examples']} valid examples ({', '.join(runtime.providers)}): "
        f"greedy agreement {report['greedy_agreement']:.3f}{fast}; "
        f"accuracy {report['accuracy_pytorch']:.3f} (PyTorch) -> {report['accuracy_onnx']:.3f} (ONNX {precision}), "
        f"delta {report['accuracy_delta']:+.3f}; "
        f"max abs logit diff {report['max_abs_logit_diff']:.2e}",
        flush=True,
    )
    if failures:
        print("[export] PARITY FAILED: " + "; ".join(failures), file=sys.stderr, flush=True)
    return report
