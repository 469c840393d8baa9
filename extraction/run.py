"""`stepwise extract`: teacher rationales and labels for one task split, written as resumable shards.

The recipe: load the split -> skip ids already in finished shards -> stream the rest through the teacher
(prompts built lazily: few-shot prefix + question) -> parse each completion (+ majority vote over samples)
-> every `chunk_size` finished records: one atomic shard, then the manifest. kill -9 at any moment and the
same command continues where the shards end.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Literal

from tqdm import tqdm

from stepwise.extraction import shards, teachers
from stepwise.extraction.records import generate_records, tally
from stepwise import artifacts, tasks

REPLAY_MODEL = "palm-540b (shipped completions)"


# ---------------------------------------------------------------- prompts and config


def prompt_prefix(task: tasks.Task) -> list[str]:
    """The few-shot exemplars shared by every prompt (from the train split, as in the paper)."""
    return tasks.exemplars(task, tasks.load_split(task, "train"))


def prompt_hash(task: tasks.Task, shots: list[str]) -> str:
    """Hash of the few-shot prefix together with the question template."""
    template = tasks.few_shot_prompt(task, shots, tasks.Example(id="", input="{input}", label=""))
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def job_config(task: tasks.Task, split: str, backend: str, model: str, sampling: dict, structured: bool, shots: list[str]) -> dict:
    """Everything that changes what a record says; output made under another config is refused."""
    return {
        "task": asdict(task),
        "split": split,
        "backend": backend,
        "model": model,
        "sampling": sampling if backend != "replay" else {},
        "structured": structured and backend == "vllm",
        "prompt_hash": prompt_hash(task, shots),
    }


def prepare_output(out: Path, task: tasks.Task, config: dict, overwrite: bool) -> None:
    """Create `out`, or check that its existing shards were made by the same config."""
    manifest = artifacts.read_manifest(out) if (out / artifacts.MANIFEST).exists() else None
    if manifest is not None and manifest["config_hash"] != shards.config_hash(config):
        if not overwrite:
            changed = sorted(k for k in config if manifest["config"].get(k) != config[k])
            raise ValueError(
                f"{out} holds output of a different teacher/prompt configuration "
                f"(differs in: {', '.join(changed)}); pass --overwrite to replace it, or choose another --out"
            )
        for path in artifacts.shard_paths(out):
            path.unlink()
        (out / artifacts.MANIFEST).unlink()  # task.json is rewritten below
    elif manifest is None and out.exists() and any(p.name != artifacts.TASK for p in out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists, is not empty and holds no {artifacts.MANIFEST}; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    artifacts.remove_partial_files(out)
    tasks.save_task(task, out)


def write_manifest(out: Path, config: dict, expected: int, records: list[dict], summary: dict | None = None) -> dict:
    manifest = {
        "config": config,
        "config_hash": shards.config_hash(config),
        "expected_records": expected,
        "shards": len(artifacts.shard_paths(out)),
        "counts": shards.count_records(records),
        "complete": len(records) == expected,
        "last_run": summary,
    }
    artifacts.write_json(out / artifacts.MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- the stage


def extract_chunks(task: tasks.Task, generate: teachers.Teacher, shots: list[str], pending: list[tasks.Example], teacher_meta: dict, out: Path,
                   chunk_size: int, shard_format: str, config: dict, expected: int, done: list[dict], desc: str) -> list[dict]:
    """The single-process loop: the teacher streams through `pending`; every `chunk_size` finished
    records become one atomic shard and a manifest update (a kill loses at most the unwritten chunk)."""
    new: list[dict] = []
    chunk: list[dict] = []
    started = time.time()

    def flush() -> None:
        shards.write_shard(out, chunk, shard_format)
        new.extend(tally(r) for r in chunk)
        write_manifest(out, config, expected, done + new)
        chunk.clear()

    with tqdm(total=len(pending), unit="rec", desc=desc, dynamic_ncols=True) as bar:
        for record in generate_records(task, generate, shots, pending, teacher_meta):
            chunk.append(record)
            if len(chunk) == chunk_size:
                flush()
                elapsed = max(time.time() - started, 1e-9)
                bar.set_postfix(tok_s=f"{sum(r['tokens_out'] for r in new) / elapsed:.0f}", ok=sum(r["status"] == "ok" for r in new), refresh=False)
            bar.update(1)
        if chunk:
            flush()
    return new


def main(
    task: str,
    out: Path,
    split: str = "train",
    teacher: Literal["replay", "vllm", "openai"] = "replay",
    model: str = "",
    limit: int = 0,
    chunk_size: int = 256,
    shard_format: Literal["jsonl", "parquet"] = "jsonl",
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    structured: bool = False,
    prefix_caching: bool = True,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    max_model_len: int = 0,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
    base_url: str = "http://127.0.0.1:8000",
    api_key: str = "",
    concurrency: int = 16,
    timeout: float = 120.0,
    retries: int = 4,
    ray: bool = False,
    ray_address: str = "",
    ray_actors: int = 1,
    overwrite: bool = False,
) -> Path:
    """Bulk teacher rationales + labels for a task split, as resumable JSONL shards with a manifest.

    Args:
        task: svamp, cqa, esnli, or the path of a custom JSONL/CSV dataset.
        out: output folder (shards + manifest.json); rerun the same command to resume after a crash.
        split: train, valid or test.
        teacher: replay (the shipped PaLM outputs), vllm (in-process engine) or openai (a compatible server).
        model: model folder or name for vllm/openai.
        limit: only the first N examples of the split (0: all).
        chunk_size: finished records per shard (also the batch each Ray actor takes).
        shard_format: jsonl, or parquet (pyarrow); a resumed run reads both.
        n: samples per input; with n > 1 the majority label wins (self-consistency; use --temperature > 0).
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling.
        max_tokens: new tokens per completion.
        seed: sampling seed.
        structured: vllm only: constrain each completion to a rationale line plus a parseable answer sentence.
        prefix_caching: vllm only: cache the shared few-shot prefix across prompts.
        tensor_parallel_size: vllm: GPUs per engine.
        dtype: vllm: model dtype (auto, bfloat16, float16, float32).
        max_model_len: vllm: context length (0: the model's).
        gpu_memory_utilization: vllm: share of GPU memory for weights + KV cache.
        enforce_eager: vllm: skip graph capture / torch.compile (faster start-up).
        base_url: openai: server root, e.g. http://127.0.0.1:8000.
        api_key: openai: bearer token, if the server wants one.
        concurrency: openai: requests in flight at once.
        timeout: openai: seconds per request before it is retried.
        retries: openai: retries per request (exponential backoff) before the record is an error.
        ray: run the vllm job on a Ray cluster with Ray Data (a pool of vLLM engine actors).
        ray_address: Ray cluster address ("" starts a local one; "auto" joins a running one).
        ray_actors: number of vLLM engine actors (one per GPU on a GPU cluster).
        overwrite: replace output made under a different teacher/prompt configuration.
    """
    started = time.time()
    spec = tasks.get_task(task)
    examples = tasks.load_split(spec, split)[: limit or None]
    duplicated = [i for i, c in Counter(e.id for e in examples).items() if c > 1]
    if duplicated:
        raise ValueError(f"{len(duplicated)} ids occur more than once in {spec.name}/{split}, e.g. {duplicated[0]!r}")
    if teacher != "replay" and not model:
        raise ValueError(f"--teacher {teacher} needs --model")
    if ray and teacher != "vllm":
        raise ValueError("--ray runs the vllm teacher; pass --teacher vllm")
    shots = prompt_prefix(spec)
    sampling = {"n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
    config = job_config(spec, split, teacher, model or REPLAY_MODEL, sampling, structured, shots)
    out = Path(out)
    prepare_output(out, spec, config, overwrite)

    wanted = {e.id for e in examples}
    existing = {r["id"]: tally(r) for r in artifacts.iter_records(out)}  # may hold more ids than this --limit wants
    done = [existing[i] for i in wanted if i in existing]
    pending = [e for e in examples if e.id not in existing]
    write_manifest(out, config, len(examples), done)
    if done:
        print(f"[extract] resuming: {len(done)} of {len(examples)} records already in {out}, {len(pending)} to go", flush=True)
    teacher_meta = {k: config[k] for k in ("backend", "model", "sampling", "structured", "prompt_hash")}

    new: list[dict] = []
    generation_started = time.time()
    if pending and ray:
        from stepwise.extraction import ray_job

        engine = {
            "model": model, "sampling": sampling, "structured": structured, "prefix_caching": prefix_caching,
            "tensor_parallel_size": tensor_parallel_size, "dtype": dtype, "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization, "enforce_eager": enforce_eager,
        }
        new = ray_job.extract_on_ray(spec, shots, pending, teacher_meta, engine, out, chunk_size, shard_format, ray_address, ray_actors)
    elif pending:
        generate = build_teacher(spec, teacher, model, sampling, structured, prefix_caching, tensor_parallel_size, dtype, max_model_len,
                                 gpu_memory_utilization, enforce_eager, base_url, api_key, concurrency, timeout, retries)
        generation_started = time.time()  # engine start-up is reported apart from generation
        new = extract_chunks(spec, generate, shots, pending, teacher_meta, out, chunk_size, shard_format, config, len(examples), done,
                             f"extract {spec.name}/{split}")

    wall = time.time() - started
    this_run = shards.count_records(new)
    generation_s = time.time() - generation_started
    summary = {"records_this_run": len(new), "wall_s": round(wall, 3), "generation_s": round(generation_s, 3), "records_per_s": len(new) / wall if wall else None,
               "tokens_out_per_s": this_run["tokens_out"] / wall if wall else None, "this_run": this_run}
    manifest = write_manifest(out, config, len(examples), done + new, summary)
    print_summary(manifest)
    return out


def build_teacher(spec: tasks.Task, teacher: str, model: str, sampling: dict, structured: bool, prefix_caching: bool, tensor_parallel_size: int,
                  dtype: str, max_model_len: int, gpu_memory_utilization: float, enforce_eager: bool, base_url: str, api_key: str,
                  concurrency: int, timeout: float, retries: int) -> teachers.Teacher:
    if teacher == "replay":
        return teachers.replay_teacher()
    if teacher == "vllm":
        llm = teachers.load_vllm(model, sampling["seed"], prefix_caching, tensor_parallel_size, dtype, max_model_len, gpu_memory_utilization, enforce_eager)
        return teachers.vllm_teacher(spec, llm, sampling, structured)
    return teachers.openai_teacher(spec, base_url, model, sampling, concurrency, timeout, retries, api_key)


def print_summary(manifest: dict) -> None:
    counts, run = manifest["counts"], manifest["last_run"] or {}

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    print(
        f"[extract] {counts['records']}/{manifest['expected_records']} records ({'complete' if manifest['complete'] else 'incomplete'}), "
        f"{manifest['shards']} shards; parse rate {pct(counts['parse_rate'])}, teacher accuracy vs gold {pct(counts['teacher_accuracy'])}; "
        f"tokens in/out {counts['tokens_in']}/{counts['tokens_out']}; this run: {run.get('records_this_run', 0)} records in {run.get('wall_s', 0):.1f} s "
        f"({run.get('records_per_s') or 0:.1f} records/s, {run.get('tokens_out_per_s') or 0:.0f} tokens/s out)",
        flush=True,
    )
    if counts["failure_reasons"]:
        print("[extract] failures: " + "; ".join(f"{k} x{v}" for k, v in counts["failure_reasons"].items()), flush=True)
