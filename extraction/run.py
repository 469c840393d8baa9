"""`stepwise extract`: teacher rationales and labels for one task split, written as resumable shards.

The recipe: setup (load the split, check the teacher, hold the output folder) -> plan (which records are done;
`error` records and records whose input changed are dropped, to be done again) -> run (stream the rest through
the teacher, prompts built lazily; every `chunk_size` finished records: one atomic shard, then the manifest) ->
finish (the manifest and a summary). kill -9 at any moment and the same command continues where the shards end.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from stepwise import artifacts, cards, progress, storage, tasks
from stepwise.extraction import ray_job, shards, teachers
from stepwise.extraction.ray_job import ClusterOptions
from stepwise.extraction.records import generate_records, tally
from stepwise.extraction.teachers import ClientOptions, EngineOptions, SamplingOptions

REPLAY_MODEL = "palm-540b (shipped completions)"
LLM_TEACHERS = ("vllm", "openai")


# ---------------------------------------------------------------- prompts and config


def prompt_prefix(task: tasks.Task) -> list[str]:
    """The few-shot exemplars shared by every prompt (from the train split, as in the paper)."""
    return tasks.exemplars(task, tasks.load_split(task, "train"))


def prompt_hash(task: tasks.Task, shots: list[str]) -> str:
    """Hash of the few-shot prefix together with the question template."""
    template = tasks.few_shot_prompt(task, shots, tasks.Example(id="", input="{input}", label=""))
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def teacher_model(task: tasks.Task, teacher: str, model: str) -> str:
    """What the manifest and every record name as the teacher."""
    if teacher == "replay":
        return "the data's 'completion' column" if task.source else REPLAY_MODEL
    if teacher == "dataset":
        return "the data's 'rationale' column"
    return model


def job_config(
    task: tasks.Task, split: str, backend: str, model: str, sampling: dict, structured: bool, shots: list[str]
) -> dict:
    """Everything that changes what a record says; output made under another config is refused."""
    return {
        "task": asdict(task),
        "split": split,
        "backend": backend,
        "model": model,
        "sampling": sampling if backend in LLM_TEACHERS else {},
        "structured": structured and backend == "vllm",
        "prompt_hash": prompt_hash(task, shots),
    }


@dataclass(frozen=True)
class Job:
    """One extraction job: the task split the teacher runs over and where its records go."""

    task: tasks.Task
    split: str
    shots: list[str]  # the few-shot prefix of every prompt
    config: dict  # job_config
    out: str | Path  # a local folder, or a prefix on an object store
    chunk_size: int
    shard_format: str
    expected: int  # records the finished job holds
    # On an object store: the ETag of the manifest this run read or wrote last. Each manifest write is conditional
    # on it (If-Match), so of two runs writing one prefix (the store has no lock) the second is refused.
    manifest_etag: dict[str, str | None] = field(default_factory=dict)

    @property
    def teacher_meta(self) -> dict:
        """The part of the config every record carries."""
        return {k: self.config[k] for k in ("backend", "model", "sampling", "structured", "prompt_hash")}


# ---------------------------------------------------------------- setup


def load_examples(task: tasks.Task, split: str, limit: int) -> list[tasks.Example]:
    examples = tasks.load_split(task, split)[: limit or None]
    if not examples:
        where = f" ({task.source} has no rows whose 'split' is {split!r})" if task.source else ""
        raise ValueError(f"task {task.name} has no {split} examples{where}: choose another --split")
    duplicated = [i for i, c in Counter(e.id for e in examples).items() if c > 1]
    if duplicated:
        raise ValueError(
            f"{len(duplicated)} ids occur more than once in {task.name}/{split}, e.g. {duplicated[0]!r}: "
            "give every row its own 'id'"
        )
    return examples


def check_teacher(
    task: tasks.Task,
    examples: list[tasks.Example],
    teacher: str,
    model: str,
    engine: EngineOptions,
    cluster: ClusterOptions,
) -> None:
    """Refuse a teacher that cannot work on these examples, before anything is written."""
    if teacher in LLM_TEACHERS and not model:
        raise ValueError(f"--teacher {teacher} needs --model")
    if cluster.on_ray and teacher != "vllm":
        raise ValueError("--on-ray runs the vllm teacher; pass --teacher vllm")
    if engine.structured and teacher != "vllm":
        raise ValueError("--structured constrains the vllm engine's output; pass --teacher vllm")
    where = task.source or task.name
    if teacher == "replay" and all(e.teacher_completion is None for e in examples):
        raise ValueError(
            f"--teacher replay: none of the {len(examples)} examples has a teacher completion: add a 'completion' "
            f"column (a teacher's raw text) to {where}, or use --teacher dataset (its 'rationale' column), vllm "
            "or openai"
        )
    if teacher == "dataset" and not any(e.rationale for e in examples):
        raise ValueError(
            f"--teacher dataset: none of the {len(examples)} examples has a rationale: add a 'rationale' column to "
            f"{where}, or use --teacher replay (its 'completion' column), vllm or openai"
        )


def refuse_foreign_folder(out: str | Path, overwrite: bool) -> None:
    """A non-empty folder (or prefix) that holds no extraction output is not ours to write into (checked before
    the lock, which is a file in the folder)."""
    ours = (artifacts.TASK, artifacts.EXTRACT_LOCK)
    if storage.exists(storage.join(out, artifacts.MANIFEST)) or overwrite:
        return
    names = storage.list_files(out) if storage.is_remote(out) or Path(out).is_dir() else []
    if any(name not in ours for name in names):
        raise ValueError(
            f"{out} exists, is not empty and holds no {artifacts.MANIFEST}; choose another --out or pass --overwrite"
        )


def hold_output(out: str | Path) -> AbstractContextManager:
    """One run per output: a local folder's lock (flock, gone with its process). An object store has no such
    lock: there the manifest's conditional writes refuse a second run (Job.manifest_etag)."""
    if storage.is_remote(out):
        return nullcontext()
    return artifacts.folder_lock(Path(out) / artifacts.EXTRACT_LOCK, "extract", out)


