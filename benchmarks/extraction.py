"""Extraction throughput: `stepwise extract`'s vLLM pipeline vs raw vllm.LLM.generate vs a transformers loop.

Same prompts (the task's few-shot prompts), same tiny local teacher, same greedy settings, one run. For
each prefix-caching setting one engine serves both sides, and the two alternate (the prefix cache reset
before each) so machine noise hits both alike. "overhead" is the wall time the pipeline (chunking, prompt
building, parsing, atomic shards, manifest, progress bar) adds over one raw `generate` on the whole list.
Engine start-up is left out of both sides. The transformers loop runs in a fresh process (its own threads).

    python3 -m stepwise bench extraction   # -> benchmarks/results/extraction.json (teacher environment)
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import RESULTS, bench_lock, in_fresh_process, vllm_cpu_environment
from stepwise import artifacts, tasks
from stepwise.extraction import run, teachers
from stepwise.extraction.tiny_teacher import build_tiny_teacher


def job(task_name: str, count: int) -> tuple[tasks.Task, list[str], list[tasks.Example], list[str]]:
    task = tasks.get_task(task_name)
    shots = run.prompt_prefix(task)
    examples = tasks.load_split(task, "train")[:count]
    return task, shots, examples, [tasks.few_shot_prompt(task, shots, e) for e in examples]


def time_raw(llm, prompts: list[str], params) -> tuple[float, int, int]:
    llm.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    return (
        wall,
        sum(len(o.prompt_token_ids) for o in outputs),
        sum(len(c.token_ids) for o in outputs for c in o.outputs),
    )


def time_pipeline(
    llm,
    task: tasks.Task,
    shots: list[str],
    examples: list[tasks.Example],
    sampling: teachers.SamplingOptions,
    chunk_size: int,
    out: Path,
) -> tuple[float, int, int]:
    """The stage's own loop (`run.extract_chunks`) on a prebuilt engine, into a fresh output folder."""
    llm.reset_prefix_cache()
    config = run.job_config(task, "train", "vllm", "tiny", asdict(sampling), False, shots)
    job = run.Job(task, "train", shots, config, out, chunk_size, "jsonl", len(examples))
    started = time.perf_counter()
    run.prepare_output(out, task, config, overwrite=True)
    tallies = run.extract_chunks(job, teachers.vllm_teacher(task, llm, sampling, False), examples, [])
    wall = time.perf_counter() - started
    return wall, sum(t["tokens_in"] for t in tallies), sum(t["tokens_out"] for t in tallies)


def bench_vllm(
    model: Path, task_name: str, count: int, max_tokens: int, chunk_sizes: Sequence[int], repeats: int, run_dir: Path
) -> list[dict]:
    from vllm import SamplingParams

    task, shots, examples, prompts = job(task_name, count)
    sampling = teachers.SamplingOptions(max_tokens=max_tokens)
    params = SamplingParams(**asdict(sampling), stop=tasks.stop_strings(task))
    rows = []
    for prefix_caching in (True, False):
        engine = teachers.EngineOptions(prefix_caching=prefix_caching, dtype="float32", enforce_eager=True)
        llm = teachers.load_vllm(str(model), engine, sampling.seed)
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        times: dict[str, list[tuple[float, int, int]]] = {"raw": []} | {f"chunk{c}": [] for c in chunk_sizes}
        for _ in range(repeats):  # alternate, so drift on a shared machine hits every side
            times["raw"].append(time_raw(llm, prompts, params))
            for c in chunk_sizes:
                times[f"chunk{c}"].append(time_pipeline(llm, task, shots, examples, sampling, c, run_dir / f"out-{c}"))
        raw_wall = statistics.median(t[0] for t in times["raw"])
        raw_best = min(t[0] for t in times["raw"])
        for name, samples in times.items():
            wall = statistics.median(t[0] for t in samples)
            tokens_in, tokens_out = samples[0][1], samples[0][2]
            rows.append(
                {
                    "engine": "raw vllm.LLM.generate (whole list)"
                    if name == "raw"
                    else f"stepwise extract (chunks of {name[5:]})",
                    "prefix_caching": prefix_caching,
                    "prompts": len(prompts),
                    "wall_s": wall,
                    "walls_s": [t[0] for t in samples],
                    "tokens_in": tokens_in,
                    "tokens_out": tokens_out,
                    "tokens_out_per_s": tokens_out / wall,
                    "tokens_in_per_s": tokens_in / wall,
                    "overhead_vs_raw": None if name == "raw" else wall / raw_wall - 1,
                    # noise from other jobs only ever adds time, so the fastest repeats are the cleanest comparison
                    "overhead_vs_raw_best": None if name == "raw" else min(t[0] for t in samples) / raw_best - 1,
                }
            )
        del llm
        gc.collect()
    return rows


