"""Run an exported student with ONNX Runtime: load the folder `stepwise export` wrote, predict labels
(and, on request, rationales) for a batch of examples.

Two decoding paths:
- fast path (closed label set: a `label` task's labels, a `choice` example's distinct choices): score
  every candidate exactly (sum of its token log-probs, EOS included) and pick the best, instead of
  generating token by token. The encoder and the decoder's start step run once per example; the start
  step gives every candidate's first-token log-prob and the cross-attention keys/values, which the
  cached decoder then reads for the candidates' remaining tokens (never projected again per candidate).
  The scores become the prediction's probabilities over the candidates;
- greedy (open labels, rationales, or fast_path=False): encoder once, then one decoder step per token
  with the key/value cache, stopping when every row has produced EOS or at a tight max length.

Providers, provider options (TensorRT engine cache, fp16, shape profiles), thread counts and IO binding
come from the folder's export_config.json, so serving applies what export decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from stepwise import artifacts, tasks

if TYPE_CHECKING:  # transformers (and the torch it brings) loads only where a tokenizer does: Serve's controller
    # and proxies import this module with the app but never tokenize (serving/README.md, the stack's memory)
    from transformers import PreTrainedTokenizerBase

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# What one more encoder call costs, in padded tokens of encoder work (t5-small-shaped int8, one thread: groups
# chosen with 16 beat one call and groups chosen with 64 on batches of 16 e-SNLI inputs).
ENCODER_CALL_TOKENS = 16
# Most bytes of fp32 logits one cached decoder call of the label path returns. Scoring every candidate of the largest
# request serving accepts (16 inputs x 16 choices x 32 tokens: 256 rows x 31 positions x T5's 32128-token vocabulary)
# in one call would return 1 GB of logits and as much again in the log-softmax's temporary; in calls of at most this
# many bytes the continuation's peak stays near 2 x LOGITS_CHUNK_BYTES (logits + one temporary) above the model and
# the start step's keys/values, whatever the request (benchmarks/results/label_memory.md).
LOGITS_CHUNK_BYTES = 32 * 2**20


@dataclass
class Prediction:
    """One example's answer. Closed label sets (fast path) fill `probability`, `margin` and `scores` from the
    candidates' exact sequence log-likelihoods; greedy labels fill only `log_prob`."""

    label: str
    rationale: str | None = None
    probability: float | None = None  # the label's probability, normalised over the candidates
    margin: float | None = None  # probability of the label minus the runner-up's (1.0 with a single candidate)
    scores: dict[str, float] | None = None  # every candidate's normalised probability
    log_prob: float | None = None  # the label's sequence log-probability (sum of token log-probs, EOS included)


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
    step_weight_bytes: int = 0  # size of the cached-step decoder's file: what one call streams through memory
    label_token_ids: dict[str, list[int]] = field(
        default_factory=dict
    )  # a label task's labels, tokenized once (EOS included)
    encoder_call_tokens: int = (
        ENCODER_CALL_TOKENS  # the encoder's batch splits by length where padding costs more than this per call
    )
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES  # most logits bytes one continuation decoder call returns

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


# What an export folder may ask ONNX Runtime for. The folder is data a user may have been handed: a provider or an
# option outside these lists is refused, since some load code (TensorRT's plugin and custom-op libraries, ORT's own
# custom-op paths) or write where the folder says.
PROVIDER_OPTIONS: dict[str, frozenset[str]] = {
    "CPUExecutionProvider": frozenset(),
    "CUDAExecutionProvider": frozenset(
        {"device_id", "arena_extend_strategy", "cudnn_conv_algo_search", "do_copy_in_default_stream", "gpu_mem_limit"}
    ),
    "TensorrtExecutionProvider": frozenset(
        {
            "device_id",
            "trt_fp16_enable",
            "trt_engine_cache_enable",
            "trt_engine_cache_path",
            "trt_timing_cache_enable",
            "trt_timing_cache_path",
            "trt_max_workspace_size",
            "trt_builder_optimization_level",
            "trt_profile_min_shapes",
            "trt_profile_opt_shapes",
            "trt_profile_max_shapes",
        }
    ),
}
CACHE_PATH_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")  # folders ORT creates and writes into


