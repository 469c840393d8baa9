"""Extraction throughput: `stepwise extract`'s vLLM pipeline vs raw vllm.LLM.generate vs a transformers loop.

Same prompts (the task's few-shot prompts), same tiny local teacher, same greedy settings, one run. For
each prefix-caching setting one engine serves both sides, and the two alternate (the prefix cache reset
before each) so machine noise hits both alike. "overhead" is the wall time the pipeline (chunking, prompt
building, parsing, atomic shards, manifest, progress bar) adds over one raw `generate` on the whole list.
Engine start-up is left out of both sides. The transformers loop runs in a child process (its own threads).

    flock /tmp/stepwise-bench.lock .venv/teacher/bin/python -m benchmarks.extraction_bench
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# vLLM reads these at import: engine in this process, one thread, a small KV cache, caches in the run folder.
RUN_DIR = Path(tempfile.mkdtemp(prefix="stepwise-extraction-bench-"))
for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                   "VLLM_CACHE_ROOT": str(RUN_DIR / "vllm"), "XDG_CACHE_HOME": str(RUN_DIR / "cache"), "HF_HOME": str(RUN_DIR / "hf"),
                   "TMPDIR": str(RUN_DIR), "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

from stepwise.extraction import run, teachers  # noqa: E402
from stepwise.extraction.tiny_teacher import build_tiny_teacher  # noqa: E402
from stepwise import tasks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "extraction.json"


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
    return wall, sum(len(o.prompt_token_ids) for o in outputs), sum(len(c.token_ids) for o in outputs for c in o.outputs)


def time_pipeline(llm, task: tasks.Task, shots: list[str], examples: list[tasks.Example], sampling: teachers.Sampling,
                  chunk_size: int, out: Path) -> tuple[float, int, int]:
    """The stage's own loop (`run.extract_chunks`) on a prebuilt engine, into a fresh output folder."""
    llm.reset_prefix_cache()
    config = run.job_config(task, "train", "vllm", "tiny", asdict(sampling), False, shots)
    job = run.Job(task, "train", shots, config, out, chunk_size, "jsonl", len(examples))
    started = time.perf_counter()
    run.prepare_output(out, task, config, overwrite=True)
    tallies = run.extract_chunks(job, teachers.vllm_teacher(task, llm, sampling, False), examples, [])
    wall = time.perf_counter() - started
    return wall, sum(t["tokens_in"] for t in tallies), sum(t["tokens_out"] for t in tallies)


def bench_vllm(model: Path, task_name: str, count: int, max_tokens: int, chunk_sizes: list[int], repeats: int) -> list[dict]:
    from vllm import SamplingParams

    task, shots, examples, prompts = job(task_name, count)
    sampling = teachers.Sampling(max_tokens=max_tokens)
    params = SamplingParams(**asdict(sampling), stop=tasks.stop_strings(task))
    rows = []
    for prefix_caching in (True, False):
        engine = teachers.VllmEngine(prefix_caching=prefix_caching, dtype="float32", enforce_eager=True)
        llm = teachers.load_vllm(str(model), engine, sampling.seed)
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        times: dict[str, list[tuple[float, int, int]]] = {"raw": []} | {f"chunk{c}": [] for c in chunk_sizes}
        for _ in range(repeats):  # alternate, so drift on a shared machine hits every side
            times["raw"].append(time_raw(llm, prompts, params))
            for c in chunk_sizes:
                times[f"chunk{c}"].append(time_pipeline(llm, task, shots, examples, sampling, c, RUN_DIR / f"out-{c}"))
        raw_wall = statistics.median(t[0] for t in times["raw"])
        raw_best = min(t[0] for t in times["raw"])
        for name, samples in times.items():
            wall = statistics.median(t[0] for t in samples)
            tokens_in, tokens_out = samples[0][1], samples[0][2]
            rows.append({
                "engine": "raw vllm.LLM.generate (whole list)" if name == "raw" else f"stepwise extract (chunks of {name[5:]})",
                "prefix_caching": prefix_caching, "prompts": len(prompts), "wall_s": wall, "walls_s": [t[0] for t in samples],
                "tokens_in": tokens_in, "tokens_out": tokens_out, "tokens_out_per_s": tokens_out / wall, "tokens_in_per_s": tokens_in / wall,
                "overhead_vs_raw": None if name == "raw" else wall / raw_wall - 1,
                # noise from other jobs only ever adds time, so the fastest repeats are the cleanest comparison
                "overhead_vs_raw_best": None if name == "raw" else min(t[0] for t in samples) / raw_best - 1,
            })
        del llm
        gc.collect()
    return rows


def bench_transformers(model: Path, task_name: str, count: int, max_tokens: int, batch_size: int) -> dict:
    """A plain batched `generate` loop (greedy, left padding, the same stop strings), as a reference."""
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
            generated = lm.generate(**batch, max_new_tokens=max_tokens, do_sample=False, stop_strings=tasks.stop_strings(task),
                                    tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
            tokens_in += int(batch["attention_mask"].sum())
            tokens_out += int((generated != tokenizer.pad_token_id).sum())
    wall = time.perf_counter() - started
    return {"engine": f"transformers generate loop (batch {batch_size})", "prefix_caching": False, "prompts": len(prompts), "wall_s": wall,
            "walls_s": [wall], "tokens_in": tokens_in, "tokens_out": tokens_out, "tokens_out_per_s": tokens_out / wall,
            "tokens_in_per_s": tokens_in / wall, "overhead_vs_raw": None, "overhead_vs_raw_best": None}


def table(rows: list[dict]) -> str:
    lines = ["| engine | prefix cache | prompts | wall s (median) | tokens in/out | out tok/s | overhead vs raw vLLM (median / best) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        overhead = "-" if r["overhead_vs_raw"] is None else f"{r['overhead_vs_raw']:+.1%} / {r['overhead_vs_raw_best']:+.1%}"
        lines.append(f"| {r['engine']} | {'on' if r['prefix_caching'] else 'off'} | {r['prompts']} | {r['wall_s']:.2f} | "
                     f"{r['tokens_in']}/{r['tokens_out']} | {r['tokens_out_per_s']:.0f} | {overhead} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="cqa")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None, help="a model folder (default: build the tiny teacher)")
    parser.add_argument("--part", choices=["all", "transformers"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        measure(args)
    finally:
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def measure(args: argparse.Namespace) -> None:
    if args.part == "transformers":  # the child process
        print(json.dumps(bench_transformers(args.model, args.task, args.prompts, args.max_tokens, args.hf_batch)))
        return
    model = args.model or build_tiny_teacher(RUN_DIR / "tiny-teacher")
    rows = bench_vllm(model, args.task, args.prompts, args.max_tokens, args.chunk_sizes, args.repeats)
    child = subprocess.run([sys.executable, "-m", "benchmarks.extraction_bench", "--part", "transformers", "--model", str(model), "--task", args.task,
                            "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens), "--hf-batch", str(args.hf_batch)],
                           capture_output=True, text=True, check=True)
    rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    result = {"task": args.task, "prompts": args.prompts, "max_tokens": args.max_tokens, "threads": 1, "dtype": "float32", "repeats": args.repeats,
              "machine": "shared 2-core CPU, no GPU (others' jobs ran meanwhile)", "model": "tiny Llama-shaped teacher (hidden 128, 2 layers, random weights)",
              "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