def bench_transformers(model: Path, task_name: str, count: int, max_tokens: int, batch_size: int) -> dict:
    """A plain batched `generate` loop (greedy, left padding, the same stop strings), as a reference. Run it in a
    fresh process (`harness.in_fresh_process`): its threads are its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    task, _, _, prompts = job(task_name, count)
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokens_in = tokens_out = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            generated = lm.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=False,
                stop_strings=tasks.stop_strings(task),
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )[:, batch["input_ids"].shape[1] :]
            tokens_in += int(batch["attention_mask"].sum())
            tokens_out += int((generated != tokenizer.pad_token_id).sum())
    wall = time.perf_counter() - started
    return {
        "engine": f"transformers generate loop (batch {batch_size})",
        "prefix_caching": False,
        "prompts": len(prompts),
        "wall_s": wall,
        "walls_s": [wall],
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "tokens_out_per_s": tokens_out / wall,
        "tokens_in_per_s": tokens_in / wall,
        "overhead_vs_raw": None,
        "overhead_vs_raw_best": None,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | prefix cache | prompts | wall s (median) | tokens in/out | out tok/s "
        "| overhead vs raw vLLM (median / best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = (
            "-" if r["overhead_vs_raw"] is None else f"{r['overhead_vs_raw']:+.1%} / {r['overhead_vs_raw_best']:+.1%}"
        )
        lines.append(
            f"| {r['engine']} | {'on' if r['prefix_caching'] else 'off'} | {r['prompts']} | {r['wall_s']:.2f} | "
            f"{r['tokens_in']}/{r['tokens_out']} | {r['tokens_out_per_s']:.0f} | {overhead} |"
        )
    return "\n".join(lines)


def main(
    task: str = "cqa",
    prompts: int = 256,
    max_tokens: int = 64,
    chunk_sizes: Sequence[int] = (64, 256),
    repeats: int = 5,
    hf_batch: int = 16,
    model: Path | None = None,
    out: Path = RESULTS / "extraction",
) -> Path:
    """Extraction throughput: `stepwise extract`'s vLLM pipeline vs raw vllm.LLM.generate vs a transformers loop.

    Args:
        task: the task whose few-shot prompts are generated (its train split)
        prompts: prompts per side
        max_tokens: new tokens per completion
        chunk_sizes: the pipeline's chunk sizes (records per shard) to time
        repeats: alternating repeats per side (the median and the best are reported)
        hf_batch: batch of the transformers loop
        model: a causal LM folder (default: build the tiny teacher)
        out: the result file (.json) without suffix
    """
    if min([prompts, max_tokens, repeats, hf_batch, *chunk_sizes]) < 1:
        raise ValueError("--prompts, --max-tokens, --repeats, --hf-batch and --chunk-sizes must be 1 or more")
    run_dir = Path(tempfile.mkdtemp(prefix="stepwise-extraction-bench-"))
    for key, value in vllm_cpu_environment(run_dir).items():
        os.environ.setdefault(key, value)  # before vLLM is imported (in bench_vllm)
    try:
        teacher = Path(model) if model else build_tiny_teacher(run_dir / "tiny-teacher")
        with bench_lock():
            rows = bench_vllm(teacher, task, prompts, max_tokens, chunk_sizes, repeats, run_dir)
            rows.append(
                in_fresh_process(
                    bench_transformers,
                    model=teacher,
                    task_name=task,
                    count=prompts,
                    max_tokens=max_tokens,
                    batch_size=hf_batch,
                )
            )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    result = {
        "task": task,
        "prompts": prompts,
        "max_tokens": max_tokens,
        "threads": 1,
        "dtype": "float32",
        "repeats": repeats,
        "machine": "shared 2-core CPU, no GPU (others' jobs ran meanwhile)",
        "model": str(model) if model else "tiny Llama-shaped teacher (hidden 128, 2 layers, random weights)",
        "rows": rows,
    }
    path = artifacts.write_json(Path(out).with_suffix(".json"), result)
    print(table(rows))
    return path
