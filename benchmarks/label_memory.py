"""Peak memory of the label path on the largest request serving accepts, with the continuation's logits in bounded
chunks (export/runtime.py's LOGITS_CHUNK_BYTES) against one unbounded decoder call per candidate group.

The student is t5-small-shaped (int8, split decoder) with T5's 32128-row vocabulary (the logits' width; the
tokenizer is trained here and smaller). The request: 16 inputs (one full replica batch) x 16 choices x 32 tokens,
serving's default limits, with short inputs (the candidates' rows in one call, keys/values gathered per row) and with
512-token inputs (one call per candidate position). Each configuration runs in its own fresh process: its peak RSS
(VmHWM) above the RSS after loading is what the request cost.

    python3 -m stepwise bench label-memory   # -> benchmarks/results/label_memory.{json,md}
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    RESULTS,
    ROOT,
    bench_lock,
    command_line,
    in_fresh_process,
    machine,
    peak_rss_mb,
    rss_mb,
    write_results,
)
from stepwise import request_limits

TASK = "cqa"
VOCAB = 32128  # google/t5-* embedding rows
# serving's default max_batch_size, max_choices, max_choice_tokens
ITEMS = request_limits.DEFAULT_MAX_BATCH
CHOICES = request_limits.DEFAULT_MAX_CHOICES
CHOICE_TOKENS = request_limits.DEFAULT_MAX_CHOICE_TOKENS
INPUT_TOKENS = {"short": 16, "long": 512}
UNBOUNDED = 1 << 62


def prepare(workdir: Path) -> Path:
    """The t5-small-shaped CQA student with a 32128-row vocabulary, exported int8 (reused when there)."""
    from transformers import T5ForConditionalGeneration

    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training.tiny import build_student_folder

    export_dir = workdir / "onnx-int8"
    if (export_dir / "export_config.json").exists():
        return export_dir
    student = workdir / "student"
    if not (student / "model.safetensors").exists():
        build_student_folder(student, "small", TASK)
        model = T5ForConditionalGeneration.from_pretrained(student)
        model.resize_token_embeddings(VOCAB)  # the embedding and the untied lm_head, as in T5's checkpoints
        model.save_pretrained(student)
    return export_main(model=student, out=export_dir, quantize="int8", parity=ParityOptions(parity_limit=16))


def text_of_tokens(tokenizer: Any, words: list[str], tokens: int) -> str:
    """Words joined until the text is `tokens` tokens long with EOS (or the last length below it)."""
    text = words[0]
    for word in words[1:]:
        longer = f"{text} {word}"
        if len(tokenizer(longer).input_ids) > tokens:
            break
        text = longer
    return text


def worst_request(runtime: Any, input_tokens: int) -> list[Any]:
    """ITEMS examples, each with CHOICES distinct choices of CHOICE_TOKENS tokens and an input of `input_tokens`."""
    from stepwise import tasks

    words = " ".join(e.input for e in tasks.load_split(runtime.task, "valid")).split()
    examples = []
    for item in range(ITEMS):
        choices = [  # numbered, so that no two are the same answer
            text_of_tokens(runtime.tokenizer, [str(c)] + words[(item * CHOICES + c) * 40 :], CHOICE_TOKENS)
            for c in range(CHOICES)
        ]
        text = text_of_tokens(runtime.tokenizer, words[item * 40 :], input_tokens)
        examples.append(tasks.Example(id=f"worst-{item}", input=text, label=choices[0], choices=choices))
    return examples


def measure(export_dir: str, logits_chunk_bytes: int, input_tokens: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: RSS after loading, peak RSS over `repeats` worst requests, their median time."""
    import dataclasses

    import numpy as np

    from stepwise.export.runtime import load_runtime, predict

    runtime = dataclasses.replace(load_runtime(Path(export_dir), threads=1), logits_chunk_bytes=logits_chunk_bytes)
    examples = worst_request(runtime, input_tokens)
    lengths = [len(ids) for ids in runtime.tokenizer([c for e in examples for c in e.choices]).input_ids]
    loaded = rss_mb()
    times, labels = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        labels = [p.label for p in predict(runtime, examples)]
        times.append(time.perf_counter() - start)
    return {
        "rss_loaded_mb": round(loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "request_peak_mb": round(peak_rss_mb() - loaded, 1),
        "ms_p50": round(1000 * statistics.median(times), 1),
        "choice_tokens_max": int(np.max(lengths)),
        "labels": labels,
    }


def render_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Worst request: {ITEMS} inputs x {CHOICES} choices x {CHOICE_TOKENS} tokens, t5-small-shaped int8, "
        f"vocabulary {VOCAB}, one thread; request peak = peak RSS above the RSS after loading.",
        "",
        "| inputs | logits per call | request peak MB | peak RSS MB | ms p50 |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        chunk = (
            "unbounded (before)" if row["logits_chunk_bytes"] >= UNBOUNDED else f"{row['logits_chunk_bytes'] >> 20} MiB"
        )
        lines.append(
            f"| {row['inputs']} ({row['input_tokens']} tokens) | {chunk} | {row['request_peak_mb']:.0f} | "
            f"{row['peak_rss_mb']:.0f} | {row['ms_p50']:.0f} |"
        )
    return "\n".join(lines)


def main(
    repeats: int = 3,
    workdir: Path = ROOT / "runs" / "label-memory-bench",
    out: Path = RESULTS / "label_memory",
) -> Path:
    """Peak memory of the label path on the largest request serving accepts, chunked against unbounded.

    Args:
        repeats: worst requests timed per configuration (each configuration in its own process)
        workdir: the student and its int8 export (reused when rerun)
        out: result files (.json, .md) without suffix
    """
    from stepwise.export.runtime import LOGITS_CHUNK_BYTES

    export_dir = prepare(Path(workdir))
    rows = []
    with bench_lock():
        for inputs, input_tokens in INPUT_TOKENS.items():
            for chunk in (UNBOUNDED, LOGITS_CHUNK_BYTES):
                print(f"[label-memory] {inputs} inputs, logits per call {chunk}", flush=True)
                result = in_fresh_process(
                    measure,
                    env={"OMP_NUM_THREADS": "1"},
                    export_dir=str(export_dir),
                    logits_chunk_bytes=chunk,
                    input_tokens=input_tokens,
                    repeats=repeats,
                )
                rows.append({"inputs": inputs, "input_tokens": input_tokens, "logits_chunk_bytes": chunk} | result)
    for inputs in INPUT_TOKENS:
        unbounded, chunked = (r for r in rows if r["inputs"] == inputs)
        if unbounded["labels"] != chunked["labels"]:
            raise RuntimeError(f"{inputs} inputs: the chunked label path predicted other labels than one call")
    report = {
        "command": command_line(),
        "machine": machine(),
        "request": {"items": ITEMS, "choices": CHOICES, "choice_tokens": CHOICE_TOKENS, "vocab": VOCAB},
        "rows": [{k: v for k, v in r.items() if k != "labels"} for r in rows],
    }
    return write_results(Path(out), report, render_table(rows))
