"""Label-only decoding speed of the exported student against PyTorch eager and CTranslate2.

One run, the same validation inputs for every backend, batch 1 and batch 16, two model sizes (tiny and a
t5-small-shaped random untied T5): PyTorch eager `generate`, ONNX Runtime fp32 and int8 (split and merged
decoder layouts), and CTranslate2 int8 (beam 1) as the reference — each with the label fast path (score
the closed label set exactly; ONNX Runtime: the runtime's batched label path, PyTorch: one teacher-forced
pass, CTranslate2: `score_batch`) and without (greedy generation).
Each backend runs in its own fresh process (peak RSS is that process's); the timed part holds
/tmp/stepwise-bench.lock so no two benchmarks overlap.

Then, per model size, a head-to-head in one process, the label paths taking turns call by call so that the
shared machine's noise falls on all of them alike: the ONNX Runtime int8 batched label path (also with its
encoder batch in one call instead of length groups), the runtime before it (one encoder call, every candidate a
full decoder row projecting its example's encoder states again), CTranslate2 int8 `score_batch` over every
candidate (the label path's own decision, summed log-probs on both; how often the two decide alike is reported),
CTranslate2 int8 greedy, and CTranslate2 int8 encoder + one decoder step (what any label path on CTranslate2 would
pay at least). The issue-10 targets are read from it, and the batched path's time is split per ONNX session
(encoder, start step, cached continuation) and the rest.

    python3 -m stepwise bench export   # -> benchmarks/results/export.{json,md,png}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, bench_lock, command_line, in_fresh_process, machine, peak_rss_mb

TASK = "esnli"
SIZES = ("tiny", "small")
# backend -> (kind, export variant); ORT variants are folders written by `stepwise export`.
BACKENDS = {
    "pytorch-eager": ("pytorch", None),
    "ort-fp32": ("ort", dict(decoder_layout="split")),
    "ort-fp32-merged": ("ort", dict(decoder_layout="merged")),
    "ort-int8": ("ort", dict(decoder_layout="split", quantize="int8")),
    "ort-int8-merged": ("ort", dict(decoder_layout="merged", quantize="int8")),
    "ct2-int8": ("ct2", None),
}


# ---------------------------------------------------------------- preparing the models


def prepare(workdir: Path, size: str) -> dict[str, Any]:
    """The student folder, its ONNX exports (each parity-gated) and its CTranslate2 int8 conversion."""
    from ctranslate2.converters import TransformersConverter

    from stepwise import artifacts
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training.tiny import build_student_folder

    model_dir = build_student_folder(workdir / size / "student", size, TASK)
    paths: dict[str, Any] = {"pytorch-eager": str(model_dir)}
    parity: dict[str, Any] = {}
    for backend, (kind, variant) in BACKENDS.items():
        if kind != "ort":
            continue
        out = workdir / size / backend
        if not (out / artifacts.PARITY).exists():
            export_main(model=model_dir, out=out, parity=ParityOptions(parity_limit=64), overwrite=True, **variant)
        parity[backend] = artifacts.read_parity(out)
        paths[backend] = str(out)
    ct2_dir = workdir / size / "ct2-int8"
    if not (ct2_dir / "model.bin").exists():
        TransformersConverter(str(model_dir)).convert(str(ct2_dir), quantization="int8", force=True)
    paths["ct2-int8"] = str(ct2_dir)
    label_tokens = artifacts.read_export_config(workdir / size / "ort-fp32")["max_new_tokens"]["label"]
    return {"paths": paths, "parity": parity, "label_tokens": label_tokens}


def size_on_disk(backend: str, path: Path) -> int:
    patterns = {"pytorch": ["model.safetensors"], "ort": ["*.onnx"], "ct2": ["model.bin"]}[BACKENDS[backend][0]]
    return sum(f.stat().st_size for pattern in patterns for f in path.glob(pattern))


# ---------------------------------------------------------------- CTranslate2, the reference


def ct2_translator(path: str | Path, threads: int, compute_type: str = "int8", device: str = "cpu") -> Any:
    import ctranslate2

    return ctranslate2.Translator(
        str(path), device=device, compute_type=compute_type, inter_threads=1, intra_threads=threads
    )


def ct2_tokens(tokenizer: Any, text: str, eos: bool = True) -> list[str]:
    ids = tokenizer(text).input_ids  # T5 tokenizers append EOS
    return tokenizer.convert_ids_to_tokens(ids if eos else ids[:-1])


def ct2_greedy_labels(translator: Any, tokenizer: Any, examples: list[Any], max_tokens: int) -> list[str]:
    """CTranslate2 greedy decoding (beam 1) of each example's label, at most `max_tokens` tokens."""
    from stepwise import tasks

    sources = [ct2_tokens(tokenizer, tasks.label_input(e)) for e in examples]
    results = translator.translate_batch(sources, beam_size=1, max_decoding_length=max_tokens)
    return [tokenizer.convert_tokens_to_string(r.hypotheses[0]).strip() for r in results]


