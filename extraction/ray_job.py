"""Scale-out: the same extraction job over a Ray cluster with Ray Data.

The pending examples become a Ray dataset; `map_batches` runs them through a pool of stateful actors,
each holding one vLLM engine (one per GPU on a GPU cluster). Each actor writes every batch it finishes
as one whole shard into the output, exactly as the single-process loop does, so resume, the manifest and
the reader are the same. On a cluster whose nodes share no filesystem the output is a prefix on an object
store (`--out s3://bucket/prefix`): each actor uploads its shards there itself, with the credentials of its
node. A chunk Ray does twice (a retry after a node died) leaves two copies of its records; the driver
keeps one of each (`run.settle_shards`) before it writes the manifest.

ray.data.llm is not used: it pins a CUDA vLLM build, while this environment carries the CPU one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stepwise import progress, storage, tasks
from stepwise.extraction import records as extraction_records
from stepwise.extraction import teachers


@dataclass(frozen=True)
class ClusterOptions:
    """Scale-out: the vllm job on a Ray cluster with Ray Data (a pool of vLLM engine actors).

    Args:
        on_ray: run the vllm job on a Ray cluster with Ray Data (`--ray` before: it still works for a release)
        ray_address: Ray cluster address ("" starts a local one; "auto" joins a running one)
        ray_actors: number of vLLM engine actors (one per GPU on a GPU cluster)
    """

    on_ray: bool = False
    ray_address: str = ""
    ray_actors: int = 1

    def __post_init__(self) -> None:
        if self.ray_actors < 1:
            raise ValueError(f"--ray-actors must be 1 or more, got {self.ray_actors}")


class EngineActor:
    """Ray Data's stateful-actor form: the engine loads once per actor, then serves many batches."""

    def __init__(
        self,
        task_fields: dict,
        shots: list[str],
        teacher_meta: dict,
        model: str,
        engine: dict,
        sampling: dict,
        out: str,
        shard_format: str,
    ):
        self.task = tasks.Task(**task_fields)
        self.shots, self.teacher_meta, self.shard_format = shots, teacher_meta, shard_format
        self.out = storage.as_location(out)
        engine_options, sampling_options = teachers.EngineOptions(**engine), teachers.SamplingOptions(**sampling)
        llm = teachers.load_vllm(model, engine_options, sampling_options.seed)
        self.generate = teachers.vllm_teacher(self.task, llm, sampling_options, engine_options.structured)

    def __call__(self, batch: dict) -> dict:
        examples = [tasks.Example(**json.loads(text)) for text in batch["example"]]
        records = extraction_records.process_chunk(
            self.task, self.generate, self.shots, examples, self.teacher_meta, self.out, self.shard_format
        )
        return {"id": [r["id"] for r in records]}


def extract_on_ray(
    task: tasks.Task,
    shots: list[str],
    pending: list[tasks.Example],
    teacher_meta: dict,
    model: str,
    engine: teachers.EngineOptions,
    sampling: teachers.SamplingOptions,
    cluster: ClusterOptions,
    out: str | Path,
    chunk_size: int,
    shard_format: str,
) -> None:
    """Run `pending` through `cluster.ray_actors` vLLM engine actors, which write its shards."""
    import ray

    actors = cluster.ray_actors
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cluster.ray_address or None, include_dashboard=False)
    try:
        gpus_per_actor = engine.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) > 0 else 0
        dataset = ray.data.from_items([{"example": json.dumps(asdict(e))} for e in pending])
        results = dataset.map_batches(
            EngineActor,
            batch_size=chunk_size,
            concurrency=actors,
            num_cpus=1,
            num_gpus=gpus_per_actor,
            fn_constructor_kwargs={
                "task_fields": asdict(task),
                "shots": shots,
                "teacher_meta": teacher_meta,
                "model": model,
                "engine": asdict(engine),
                "sampling": asdict(sampling),
                "out": str(out) if storage.is_remote(out) else str(Path(out).resolve()),
                "shard_format": shard_format,
            },
        )
        with progress.bar(
            total=len(pending), unit="rec", desc=f"extract {task.name} on ray ({actors} engines)", dynamic_ncols=True
        ) as bar:
            for _ in results.iter_rows():
                bar.update(1)
    finally:
        if started_here:
            ray.shutdown()