def prepare_output(out: str | Path, task: tasks.Task, config: dict, overwrite: bool) -> None:
    """Create `out`, or check that its existing shards were made by the same config."""
    manifest_path = storage.join(out, artifacts.MANIFEST)
    manifest = artifacts.read_manifest(out) if storage.exists(manifest_path) else None
    # Shards without a manifest were made by no known config: never resumed as done (refuse_foreign_folder refuses
    # them without --overwrite; with it they go, as another config's shards do).
    unknown = manifest is None and bool(artifacts.shard_paths(out))
    if unknown or (manifest is not None and manifest["config_hash"] != shards.config_hash(config)):
        if unknown and not overwrite:
            raise ValueError(f"{out} holds shards but no {artifacts.MANIFEST}; pass --overwrite to replace them")
        if not overwrite:
            changed = sorted(k for k in config if manifest["config"].get(k) != config[k])
            raise ValueError(
                f"{out} holds output of a different teacher/prompt configuration "
                f"(differs in: {', '.join(changed)}); pass --overwrite to replace it, or choose another --out"
            )
        for path in artifacts.shard_paths(out):
            storage.delete(path)
        storage.delete(manifest_path)  # task.json is rewritten below
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        artifacts.remove_partial_files(Path(out))
    tasks.save_task(task, out)


def write_manifest(job: Job, records: list[dict], summary: dict | None = None) -> dict:
    counts = shards.count_records(records)
    manifest = {
        "config": job.config,
        "config_hash": shards.config_hash(job.config),
        "expected_records": job.expected,
        "shards": len(artifacts.shard_paths(job.out)),
        "counts": counts,
        "complete": len(records) == job.expected and counts["error"] == 0,  # an error record is still to do
        "last_run": summary,
    }
    path = storage.join(job.out, artifacts.MANIFEST)
    if not storage.is_remote(job.out):
        artifacts.write_json(path, manifest)
        return manifest
    previous = job.manifest_etag.get("etag")
    conditions = {"if_absent": previous is None, "if_match": previous} if storage.scheme(job.out) == "s3" else {}
    try:
        job.manifest_etag["etag"] = storage.write_bytes(path, artifacts.json_text(manifest).encode(), **conditions)
    except storage.PreconditionFailed:
        raise RuntimeError(
            f"{path} changed under this run: another `stepwise extract` is writing {job.out}. Stop one of them; "
            "the shards written so far are whole, and the next run on it keeps every record once"
        ) from None
    return manifest


# ---------------------------------------------------------------- plan


