"""Run an exported student with ONNX Runtime: load the folder `stepwise export` wrote, predict labels
(and, on request, rationales) for a batch of examples.

Two decoding paths:
- fast path (closed label set: a `label` task's labels, a `choice` example's choices): score every
  candidate label in one batched, teacher-forced decoder pass (sum of token log-probs, EOS included)
  and pick the best, instead of generating token by token;
- greedy (open labels, rationales, or fast_path=False): encoder once, then one decoder step per token
  with the key/value cache, stopping when every row has produced EOS or at a tight max length.

Providers, provider options (TensorRT engine cache, fp16, shape profiles), thread counts and IO binding
come from the folder's export_config.json, so serving applies what export decided.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from stepwise import artifacts, tasks

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class Prediction:
    label: str
    rationale: str | None = None


@dataclass
class Runtime:
    """ONNX Runtime sessions, tokenizer, task and export config of one exported student."""

    task: tasks.Task
    model_id: str
    version: str
    providers: list[str]  # what the sessions actually use (ORT silently falls back to CPU)
    export_dir: Path
    export_config: dict[str, Any]
    tokenizer: PreTrainedTokenizerBase
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession  # no-past decoder (split layout) or the merged decoder
    decoder_with_past: ort.InferenceSession | None  # None for the merged layout
    io_binding: bool  # keep the key/value cache on the device between steps (CUDA)
    device: str  # "cpu" or "cuda": where IO-bound outputs live
    past_names: list[str] = field(default_factory=list)  # decoder past inputs, in graph order

    @property
    def merged(self) -> bool:
        return self.decoder_with_past is None


# ---------------------------------------------------------------- loading


def session_options(config: dict[str, Any], threads: int | None, on_cpu: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = threads or config.get("threads") or 0  # 0: ORT picks (one per physical core)
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    if on_cpu:
        # Busy-waiting worker threads steal the few cores a serving box has (57 -> 33 ms at batch 1 on 2 vCPUs).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def configured_providers(export_dir: Path, config: dict[str, Any], session: str) -> list[tuple[str, dict[str, Any]]]:
    """The export config's (name, options) pairs for one session ("encoder", "decoder",
    "decoder_with_past"), in priority order: TensorRT gets that session's shape profile and its engine
    cache path resolved against the export folder (relative in the config, so the folder stays movable)."""
    result = []
    for provider in config.get("providers", [{"name": "CPUExecutionProvider"}]):
        options = dict(provider.get("options", {})) | dict(provider.get("profiles", {}).get(session, {}))
        if "trt_engine_cache_path" in options:
            cache = Path(options["trt_engine_cache_path"])
            options["trt_engine_cache_path"] = str(cache if cache.is_absolute() else Path(export_dir) / cache)
        result.append((provider["name"], options))
    return result


def provider_list(export_dir: Path, config: dict[str, Any], names: list[str] | None, session: str) -> list[tuple[str, dict[str, Any]]]:
    """What to open a session with: the configured providers (or just `names`, with the configured
    options) that this onnxruntime build has."""
    configured = dict(configured_providers(export_dir, config, session))
    chosen = names or list(configured)
    available = ort.get_available_providers()
    if not any(n in available for n in chosen):
        raise RuntimeError(f"none of the providers {chosen} is available in this onnxruntime build (available: {available})")
    result = [(name, configured.get(name, {})) for name in chosen if name in available]
    for _, options in result:
        if "trt_engine_cache_path" in options:
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    return result


def load_runtime(export_dir: Path, providers: list[str] | None = None, threads: int | None = None, io_binding: bool | None = None) -> Runtime:
    """Open the ONNX sessions of an exported student.

    Args:
        export_dir: a folder written by `stepwise export`
        providers: execution provider names, in priority order; default: the export config's
        threads: intra-op threads per session; default: the export config's (or ORT's choice)
        io_binding: bind inputs/outputs to the device; default: the export config's, on a GPU provider only
    """
    export_dir = Path(export_dir)
    config = artifacts.read_export_config(export_dir)
    on_cpu = provider_list(export_dir, config, providers, "encoder")[0][0] == "CPUExecutionProvider"
    options = session_options(config, threads, on_cpu)
    files = config["files"]

    def open_session(key: str) -> ort.InferenceSession:
        path = export_dir / files[key]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the export folder is incomplete")
        return ort.InferenceSession(str(path), sess_options=options, providers=provider_list(export_dir, config, providers, key))

    encoder = open_session("encoder")
    decoder = open_session("decoder")
    decoder_with_past = open_session("decoder_with_past") if config["decoder_layout"] == "split" else None
    actual = encoder.get_providers()
    device = "cuda" if actual[0] in GPU_PROVIDERS else "cpu"
    past_session = decoder_with_past or decoder
    return Runtime(
        task=tasks.load_task(export_dir),
        model_id=config.get("model_id", export_dir.name),
        version=config.get("version", ""),
        providers=actual,
        export_dir=export_dir,
        export_config=config,
        tokenizer=AutoTokenizer.from_pretrained(export_dir),
        encoder=encoder,
        decoder=decoder,
        decoder_with_past=decoder_with_past,
        io_binding=(bool(config.get("io_binding")) and device == "cuda") if io_binding is None else io_binding,
        device=device,
        past_names=[i.name for i in past_session.get_inputs() if i.name.startswith("past_key_values.")],
    )


# ---------------------------------------------------------------- running sessions


def run_session(runtime: Runtime, session: ort.InferenceSession, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    """Outputs by name (all, or just `outputs`). With IO binding, inputs that are already OrtValues stay
    where they are and the outputs stay on the device (the key/value cache never crosses PCIe); call
    `to_numpy` for logits."""
    names = outputs or [o.name for o in session.get_outputs()]
    if not runtime.io_binding:
        feeds = {k: v.numpy() if isinstance(v, ort.OrtValue) else v for k, v in feeds.items()}
        return dict(zip(names, session.run(names, feeds)))
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, runtime.device)
    session.run_with_iobinding(binding)
    return dict(zip(names, binding.get_outputs()))


def to_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else value


def encode(runtime: Runtime, texts: list[str]) -> tuple[Any, np.ndarray]:
    """Encoder hidden states (numpy, or an OrtValue on the device) and the attention mask."""
    max_tokens = runtime.export_config.get("max_input_tokens", 512)
    batch = runtime.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    hidden = run_session(runtime, runtime.encoder, {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    return hidden, mask


def empty_past(runtime: Runtime, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past for the merged decoder's first step (its no-cache branch ignores it)."""
    model = runtime.export_config["model"]
    shape = (batch, model["num_heads"], 0, model["d_kv"])
    return {name: np.zeros(shape, dtype=np.float32) for name in runtime.past_names}