def configured_providers(export_dir: Path, config: dict[str, Any], session: str) -> list[tuple[str, dict[str, Any]]]:
    """The export config's (name, options) pairs for one session ("encoder", "decoder",
    "decoder_with_past"), in priority order: TensorRT gets that session's shape profile and its cache paths
    resolved against the export folder (relative in the config, so the folder stays movable, and inside it).
    Raises ValueError naming the provider or option when the config asks for one outside PROVIDER_OPTIONS."""
    where = Path(export_dir) / "export_config.json"
    result = []
    for provider in config.get("providers", [{"name": "CPUExecutionProvider"}]):
        name = provider.get("name")
        if name not in PROVIDER_OPTIONS:
            raise ValueError(
                f"{where}: provider {name!r} is not one stepwise runs (allowed: {sorted(PROVIDER_OPTIONS)})"
            )
        options = dict(provider.get("options", {})) | dict(provider.get("profiles", {}).get(session, {}))
        unknown = sorted(set(options) - PROVIDER_OPTIONS[name])
        if unknown:
            raise ValueError(
                f"{where}: {name} options {unknown} are not allowed (allowed: {sorted(PROVIDER_OPTIONS[name])})"
            )
        for key in CACHE_PATH_OPTIONS:
            if key in options:
                options[key] = str(inside_folder(export_dir, options[key], f"{where}: {name} option {key}"))
        result.append((name, options))
    return result


def inside_folder(folder: Path, relative: str, what: str) -> Path:
    """`relative` resolved against `folder`; ValueError when it is absolute or leads out of the folder."""
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise ValueError(f"{what} must be a path inside the export folder, not {relative!r}")
    return path


def provider_list(
    export_dir: Path, config: dict[str, Any], names: list[str] | None, session: str
) -> list[tuple[str, dict[str, Any]]]:
    """What to open a session with: the configured providers (or just `names`, with the configured
    options) that this onnxruntime build has."""
    configured = dict(configured_providers(export_dir, config, session))
    chosen = names or list(configured)
    available = ort.get_available_providers()
    if not any(n in available for n in chosen):
        raise RuntimeError(
            f"none of the providers {chosen} is available in this onnxruntime build (available: {available})"
        )
    result = [(name, configured.get(name, {})) for name in chosen if name in available]
    for _, options in result:
        for key in CACHE_PATH_OPTIONS:
            if key in options:
                Path(options[key]).mkdir(parents=True, exist_ok=True)
    return result


def load_runtime(
    export_dir: Path, providers: list[str] | None = None, threads: int | None = None, io_binding: bool | None = None
) -> Runtime:
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
        return ort.InferenceSession(
            str(path), sess_options=options, providers=provider_list(export_dir, config, providers, key)
        )

    encoder = open_session("encoder")
    decoder = open_session("decoder")
    decoder_with_past = open_session("decoder_with_past") if config["decoder_layout"] == "split" else None
    actual = encoder.get_providers()
    device = "cuda" if actual[0] in GPU_PROVIDERS else "cpu"
    past_session = decoder_with_past or decoder
    task = tasks.load_task(export_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    return Runtime(
        task=task,
        model_id=config.get("model_id", export_dir.name),
        version=config.get("version", ""),
        providers=actual,
        export_dir=export_dir,
        export_config=config,
        tokenizer=tokenizer,
        encoder=encoder,
        decoder=decoder,
        decoder_with_past=decoder_with_past,
        io_binding=(bool(config.get("io_binding")) and device == "cuda") if io_binding is None else io_binding,
        device=device,
        past_names=[i.name for i in past_session.get_inputs() if i.name.startswith("past_key_values.")],
        step_weight_bytes=(export_dir / files["decoder_with_past" if decoder_with_past else "decoder"]).stat().st_size,
        label_token_ids=dict(zip(task.labels, tokenizer(task.labels).input_ids, strict=True)) if task.labels else {},
    )


# ---------------------------------------------------------------- running sessions


def run_session(
    runtime: Runtime, session: ort.InferenceSession, feeds: dict[str, Any], outputs: list[str] | None = None
) -> dict[str, Any]:
    """Outputs by name (all, or just `outputs`). With IO binding, inputs that are already OrtValues stay
    where they are and the outputs stay on the device (the key/value cache never crosses PCIe); call
    `to_numpy` for logits."""
    names = outputs or [o.name for o in session.get_outputs()]
    if not runtime.io_binding:
        feeds = {k: v.numpy() if isinstance(v, ort.OrtValue) else v for k, v in feeds.items()}
        return dict(zip(names, session.run(names, feeds), strict=True))
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, runtime.device)
    session.run_with_iobinding(binding)
    return dict(zip(names, binding.get_outputs(), strict=True))