def ct2_score_labels(translator: Any, tokenizer: Any, task: Any, examples: list[Any]) -> list[str]:
    """Our label path's decision on CTranslate2: `score_batch` over every candidate label of every example (source
    the label input, target the candidate's tokens; all of the batch in one call), each example's candidate of the
    highest summed token log-prob, EOS included. Summed, not averaged, as the runtime's `score_candidates` does: no
    length normalisation on either side."""
    import numpy as np

    from stepwise import tasks
    from stepwise.export.runtime import candidates_for

    candidates = [candidates_for(task, e) for e in examples]
    sources = [ct2_tokens(tokenizer, tasks.label_input(e)) for e in examples]
    # score_batch appends EOS to each target itself and returns a log-prob per target token, EOS's included.
    scored = translator.score_batch(
        [source for source, cs in zip(sources, candidates, strict=True) for _ in cs],
        [ct2_tokens(tokenizer, c, eos=False) for cs in candidates for c in cs],
    )
    sums = iter([sum(r.log_probs) for r in scored])
    return [cs[int(np.argmax([next(sums) for _ in cs]))] for cs in candidates]


# ---------------------------------------------------------------- one backend, in its own process


@dataclass(frozen=True)
class Placement:
    """Where PyTorch and CTranslate2 run, and in what precision (an ONNX export runs on the providers its folder
    names): the CPU in float32 / int8 here, `stepwise bench gpu` a CUDA device."""

    device: str = "cpu"
    torch_dtype: str = "float32"
    ct2_compute_type: str = "int8"