def decoder_logits(runtime: Runtime, hidden: Any, mask: np.ndarray, decoder_ids: np.ndarray, with_presents: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Teacher-forced decoder pass without a cache: logits [batch, length, vocab] (and the presents, to
    continue generating)."""
    feeds = {"input_ids": decoder_ids.astype(np.int64), "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
    if runtime.merged:
        feeds |= empty_past(runtime, decoder_ids.shape[0]) | {"use_cache_branch": np.array([False])}
    outputs = run_session(runtime, runtime.decoder, feeds, None if with_presents else ["logits"])
    return to_numpy(outputs["logits"]), outputs


def next_step_logits(runtime: Runtime, token: np.ndarray, mask: np.ndarray, past: dict[str, Any], hidden: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """One cached decoder step: logits [batch, 1, vocab] and the outputs (new presents)."""
    feeds = {"input_ids": token.astype(np.int64), "encoder_attention_mask": mask} | past
    if runtime.merged:
        feeds |= {"encoder_hidden_states": hidden, "use_cache_branch": np.array([True])}
        outputs = run_session(runtime, runtime.decoder, feeds)
    else:
        outputs = run_session(runtime, runtime.decoder_with_past, feeds)
    return to_numpy(outputs["logits"]), outputs


def carry_past(runtime: Runtime, outputs: dict[str, Any], past: dict[str, Any]) -> dict[str, Any]:
    """Presents of this step as the next step's past. The encoder (cross-attention) keys/values are
    computed once on the first step; later steps of the split decoder don't return them."""
    carried = {}
    for name in runtime.past_names:
        present = name.replace("past_key_values.", "present.")
        carried[name] = outputs[present] if present in outputs and (".decoder." in name or name not in past) else past[name]
    return carried


# ---------------------------------------------------------------- decoding


def greedy_decode(runtime: Runtime, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy generation with the key/value cache; a row stops at EOS, the batch when all rows have."""
    model = runtime.export_config["model"]
    eos, start = model["eos_token_id"], model["decoder_start_token_id"]
    hidden, mask = encode(runtime, texts)
    tokens = np.full((len(texts), 1), start, dtype=np.int64)
    logits, outputs = decoder_logits(runtime, hidden, mask, tokens, with_presents=True)
    past = carry_past(runtime, outputs, {})
    generated: list[list[int]] = [[] for _ in texts]
    done = np.zeros(len(texts), dtype=bool)
    for step in range(max_new_tokens):
        next_tokens = logits[:, -1, :].argmax(-1)
        for row, token in enumerate(next_tokens):
            if not done[row]:
                generated[row].append(int(token))
        done |= next_tokens == eos
        if done.all() or step == max_new_tokens - 1:
            break
        logits, outputs = next_step_logits(runtime, next_tokens[:, None], mask, past, hidden)
        past = carry_past(runtime, outputs, past)
    return generated


def candidate_batch(tokenizer: PreTrainedTokenizerBase, candidates: list[str], start_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forcing inputs for scoring candidates: decoder inputs (start + tokens, right-shifted),
    targets (tokens + EOS) and a mask of real target positions. Shared by the ONNX and PyTorch scorers."""
    token_ids = [tokenizer(c).input_ids for c in candidates]  # T5 tokenizers append EOS
    length = max(len(ids) for ids in token_ids)
    targets = np.full((len(candidates), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(candidates), length), dtype=np.float32)
    for row, ids in enumerate(token_ids):
        targets[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1.0
    decoder_ids = np.concatenate([np.full((len(candidates), 1), start_id, dtype=np.int64), targets[:, :-1]], axis=1)
    return decoder_ids, targets, mask


def sequence_log_likelihood(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sum of target-token log-probabilities per row (padding excluded)."""
    logits = logits.astype(np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return (picked * mask).sum(-1)


def candidates_for(task: tasks.Task, example: tasks.Example) -> list[str]:
    if task.answer_style == "label":
        return list(task.labels)
    if not example.choices:
        raise ValueError(f"example {example.id}: a choice task needs the example's choices for label scoring")
    return list(example.choices)


def score_candidates(runtime: Runtime, texts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
    """Log-likelihood of each example's candidate labels, all candidates of the batch in one decoder pass."""
    model = runtime.export_config["model"]
    hidden, mask = encode(runtime, texts)
    counts = [len(c) for c in candidates]
    rows = np.repeat(np.arange(len(texts)), counts)
    hidden_rows = to_numpy(hidden)[rows]
    decoder_ids, targets, target_mask = candidate_batch(runtime.tokenizer, [c for cs in candidates for c in cs], model["decoder_start_token_id"], model["pad_token_id"])
    logits, _ = decoder_logits(runtime, hidden_rows, mask[rows], decoder_ids)
    scores = sequence_log_likelihood(logits, targets, target_mask)
    return np.split(scores, np.cumsum(counts)[:-1])


def predict(runtime: Runtime, examples: list[tasks.Example], explain: bool = False, fast_path: bool = True) -> list[Prediction]:
    """Labels for `examples` ("predict: " input); with explain=True also rationales ("explain: " input).

    Args:
        runtime: from `load_runtime`
        examples: task examples (input text; choices for a choice task)
        explain: also generate each example's rationale
        fast_path: score a closed label set in one pass instead of generating the label
    """
    if not examples:
        return []
    limits = runtime.export_config["max_new_tokens"]
    label_texts = [tasks.label_input(e) for e in examples]
    if fast_path and runtime.task.closed_label_set:
        candidates = [candidates_for(runtime.task, e) for e in examples]
        scores = score_candidates(runtime, label_texts, candidates)
        labels = [cs[int(np.argmax(s))] for cs, s in zip(candidates, scores)]
    else:
        ids = greedy_decode(runtime, label_texts, limits["label"])
        labels = [t.strip() for t in runtime.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    if not explain:
        return [Prediction(label) for label in labels]
    ids = greedy_decode(runtime, [tasks.rationale_input(e) for e in examples], limits["rationale"])
    rationales = [t.strip() for t in runtime.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return [Prediction(label, rationale) for label, rationale in zip(labels, rationales)]