def settle_shards(
    out: str | Path, examples: list[tasks.Example], retry_errors: bool
) -> tuple[dict[str, dict], Counter]:
    """The records of `examples` the shards hold, once each (id -> tally), and why the others are to be redone:
    an `error` record (unless retry_errors is off), or a record made from another input (its fingerprint differs:
    the data was edited). Those records, and second copies of a record (a chunk a Ray worker did twice, as a
    retry after its node died), are dropped from their shards: afterwards an id is in one shard."""
    wanted = {e.id: e for e in examples}
    done: dict[str, dict] = {}
    stale: dict[str | Path, set[str]] = {}
    redo: Counter = Counter()
    for path in artifacts.shard_paths(out):
        for record in artifacts.read_shard(path):
            example = wanted.get(record["id"])
            if example is None:  # beyond this run's --limit: kept as it is
                continue
            if record["id"] in done:
                pass  # the first copy, in shard order, is kept
            elif record.get("fingerprint") != tasks.input_fingerprint(example):
                redo["input changed"] += 1
            elif record["status"] == "error" and retry_errors:
                redo["error retried"] += 1
            else:
                done[record["id"]] = tally(record)
                continue
            stale.setdefault(path, set()).add(record["id"])
    shards.drop_records(stale)
    return done, redo


def resume_plan(
    out: str | Path, examples: list[tasks.Example], retry_errors: bool
) -> tuple[list[dict], list[tasks.Example]]:
    """The tallies of the records already done, and the examples still to do (`settle_shards`)."""
    done, redo = settle_shards(out, examples, retry_errors)
    pending = [e for e in examples if e.id not in done]
    if done or redo:
        again = f" ({', '.join(f'{n} {why}' for why, n in redo.items())})" if redo else ""
        print(
            f"[extract] resuming: {len(done)} of {len(examples)} records already in {out}, {len(pending)} to go{again}",
            flush=True,
        )
    return list(done.values()), pending


# ---------------------------------------------------------------- run


def build_teacher(
    task: tasks.Task, teacher: str, model: str, sampling: SamplingOptions, engine: EngineOptions, client: ClientOptions
) -> teachers.Teacher:
    if teacher == "replay":
        return teachers.replay_teacher(task)
    if teacher == "dataset":
        return teachers.dataset_teacher(task)
    if teacher == "vllm":
        return teachers.vllm_teacher(
            task, teachers.load_vllm(model, engine, sampling.seed), sampling, engine.structured
        )
    return teachers.openai_teacher(task, model, sampling, client)


def extract_chunks(job: Job, generate: teachers.Teacher, pending: list[tasks.Example], done: list[dict]) -> list[dict]:
    """The single-process loop: the teacher streams through `pending`; every `chunk_size` finished
    records become one atomic shard and a manifest update (a kill loses at most the unwritten chunk)."""
    new: list[dict] = []
    chunk: list[dict] = []
    started = time.time()

    def flush() -> None:
        shards.write_shard(job.out, chunk, job.shard_format)
        new.extend(tally(r) for r in chunk)
        write_manifest(job, done + new)
        chunk.clear()

    with progress.bar(
        total=len(pending), unit="rec", desc=f"extract {job.task.name}/{job.split}", dynamic_ncols=True
    ) as bar:
        for record in generate_records(job.task, generate, job.shots, pending, job.teacher_meta):
            chunk.append(record)
            if len(chunk) == job.chunk_size:
                flush()
                elapsed = max(time.time() - started, 1e-9)
                bar.set_postfix(
                    tok_s=f"{sum(r['tokens_out'] for r in new) / elapsed:.0f}",
                    ok=sum(r["status"] == "ok" for r in new),
                    refresh=False,
                )
            bar.update(1)
        if chunk:
            flush()
    return new


def generate_pending(
    job: Job,
    pending: list[tasks.Example],
    done: list[dict],
    teacher: str,
    model: str,
    sampling: SamplingOptions,
    engine: EngineOptions,
    client: ClientOptions,
    cluster: ClusterOptions,
) -> tuple[list[dict], float]:
    """The teacher over `pending`, on a Ray cluster or in this process: the tallies of the new records, and when
    generation started (in this process, after the engine's start-up, which is reported apart)."""
    if not pending:
        return [], time.time()
    if cluster.on_ray:
        started = time.time()
        ray_job.extract_on_ray(
            job.task,
            job.shots,
            pending,
            job.teacher_meta,
            model,
            engine,
            sampling,
            cluster,
            job.out,
            job.chunk_size,
            job.shard_format,
        )
        # The shards, not the workers' replies, say what was done: a retried chunk replies twice
        return list(settle_shards(job.out, pending, retry_errors=False)[0].values()), started
    generate = build_teacher(job.task, teacher, model, sampling, engine, client)
    started = time.time()
    return extract_chunks(job, generate, pending, done), started


# ---------------------------------------------------------------- finish