def label_decoder(
    kind: str, path: Path, model_dir: Path, threads: int, label_tokens: int, placement: Placement = Placement()
):
    """(examples, fast_path) -> labels for one backend of `kind` (ort, pytorch, ct2), everything loaded up front."""
    from stepwise import tasks

    task = tasks.load_task(model_dir)
    if kind == "ort":
        from stepwise.export.runtime import load_runtime, predict

        runtime = load_runtime(path, threads=threads)
        return lambda examples, fast: [p.label for p in predict(runtime, examples, fast_path=fast)]
    if kind == "pytorch":
        import torch

        from stepwise.export import parity

        torch.set_num_threads(threads)
        model, tokenizer = parity.load_torch_model(model_dir)
        model = model.to(device=placement.device, dtype=getattr(torch, placement.torch_dtype))

        def decode_torch(examples, fast):
            if fast:
                return parity.torch_fast_path_labels(model, tokenizer, task, examples)
            return parity.torch_greedy_labels(model, tokenizer, [tasks.label_input(e) for e in examples], label_tokens)

        return decode_torch
    from transformers import AutoTokenizer

    translator = ct2_translator(path, threads, placement.ct2_compute_type, placement.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def decode_ct2(examples, fast):
        if fast:
            return ct2_score_labels(translator, tokenizer, task, examples)
        return ct2_greedy_labels(translator, tokenizer, examples, label_tokens)

    return decode_ct2


def time_backend(
    kind: str,
    path: Path,
    model_dir: Path,
    label_tokens: int,
    threads: int,
    calls_batch1: int,
    calls_batch16: int,
    placement: Placement = Placement(),
) -> dict[str, Any]:
    """Latency per call (p50/p95) and throughput for batch 1 and 16, with and without the fast path, of one
    backend of `kind` (ort, pytorch, ct2: see `label_decoder`) loaded from `path`, with this process's peak RSS.
    Run it in a fresh process (`harness.in_fresh_process`): the peak is then this backend's alone. `model_dir` is
    the PyTorch student (its task and tokenizer); `label_tokens` caps greedy decoding."""
    import numpy as np

    from stepwise import tasks

    decode = label_decoder(kind, Path(path), Path(model_dir), threads, label_tokens, placement)
    examples = tasks.load_split(tasks.load_task(Path(model_dir)), "valid")
    rows = []
    for batch, calls in ((1, calls_batch1), (16, calls_batch16)):
        batches = [examples[(i * batch) % len(examples) :][:batch] for i in range(calls)]
        for fast in (True, False):
            for warm in batches[:3]:
                decode(warm, fast)
            latencies, labels = [], []
            for chunk in batches:
                started = time.perf_counter()
                labels += decode(chunk, fast)
                latencies.append(time.perf_counter() - started)
            ms = np.array(latencies) * 1000
            rows.append(
                {
                    "batch": batch,
                    "fast_path": fast,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p95_ms": float(np.percentile(ms, 95)),
                    "throughput_per_s": batch * len(ms) / (ms.sum() / 1000),
                    "labels": labels,
                }
            )
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


class TimedSession:
    """An ONNX Runtime session whose run() adds its wall time to the benchmark's per-session tally."""

    def __init__(self, session: Any, tally: dict[str, float], key: str):
        self.session, self.tally, self.key = session, tally, key

    def run(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.tally[self.key] += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


LABEL_PATH = "ort-int8 batched label path"
# CTranslate2 making the label path's decision: its like-for-like peer.
CT2_SCORE = "ct2-int8 score_batch (every candidate)"
SESSIONS = {"encoder": "encoder", "decoder": "start step", "decoder_with_past": "continuation"}


def head_to_head(
    paths: dict[str, str], label_tokens: int, threads: int, rounds_batch1: int, rounds_batch16: int
) -> dict[str, Any]:
    """The int8 label paths taking turns call by call: p50 per path and batch, the share of examples where each
    path's decision is the batched label path's (over the timed rounds' inputs), and the batched path's time per
    ONNX session (median per call). `paths`: backend -> folder, as `prepare` returns them."""
    import dataclasses

    import numpy as np

    from stepwise import tasks
    from stepwise.export import parity
    from stepwise.export.runtime import candidates_for, load_runtime, predict

    runtime = load_runtime(Path(paths["ort-int8"]), threads=threads)
    tally: dict[str, float] = {}
    timed = dataclasses.replace(
        runtime, **{name: TimedSession(getattr(runtime, name), tally, name) for name in SESSIONS}
    )
    translator = ct2_translator(paths["ct2-int8"], threads)
    tokenizer, task = runtime.tokenizer, runtime.task
    examples = tasks.load_split(task, "valid")
    one_encoder_call = dataclasses.replace(runtime, encoder_call_tokens=1 << 30)

    def one_pass(batch: list[tasks.Example]) -> list[str]:
        """The runtime before: one encoder call, every candidate a full decoder row."""
        candidates = [candidates_for(task, e) for e in batch]
        scores = parity.onnx_one_pass_scores(one_encoder_call, [tasks.label_input(e) for e in batch], candidates)
        return [cs[int(np.argmax(s))] for cs, s in zip(candidates, scores, strict=True)]

    def ct2_one_step(batch: list[tasks.Example]) -> None:
        """What any label path on CTranslate2 pays at least; a one-token label is no decision to compare."""
        ct2_greedy_labels(translator, tokenizer, batch, 1)

    label_paths: dict[str, Callable[[list[tasks.Example]], list[str] | None]] = {
        LABEL_PATH: lambda batch: [p.label for p in predict(timed, batch)],
        "ort-int8 batched label path, one encoder call": lambda batch: [
            p.label for p in predict(one_encoder_call, batch)
        ],
        "ort-int8 one-pass scorer (before)": one_pass,
        "ct2-int8 greedy": lambda batch: ct2_greedy_labels(translator, tokenizer, batch, label_tokens),
        "ct2-int8 encoder + 1 step": ct2_one_step,
        # Last, so that the earlier paths take their turns in the order they did before it came.
        CT2_SCORE: lambda batch: ct2_score_labels(translator, tokenizer, task, batch),
    }
    results: dict[str, Any] = {}
    for size, rounds in ((1, rounds_batch1), (16, rounds_batch16)):
        batches = [examples[(i * size) % len(examples) :][:size] for i in range(rounds)]
        times: dict[str, list[float]] = {name: [] for name in label_paths}
        decisions: dict[str, list[str]] = {name: [] for name in label_paths}
        profile: list[dict[str, float]] = []
        for index, batch in enumerate(batches):
            for name, run in label_paths.items():
                tally.update(dict.fromkeys(SESSIONS, 0.0))
                started = time.perf_counter()
                labels = run(batch)
                elapsed = time.perf_counter() - started
                if index >= 2:  # the first rounds warm up
                    times[name].append(elapsed * 1000)
                    decisions[name] += labels or []
                    if name == LABEL_PATH:
                        rest = {"rest (Python, NumPy)": (elapsed - sum(tally.values())) * 1000, "total": elapsed * 1000}
                        profile.append({SESSIONS[k]: v * 1000 for k, v in tally.items()} | rest)
        results[f"batch{size}"] = {
            "p50_ms": {name: float(np.median(v)) for name, v in times.items()},
            "same_decision_as_label_path": {
                name: float(np.mean([a == b for a, b in zip(labels, decisions[LABEL_PATH], strict=True)]))
                for name, labels in decisions.items()
                if labels
            },
            "profile_p50_ms": {part: float(np.median([p[part] for p in profile])) for part in profile[0]},
            "rounds": len(batches) - 2,
        }
    return results


def thread_shapes(path: str, thread_counts: Sequence[int], rounds_batch1: int, rounds_batch16: int) -> dict[str, Any]:
    """The int8 label path at each intra-op thread count, with its encoder batch in length groups and in one
    call, all variants taking turns call by call in this one process (one runtime per thread count): p50 total
    and encoder ms per batch size, and the batch-16 cost per example over batch 1's."""
    import dataclasses

    import numpy as np

    from stepwise import tasks
    from stepwise.export.runtime import load_runtime, predict

    tally: dict[str, float] = {}
    variants: dict[str, Any] = {}
    for threads in thread_counts:
        runtime = load_runtime(Path(path), threads=threads)
        timed = dataclasses.replace(runtime, encoder=TimedSession(runtime.encoder, tally, "encoder"))
        variants[f"{threads} thread(s), length groups"] = timed
        variants[f"{threads} thread(s), one encoder call"] = dataclasses.replace(timed, encoder_call_tokens=1 << 30)
    examples = tasks.load_split(timed.task, "valid")
    results: dict[str, Any] = {}
    for size, rounds in ((1, rounds_batch1), (16, rounds_batch16)):
        batches = [examples[(i * size) % len(examples) :][:size] for i in range(rounds)]
        total: dict[str, list[float]] = {name: [] for name in variants}
        encoder: dict[str, list[float]] = {name: [] for name in variants}
        for index, batch in enumerate(batches):
            for name, runtime in variants.items():
                tally["encoder"] = 0.0
                started = time.perf_counter()
                predict(runtime, batch)
                if index >= 2:  # the first rounds warm up
                    total[name].append((time.perf_counter() - started) * 1000)
                    encoder[name].append(tally["encoder"] * 1000)
        results[f"batch{size}"] = {
            "p50_ms": {name: float(np.median(v)) for name, v in total.items()},
            "encoder_p50_ms": {name: float(np.median(v)) for name, v in encoder.items()},
            "rounds": len(batches) - 2,
        }
    one, sixteen = results["batch1"]["p50_ms"], results["batch16"]["p50_ms"]
    results["cost_per_example_batch16_over_batch1"] = {name: sixteen[name] / 16 / one[name] for name in variants}
    return results


def render_thread_shapes(shapes: dict[str, Any]) -> str:
    lines = [
        "| model | int8 label path | batch 1 p50 ms | batch 16 p50 ms | encoder at batch 16 ms "
        "| batch 16 cost per example / batch 1 (goal <= 0.333) |",
        "|---|---|---|---|---|---|",
    ]
    for size, shape in shapes.items():
        for name, one in shape["batch1"]["p50_ms"].items():
            lines.append(
                f"| {size} | {name} | {one:.2f} | {shape['batch16']['p50_ms'][name]:.2f} | "
                f"{shape['batch16']['encoder_p50_ms'][name]:.2f} | "
                f"{shape['cost_per_example_batch16_over_batch1'][name]:.3f} |"
            )
    return "\n".join(lines)


def run_thread_shapes(prepared: dict[str, Any], thread_counts: Sequence[int], timing: TimingOptions, out: Path) -> Path:
    """`--compare-threads`: only the thread and length-group comparison, per size, written to `out`."""
    from stepwise import artifacts

    shapes: dict[str, Any] = {}
    with bench_lock():
        for size, info in prepared.items():
            print(f"[bench] {size} threads {list(thread_counts)}", flush=True)
            shapes[size] = in_fresh_process(
                thread_shapes,
                env={"TOKENIZERS_PARALLELISM": "false"},
                path=info["paths"]["ort-int8"],
                thread_counts=list(thread_counts),
                rounds_batch1=timing.rounds_batch1,
                rounds_batch16=timing.rounds_batch16,
            )
    report = {"command": command_line(), "machine": machine(), "task": TASK, "thread_shapes": shapes}
    artifacts.write_json(out.with_suffix(".json"), report)
    table = render_thread_shapes(shapes)
    artifacts.write_atomic(out.with_suffix(".md"), table + "\n")
    print(table)
    return out.with_suffix(".json")


# ---------------------------------------------------------------- the run


def render_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | backend | fast path | batch | p50 ms | p95 ms | examples/s | peak RSS MB | size MB "
        "| labels = PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {'yes' if r['fast_path'] else 'no (greedy)'} | {r['batch']} | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['throughput_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.1f} | "
            f"{r['agreement_with_pytorch']:.2f} |"
        )
    return "\n".join(lines)


def issue_targets(duel: dict[str, Any]) -> dict[str, float]:
    """Issue 10's two targets for the int8 label path, from the head-to-head: at batch 16 at least 2x faster
    than CTranslate2 int8 greedy, and a cost per example at batch 16 at most 1/3 of batch 1's; with the other
    ratios the README quotes (against CTranslate2 scoring every candidate, the path before, ...)."""
    one, sixteen = duel["batch1"]["p50_ms"], duel["batch16"]["p50_ms"]
    path, before = LABEL_PATH, "ort-int8 one-pass scorer (before)"
    return {
        "speedup_vs_ct2_int8_greedy_batch16 (target >= 2)": sixteen["ct2-int8 greedy"] / sixteen[path],
        "speedup_vs_ct2_int8_score_batch1": one[CT2_SCORE] / one[path],
        "speedup_vs_ct2_int8_score_batch16": sixteen[CT2_SCORE] / sixteen[path],
        "cost_per_example_batch16_over_batch1 (target <= 0.333)": sixteen[path] / 16 / one[path],
        "speedup_vs_before_batch1": one[before] / one[path],
        "speedup_vs_before_batch16": sixteen[before] / sixteen[path],
        "speedup_from_length_groups_batch16": sixteen["ort-int8 batched label path, one encoder call"] / sixteen[path],
        "ct2_encoder_plus_1_step_over_ct2_greedy_batch16": sixteen["ct2-int8 encoder + 1 step"]
        / sixteen["ct2-int8 greedy"],
        "ort_encoder_share_of_label_path_batch16": duel["batch16"]["profile_p50_ms"]["encoder"]
        / duel["batch16"]["profile_p50_ms"]["total"],
    }


def render_head_to_head(duels: dict[str, Any], targets: dict[str, dict[str, float]]) -> str:
    lines = [
        "| model | label path (int8, taking turns) | batch 1 p50 ms | batch 16 p50 ms | batch 16 ms per example "
        "| decisions = label path (batch 1, 16) |",
        "|---|---|---|---|---|---|",
    ]
    for size, duel in duels.items():
        for name, one in duel["batch1"]["p50_ms"].items():
            sixteen = duel["batch16"]["p50_ms"][name]
            same = [duel[batch]["same_decision_as_label_path"].get(name) for batch in ("batch1", "batch16")]
            agreement = ", ".join(f"{a:.3f}" for a in same) if None not in same else "-"
            lines.append(f"| {size} | {name} | {one:.2f} | {sixteen:.2f} | {sixteen / 16:.2f} | {agreement} |")
    parts = list(next(iter(duels.values()))["batch1"]["profile_p50_ms"])
    lines += ["", "| model | batch | " + " | ".join(f"{p} ms" for p in parts) + " |", "|---|---|" + "---|" * len(parts)]
    for size, duel in duels.items():
        for batch in ("batch1", "batch16"):
            lines.append(
                f"| {size} | {batch.removeprefix('batch')} | "
                + " | ".join(f"{duel[batch]['profile_p50_ms'][p]:.2f}" for p in parts)
                + " |"
            )
    lines += [
        "",
        "| model | " + " | ".join(next(iter(targets.values()))) + " |",
        "|---|" + "---|" * len(next(iter(targets.values()))),
    ]
    for size, values in targets.items():
        lines.append(f"| {size} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(BACKENDS)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, batch in enumerate((1, 16)):
            ax = axes[i][j]
            for k, fast in enumerate((False, True)):
                values = [
                    next(
                        r["p50_ms"]
                        for r in rows
                        if (r["model"], r["backend"], r["batch"], r["fast_path"]) == (model, b, batch, fast)
                    )
                    for b in backends
                ]
                ax.bar(
                    [x + (k - 0.5) * 0.4 for x in range(len(backends))],
                    values,
                    width=0.4,
                    label="fast path" if fast else "greedy generate",
                )
            ax.set_xticks(range(len(backends)), backends, rotation=25, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("p50 latency, ms (log)")
            ax.set_title(f"{model} model, batch {batch}")
            ax.legend()
    fig.suptitle("Label-only decoding latency (shared 2-core CPU; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@dataclass(frozen=True)
class TimingOptions:
    """How each backend is timed.

    Args:
        threads: intra-op threads for every backend (1: stable on a shared 2-core box)
        calls_batch1: timed calls per backend and path at batch 1 (after 3 warm-up calls)
        calls_batch16: timed calls per backend and path at batch 16
        rounds_batch1: head-to-head rounds at batch 1 (every int8 label path once per round; 2 warm up)
        rounds_batch16: head-to-head rounds at batch 16
    """

    threads: int = 1
    calls_batch1: int = 60
    calls_batch16: int = 12
    rounds_batch1: int = 60
    rounds_batch16: int = 20

    def __post_init__(self) -> None:
        if self.threads < 1 or min(self.calls_batch1, self.calls_batch16) < 1:
            raise ValueError(
                f"--threads, --calls-batch1 and --calls-batch16 must be 1 or more, got {self.threads}, "
                f"{self.calls_batch1} and {self.calls_batch16}"
            )
        if min(self.rounds_batch1, self.rounds_batch16) < 3:
            raise ValueError(
                f"--rounds-batch1 and --rounds-batch16 must be 3 or more (the first 2 rounds warm up), "
                f"got {self.rounds_batch1} and {self.rounds_batch16}"
            )


def time_every_backend(prepared: dict[str, Any], timing: TimingOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every backend of every size in its own fresh process, then the size's head-to-head: the result rows
    (labels compared with PyTorch's) and the head-to-heads by size."""
    env = {"OMP_NUM_THREADS": str(timing.threads), "TOKENIZERS_PARALLELISM": "false"}
    rows: list[dict[str, Any]] = []
    duels: dict[str, Any] = {}
    for size, info in prepared.items():
        paths, model_dir = info["paths"], info["paths"]["pytorch-eager"]
        torch_labels: dict[tuple[int, bool], list[str]] = {}
        for backend in BACKENDS:
            print(f"[bench] {size} {backend}", flush=True)
            result = in_fresh_process(
                time_backend,
                env=env,
                kind=BACKENDS[backend][0],
                path=paths[backend],
                model_dir=model_dir,
                label_tokens=info["label_tokens"],
                threads=timing.threads,
                calls_batch1=timing.calls_batch1,
                calls_batch16=timing.calls_batch16,
            )
            for row in result["rows"]:
                labels = row.pop("labels")
                reference = torch_labels.setdefault((row["batch"], row["fast_path"]), labels)  # pytorch-eager is first
                agreement = sum(a == b for a, b in zip(labels, reference, strict=True)) / len(reference)
                rows.append(
                    row
                    | {
                        "model": size,
                        "backend": backend,
                        "peak_rss_mb": result["peak_rss_mb"],
                        "size_mb": size_on_disk(backend, Path(paths[backend])) / 1e6,
                        "agreement_with_pytorch": agreement,
                    }
                )
        print(f"[bench] {size} head-to-head", flush=True)
        duels[size] = in_fresh_process(
            head_to_head,
            env=env,
            paths=paths,
            label_tokens=info["label_tokens"],
            threads=timing.threads,
            rounds_batch1=timing.rounds_batch1,
            rounds_batch16=timing.rounds_batch16,
        )
    sizes, backends = list(prepared), list(BACKENDS)
    rows.sort(key=lambda r: (sizes.index(r["model"]), r["batch"], not r["fast_path"], backends.index(r["backend"])))
    return rows, duels


def speedups(rows: list[dict[str, Any]], sizes: Sequence[str]) -> dict[str, Any]:
    """The p50 ratios the README quotes, per size and batch."""

    def p50(model: str, backend: str, batch: int, fast: bool) -> float:
        return next(
            r["p50_ms"]
            for r in rows
            if (r["model"], r["backend"], r["batch"], r["fast_path"]) == (model, backend, batch, fast)
        )

    return {
        size: {
            f"batch{batch}": {
                "ort_int8_fast_vs_pytorch_generate": p50(size, "pytorch-eager", batch, False)
                / p50(size, "ort-int8", batch, True),
                "ort_int8_fast_vs_ct2_int8_generate": p50(size, "ct2-int8", batch, False)
                / p50(size, "ort-int8", batch, True),
                "ort_int8_fast_vs_ct2_int8_score": p50(size, "ct2-int8", batch, True)
                / p50(size, "ort-int8", batch, True),
                "ort_int8_greedy_vs_ct2_int8_greedy": p50(size, "ct2-int8", batch, False)
                / p50(size, "ort-int8", batch, False),
                "fast_path_gain_ort_int8": p50(size, "ort-int8", batch, False) / p50(size, "ort-int8", batch, True),
                "split_vs_merged_int8_greedy": p50(size, "ort-int8-merged", batch, False)
                / p50(size, "ort-int8", batch, False),
                "split_vs_merged_fp32_greedy": p50(size, "ort-fp32-merged", batch, False)
                / p50(size, "ort-fp32", batch, False),
            }
            for batch in (1, 16)
        }
        for size in sizes
    }


def main(
    sizes: Sequence[str] = SIZES,
    timing: TimingOptions = TimingOptions(),
    workdir: Path = ROOT / "runs" / "export-bench",
    out: Path = RESULTS / "export",
    compare_threads: Sequence[int] = (),
) -> Path:
    """Label-only decoding speed of the exported student against PyTorch eager and CTranslate2.

    Args:
        sizes: student shapes (tiny, small = t5-small's shape), each exported in every ONNX variant
        timing: how each backend is timed
        workdir: the students, their exports and CTranslate2 conversions (reused when rerun)
        out: result files (.json, .md, .png) without suffix
        compare_threads: only the int8 label path at these intra-op thread counts (e.g. 1 2), length groups
            against one encoder call, taking turns in one process: benchmarks/results/export_threads.{json,md}
            unless --out names other files
    """
    from stepwise import artifacts

    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; known: {list(SIZES)}")
    if any(threads < 1 for threads in compare_threads):
        raise ValueError(f"--compare-threads takes thread counts of 1 or more, got {list(compare_threads)}")
    prepared = {size: prepare(Path(workdir), size) for size in sizes}
    if compare_threads:
        target = RESULTS / "export_threads" if Path(out) == RESULTS / "export" else Path(out)
        return run_thread_shapes(prepared, compare_threads, timing, target)
    with bench_lock():
        rows, duels = time_every_backend(prepared, timing)
    summary = speedups(rows, sizes)
    targets = {size: issue_targets(duel) for size, duel in duels.items()}
    import ctranslate2
    import onnxruntime
    import torch

    report = {
        "command": command_line(),  # it takes the lock itself
        "machine": machine(),
        "threads": timing.threads,
        "task": TASK,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "ctranslate2": ctranslate2.__version__,
        },
        "label_tokens": {s: i["label_tokens"] for s, i in prepared.items()},
        "parity": {s: i["parity"] for s, i in prepared.items()},
        "speedups_p50": summary,
        "head_to_head": duels,
        "targets": targets,
        "rows": rows,
    }
    out = Path(out)
    artifacts.write_json(out.with_suffix(".json"), report)
    table = render_table(rows) + "\n\n" + render_head_to_head(duels, targets)
    artifacts.write_atomic(out.with_suffix(".md"), table + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table)
    print(json.dumps(summary | {"targets": targets}, indent=2))
    return out.with_suffix(".json")