def to_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else value


def length_groups(lengths: np.ndarray, call_cost: int) -> list[np.ndarray]:
    """Row indices in groups of similar length (contiguous runs of the rows sorted by length) that minimise
    the padded tokens plus `call_cost` tokens per group: each group is padded only to its own longest."""
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths)[order]
    cost, start = [0.0] + [np.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # cost[end]: the best split of the `end` shortest rows
        for begin in range(end):
            candidate = cost[begin] + (end - begin) * ordered[end - 1] + call_cost
            if candidate < cost[end]:
                cost[end], start[end] = candidate, begin
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def encode(runtime: Runtime, texts: list[str]) -> tuple[Any, np.ndarray]:
    """Encoder hidden states [batch, longest, d_model] (numpy, or an OrtValue on the device) and the attention
    mask. On the CPU the batch runs as groups of similar length, each padded only to its own longest, laid
    back into one array for the decoder: padding costs the encoder linearly and its attention quadratically
    (e-SNLI inputs in batches of 16 are 36% padding; the t5-small-shaped int8 label path at batch 16 is 1.29x
    faster with the groups than with one encoder call, benchmarks/results/export.md)."""
    max_tokens = runtime.export_config["max_input_tokens"]
    batch = runtime.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    lengths = mask.sum(1)
    groups = length_groups(lengths, runtime.encoder_call_tokens)
    if len(groups) == 1 or runtime.io_binding:  # with IO binding the states stay on the device, from one call
        return run_session(runtime, runtime.encoder, {"input_ids": ids, "attention_mask": mask})[
            "last_hidden_state"
        ], mask
    hidden = np.zeros((*ids.shape, runtime.export_config["model"]["d_model"]), dtype=np.float32)
    for rows in groups:
        width = int(lengths[rows].max())
        feeds = {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]}
        hidden[rows, :width] = run_session(runtime, runtime.encoder, feeds)["last_hidden_state"]
    return hidden, mask