def finish(job: Job, done: list[dict], new: list[dict], started: float, generation_started: float) -> Path:
    """The final manifest, with this run's summary, and the closing lines."""
    wall = time.time() - started
    this_run = shards.count_records(new)
    summary = {
        "records_this_run": len(new),
        "wall_s": round(wall, 3),
        "generation_s": round(time.time() - generation_started, 3),
        "records_per_s": len(new) / wall if wall else None,
        "tokens_out_per_s": this_run["tokens_out"] / wall if wall else None,
        "this_run": this_run,
    }
    manifest = write_manifest(job, done + new, summary)
    cards.write_dataset_card(job.out, manifest, job.shard_format)
    print_summary(manifest)
    return job.out


def print_summary(manifest: dict) -> None:
    counts, run = manifest["counts"], manifest["last_run"] or {}

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    sources = ", ".join(f"{source} {n}" for source, n in counts.get("rationale_sources", {}).items())
    print(
        f"[extract] {counts['records']}/{manifest['expected_records']} records "
        f"({'complete' if manifest['complete'] else 'incomplete'}), {manifest['shards']} shards; "
        f"parse rate {pct(counts['parse_rate'])}, teacher accuracy vs gold {pct(counts['teacher_accuracy'])}; "
        f"rationales from {sources or '-'}; tokens in/out {counts['tokens_in']}/{counts['tokens_out']}; "
        f"this run: {run.get('records_this_run', 0)} records in {run.get('wall_s', 0):.1f} s "
        f"({run.get('records_per_s') or 0:.1f} records/s, {run.get('tokens_out_per_s') or 0:.0f} tokens/s out)",
        flush=True,
    )
    if counts["failure_reasons"]:
        print("[extract] failures: " + "; ".join(f"{k} x{v}" for k, v in counts["failure_reasons"].items()), flush=True)
    if counts["error"]:
        print(f"[extract] {counts['error']} error records remain: rerun the same command to retry them", flush=True)


# ---------------------------------------------------------------- the stage


def main(
    task: str,
    out: str | Path,
    split: str = "train",
    teacher: Literal["replay", "dataset", "vllm", "openai"] = "replay",
    model: str = "",
    labels: list[str] | None = None,
    limit: int = 0,
    chunk_size: int = 256,
    shard_format: Literal["jsonl", "parquet"] = "jsonl",
    retry_errors: bool = True,
    overwrite: bool = False,
    sampling: SamplingOptions = SamplingOptions(),
    engine: EngineOptions = EngineOptions(),
    client: ClientOptions = ClientOptions(),
    cluster: ClusterOptions = ClusterOptions(),
) -> Path:
    """Bulk teacher rationales + labels for a task split, as resumable JSONL shards with a manifest.

    Args:
        task: svamp, cqa, esnli, or a custom dataset (JSONL/CSV/Parquet file, folder of split files, or a Hugging
            Face datasets folder), local or on an object store (s3://bucket/data/nli.jsonl).
        out: output folder (shards + manifest.json), or a prefix on an object store (s3://bucket/prefix, gs://...);
            rerun the same command to resume after a crash.
        split: train, valid or test.
        teacher: replay (each example's teacher completion: the shipped PaLM outputs, or a custom dataset's
            'completion' column), dataset (a custom dataset's 'rationale' column, as it is), vllm (in-process
            engine) or openai (a compatible server).
        model: model folder or name for vllm/openai.
        labels: a custom task's closed label set (overrides its task file's and the inferred one); give the same
            to every stage.
        limit: only the first N examples of the split (0: all).
        chunk_size: finished records per shard (also the batch each Ray actor takes).
        shard_format: jsonl, or parquet (pyarrow); a resumed run reads both.
        retry_errors: a resumed run does again the records that failed with an error (server down, prompt too
            long, ...).
        overwrite: replace output made under a different teacher/prompt configuration.
    """
    started = time.time()
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be 1 or more, got {chunk_size}")
    location = storage.as_location(out)
    storage.check_location(location, "--out")
    task_def = tasks.get_task(task, labels)
    examples = load_examples(task_def, split, limit)
    check_teacher(task_def, examples, teacher, model, engine, cluster)
    shots = prompt_prefix(task_def)
    config = job_config(
        task_def, split, teacher, teacher_model(task_def, teacher, model), asdict(sampling), engine.structured, shots
    )
    job = Job(task_def, split, shots, config, location, chunk_size, shard_format, len(examples))
    refuse_foreign_folder(job.out, overwrite)
    with hold_output(job.out):
        prepare_output(job.out, task_def, config, overwrite)
        job.manifest_etag["etag"] = storage.etag(storage.join(job.out, artifacts.MANIFEST))
        done, pending = resume_plan(job.out, examples, retry_errors)
        write_manifest(job, done)
        new, generation_started = generate_pending(
            job, pending, done, teacher, model, sampling, engine, client, cluster
        )
        return finish(job, done, new, started, generation_started)