def empty_past(runtime: Runtime, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past for the merged decoder's first step (its no-cache branch ignores it)."""
    model = runtime.export_config["model"]
    shape = (batch, model["num_heads"], 0, model["d_kv"])
    return {name: np.zeros(shape, dtype=np.float32) for name in runtime.past_names}


def decoder_logits(
    runtime: Runtime, hidden: Any, mask: np.ndarray, decoder_ids: np.ndarray, with_presents: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """Teacher-forced decoder pass without a cache: logits [batch, length, vocab] (and the presents, to
    continue generating)."""
    feeds = {"input_ids": decoder_ids.astype(np.int64), "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
    if runtime.merged:
        feeds |= empty_past(runtime, decoder_ids.shape[0]) | {"use_cache_branch": np.array([False])}
    outputs = run_session(runtime, runtime.decoder, feeds, None if with_presents else ["logits"])
    return to_numpy(outputs["logits"]), outputs


def next_step_logits(
    runtime: Runtime, tokens: np.ndarray, mask: np.ndarray, past: dict[str, Any], hidden: Any, logits_only: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """Cached decoder steps for `tokens` [batch, new] (one per call when generating, a candidate's remaining
    tokens when scoring; both decoder layouts take several): logits [batch, new, vocab] and the outputs (new
    presents)."""
    feeds = {"input_ids": tokens.astype(np.int64), "encoder_attention_mask": mask} | past
    outputs = ["logits"] if logits_only else None
    if runtime.merged:
        feeds |= {"encoder_hidden_states": hidden, "use_cache_branch": np.array([True])}
        results = run_session(runtime, runtime.decoder, feeds, outputs)
    else:
        results = run_session(runtime, runtime.decoder_with_past, feeds, outputs)
    return to_numpy(results["logits"]), results


def carry_past(runtime: Runtime, outputs: dict[str, Any], past: dict[str, Any]) -> dict[str, Any]:
    """Presents of this step as the next step's past. The encoder (cross-attention) keys/values are
    computed once on the first step; later steps of the split decoder don't return them."""
    carried = {}
    for name in runtime.past_names:
        present = name.replace("past_key_values.", "present.")
        carried[name] = (
            outputs[present] if present in outputs and (".decoder." in name or name not in past) else past[name]
        )
    return carried


# ---------------------------------------------------------------- decoding


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """log of the softmax normaliser over the last axis: log_softmax(x)[t] = x[t] - logsumexp(x). One
    temporary of the logits' size, not the three a full log-softmax takes (memory traffic is the cost here)."""
    logits = logits.astype(np.float32, copy=False)
    top = logits.max(-1)
    shifted = logits - top[..., None]
    np.exp(shifted, out=shifted)
    return np.log(shifted.sum(-1)) + top


def greedy_decode(
    runtime: Runtime, texts: list[str], max_new_tokens: int, score: bool = False
) -> tuple[list[list[int]], np.ndarray | None]:
    """Greedy generation with the key/value cache; a row stops at EOS, the batch when all rows have. With
    score=True also each row's sequence log-probability (its generated tokens' log-probs, EOS included)."""
    model = runtime.export_config["model"]
    eos, start = model["eos_token_id"], model["decoder_start_token_id"]
    hidden, mask = encode(runtime, texts)
    tokens = np.full((len(texts), 1), start, dtype=np.int64)
    logits, outputs = decoder_logits(runtime, hidden, mask, tokens, with_presents=True)
    past = carry_past(runtime, outputs, {})
    generated: list[list[int]] = [[] for _ in texts]
    log_probs = np.zeros(len(texts)) if score else None
    done = np.zeros(len(texts), dtype=bool)
    for step in range(max_new_tokens):
        step_logits = logits[:, -1, :]
        next_tokens = step_logits.argmax(-1)
        if log_probs is not None:
            picked = step_logits[np.arange(len(texts)), next_tokens] - logsumexp(step_logits)
            log_probs += np.where(done, 0.0, picked)
        for row, token in enumerate(next_tokens):
            if not done[row]:
                generated[row].append(int(token))
        done |= next_tokens == eos
        if done.all() or step == max_new_tokens - 1:
            break
        logits, outputs = next_step_logits(runtime, next_tokens[:, None], mask, past, hidden)
        past = carry_past(runtime, outputs, past)
    return generated, log_probs


def token_rows(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists right-padded to the longest of them (no further): ids and a mask of the real positions."""
    ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=np.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1.0
    return ids, mask


def candidate_batch(
    tokenizer: PreTrainedTokenizerBase, candidates: list[str], start_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forcing inputs for scoring candidates in one decoder pass: decoder inputs (start + tokens,
    right-shifted), targets (tokens + EOS) and a mask of real target positions (the PyTorch reference's layout)."""
    targets, mask = token_rows([tokenizer(c).input_ids for c in candidates], pad_id)  # T5 tokenizers append EOS
    decoder_ids = np.concatenate([np.full((len(candidates), 1), start_id, dtype=np.int64), targets[:, :-1]], axis=1)
    return decoder_ids, targets, mask


def sequence_log_likelihood(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sum of target-token log-probabilities per row (padding excluded)."""
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logsumexp(logits)
    return (picked * mask).sum(-1)


def candidates_for(task: tasks.Task, example: tasks.Example) -> list[str]:
    """The closed label set of one example: the task's labels, or the example's distinct choices in order
    (a repeated choice is one answer; CQA repeats a choice in about 1% of its questions)."""
    if task.answer_style == "label":
        return list(task.labels)
    if not example.choices:
        raise ValueError(f"example {example.id}: a choice task needs the example's choices for label scoring")
    return list(dict.fromkeys(example.choices))


def continuation_calls(
    runtime: Runtime, positions: np.ndarray, rows: np.ndarray, source_length: int
) -> list[np.ndarray]:
    """How the candidate rows with tokens after the first split into cached decoder calls. One call for all
    of them needs each row's cross-attention keys/values gathered out of its example's (a copy, no matmul);
    one call per candidate position (every example's i-th candidate) reads them in place, but streams the
    decoder's weights once per call. Both are memory traffic, which bounds a small CPU, so take the one that
    moves fewer bytes (t5-small-shaped int8, 3 labels, one thread: at batch 16 three calls took 59 ms against
    78 ms for one call with the copy; at batch 1 the copy is a few rows and one call wins)."""
    model = runtime.export_config["model"]
    row_bytes = (
        2 * model["num_decoder_layers"] * model["num_heads"] * source_length * model["d_kv"] * 4
    )  # fp32 keys + values
    calls = np.unique(positions[rows])
    if (len(calls) - 1) * runtime.step_weight_bytes >= len(rows) * row_bytes:
        return [rows]
    return [rows[positions[rows] == position] for position in calls]


def logits_chunks(runtime: Runtime, rows: np.ndarray, token_ids: list[list[int]]) -> list[np.ndarray]:
    """`rows` in consecutive chunks whose continuation logits ([rows, longest continuation, vocab], fp32) stay
    within the runtime's logits_chunk_bytes (a single row larger than that goes alone)."""
    width = max(len(token_ids[r]) - 1 for r in rows)
    row_bytes = width * runtime.export_config["model"]["vocab_size"] * 4
    size = max(1, runtime.logits_chunk_bytes // row_bytes)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def continuation_log_likelihood(
    runtime: Runtime,
    token_ids: list[list[int]],
    rows: np.ndarray,
    examples: np.ndarray,
    mask: np.ndarray,
    past: dict[str, Any],
    hidden: Any,
) -> np.ndarray:
    """Log-likelihood of candidate `rows`' tokens after the first, EOS included, in one cached decoder call
    on their examples' start-step keys/values: read in place (a slice) when the rows are consecutive examples in
    order, else gathered by index."""
    pad = runtime.export_config["model"]["pad_token_id"]
    inputs, _ = token_rows([token_ids[r][:-1] for r in rows], pad)
    targets, target_mask = token_rows([token_ids[r][1:] for r in rows], pad)
    if not np.array_equal(examples, np.arange(len(mask))):
        consecutive = np.array_equal(examples, np.arange(examples[0], examples[0] + len(examples)))
        pick = slice(int(examples[0]), int(examples[0]) + len(examples)) if consecutive else examples
        past = {name: to_numpy(value)[pick] for name, value in past.items()}
        mask = mask[pick]
        hidden = to_numpy(hidden)[pick] if runtime.merged else hidden  # the merged graph takes it, unused with a cache
    logits, _ = next_step_logits(runtime, inputs, mask, past, hidden, logits_only=True)
    return sequence_log_likelihood(logits, targets, target_mask)


def score_candidates(runtime: Runtime, texts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
    """Exact log-likelihood of each example's candidate labels (sum of token log-probs, EOS included).

    The encoder and the decoder's start step run once per example (B rows): the start step gives every
    candidate's first-token log-prob and the self/cross-attention keys/values. The candidates' remaining
    tokens then go through the cached decoder, which takes those keys/values as its past and never projects
    the encoder states again, in calls whose logits stay within the runtime's logits_chunk_bytes. Every candidate
    is scored to the end: its exact probability over the set is part of the prediction, so none can be dropped
    after the first token."""
    model = runtime.export_config["model"]
    hidden, mask = encode(runtime, texts)
    start = np.full((len(texts), 1), model["decoder_start_token_id"], dtype=np.int64)
    logits, outputs = decoder_logits(runtime, hidden, mask, start, with_presents=True)
    past = carry_past(runtime, outputs, {})
    counts = [len(cs) for cs in candidates]
    owners = np.repeat(np.arange(len(texts)), counts)
    positions = np.concatenate([np.arange(count) for count in counts])
    flat = [c for cs in candidates for c in cs]
    unseen = [c for c in dict.fromkeys(flat) if c not in runtime.label_token_ids]  # a choice task's choices
    tokenized = runtime.label_token_ids | (
        dict(zip(unseen, runtime.tokenizer(unseen).input_ids, strict=True)) if unseen else {}
    )  # T5 tokenizers append EOS
    token_ids = [tokenized[c] for c in flat]
    first = logits[:, 0, :]
    scores = first[owners, [ids[0] for ids in token_ids]] - logsumexp(first)[owners]
    longer = np.flatnonzero([len(ids) > 1 for ids in token_ids])  # a candidate that is EOS alone is scored already
    if len(longer):
        for call in continuation_calls(runtime, positions, longer, mask.shape[1]):
            for rows in logits_chunks(runtime, call, token_ids):
                scores[rows] += continuation_log_likelihood(runtime, token_ids, rows, owners[rows], mask, past, hidden)
    return np.split(scores, np.cumsum(counts)[:-1])


def closed_set_prediction(candidates: list[str], log_likelihoods: np.ndarray) -> Prediction:
    """The most likely candidate with its scores: probabilities are the candidates' likelihoods normalised
    over the set (a softmax of the log-likelihoods). The margin is the label's probability minus the
    runner-up's: in [0, 1] on the same scale as the probability whatever the number of candidates, so one
    threshold reads the same for every task (a log-likelihood gap is unbounded and grows with label length)."""
    probabilities = np.exp(log_likelihoods.astype(np.float64) - log_likelihoods.max())
    probabilities /= probabilities.sum()
    best = int(np.argmax(log_likelihoods))
    runner_up = float(np.sort(probabilities)[-2]) if len(candidates) > 1 else 0.0
    return Prediction(
        candidates[best],
        probability=float(probabilities[best]),
        margin=float(probabilities[best]) - runner_up,
        scores={c: float(p) for c, p in zip(candidates, probabilities, strict=True)},
        log_prob=float(log_likelihoods[best]),
    )


def closed_set_predictions(runtime: Runtime, texts: list[str], examples: list[tasks.Example]) -> list[Prediction]:
    """The fast path's predictions for the label inputs `texts` of `examples`: every candidate scored exactly."""
    candidates = [candidates_for(runtime.task, e) for e in examples]
    return [
        closed_set_prediction(cs, s)
        for cs, s in zip(candidates, score_candidates(runtime, texts, candidates), strict=True)
    ]


def decode_rationales(runtime: Runtime, examples: list[tasks.Example]) -> list[str]:
    """Each example's rationale, greedy from its "explain: " input."""
    if not examples:
        return []
    ids, _ = greedy_decode(
        runtime, [tasks.rationale_input(e) for e in examples], runtime.export_config["max_new_tokens"]["rationale"]
    )
    return [rationale.strip() for rationale in runtime.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def predict(
    runtime: Runtime, examples: list[tasks.Example], explain: bool = False, fast_path: bool = True
) -> list[Prediction]:
    """Labels for `examples` ("predict: " input); with explain=True also rationales ("explain: " input).

    Args:
        runtime: from `load_runtime`
        examples: task examples (input text; choices for a choice task)
        explain: also generate each example's rationale
        fast_path: score a closed label set exactly instead of generating the label
    """
    if not examples:
        return []
    label_texts = [tasks.label_input(e) for e in examples]
    if fast_path and runtime.task.closed_label_set:
        predictions = closed_set_predictions(runtime, label_texts, examples)
    else:
        ids, log_probs = greedy_decode(
            runtime, label_texts, runtime.export_config["max_new_tokens"]["label"], score=True
        )
        labels = [t.strip() for t in runtime.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        predictions = [
            Prediction(label, log_prob=float(log_prob)) for label, log_prob in zip(labels, log_probs, strict=True)
        ]
    if explain:
        for prediction, rationale in zip(predictions, decode_rationales(runtime, examples), strict=True):
            prediction.rationale = rationale
    return predictions


def rationale_labels(runtime: Runtime, examples: list[tasks.Example], predictions: list[Prediction]) -> list[str]:
    """The label each example's rationale reaches (the consistency signal): the fast path's label for the label
    input with the student's own rationale after it (`tasks.reasoned_label_input`). The student learnt its
    rationales as the teacher's, which carry no answer sentence, so there is none to parse; the label task reading
    the rationale is the one reader of it the student has (no new training task). The rationale is the prediction's
    own where it has one (explain), else decoded here and not kept. A closed label set only."""
    if not examples:
        return []
    missing = [i for i, p in enumerate(predictions) if p.rationale is None]
    decoded = dict(zip(missing, decode_rationales(runtime, [examples[i] for i in missing]), strict=True))
    rationales = [decoded[i] if i in decoded else p.rationale for i, p in enumerate(predictions)]
    texts = [tasks.reasoned_label_input(e, r) for e, r in zip(examples, rationales, strict=True)]
    return [p.label for p in closed_set_predictions(runtime, texts, examples)]
