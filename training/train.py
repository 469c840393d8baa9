"""`stepwise train`: the distilling step-by-step student and the paper's two baselines (objective.py says what
each mode learns), in one process or on Ray Train workers (DDP, or FSDP for students too large for one GPU).

The recipe reads top to bottom: `setup` (check the options, read the data, prepare the folder and the tokenizer)
-> `run` (`train_worker` in this process, or in every Ray Train worker) -> `finish`. `train_worker` is one code
path for every world size: only rank 0 writes the folder, the batches of a step are fixed by (seed, step), and
each worker takes a fixed slice of them.

The output folder is the contract for export and serving: a Hugging Face model (config.json,
model.safetensors, tokenizer files) + task.json + train_config.json + metrics.json + log.csv. The model in
it is the best one on the VALIDATION split; test metrics are computed once, at the end, on that model.
Checkpoints (checkpoints.py) let a rerun of the same command continue after an interruption, on any number
of workers; a rerun of a finished run returns its folder without training again (unless --overwrite).
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration

from stepwise import artifacts, cards, storage, tasks
from stepwise.progress import bar as progress_bar
from stepwise.training import checkpoints, distributed, tracking
from stepwise.training.checkpoints import Progress
from stepwise.training.data import (
    StudentExample,
    check_extraction_finished,
    check_task_matches,
    records_by_source,
    training_examples,
)
from stepwise.training.distributed import World
from stepwise.training.objective import (
    TokenCounts,
    collate,
    lr_factor,
    objective,
    step_examples,
    target_tokens,
    token_loss_sums,
    tokenize_examples,
    worker_micro_batches,
)
from stepwise.training.tiny import SHAPES, build_student, student_config, train_tokenizer

Mode = Literal["step-by-step", "standard-finetune", "standard-distill"]
Rationales = str | Path | Sequence[str | Path] | None  # one source of teacher records, several, or none
MODES: tuple[str, ...] = ("step-by-step", "standard-finetune", "standard-distill")


# ---------------------------------------------------------------- argument groups


@dataclass(frozen=True)
class DataOptions:
    """What the student reads and learns.

    Args:
        label_source: Labels learned in step-by-step mode: the gold ones or the teacher's.
        alpha: Weight of the label loss; the rationale loss gets 1 - alpha.
        max_input_tokens: Input tokens kept (truncated beyond).
        max_target_tokens: Label and rationale tokens kept (truncated beyond).
        allow_incomplete: Train on an extraction that has not finished (its manifest not complete, or a run still
            writing it): only the records it holds so far.
    """

    label_source: Literal["gold", "teacher"] = "gold"
    alpha: float = 0.5
    max_input_tokens: int = 1024
    max_target_tokens: int = 256
    allow_incomplete: bool = False

    def __post_init__(self) -> None:
        if self.label_source not in ("gold", "teacher"):
            raise ValueError(f"--label-source must be gold or teacher, got {self.label_source!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.max_input_tokens < 1 or self.max_target_tokens < 1:
            raise ValueError(
                "--max-input-tokens and --max-target-tokens must be positive, "
                f"got {self.max_input_tokens} and {self.max_target_tokens}"
            )


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer, the batches and the budget (the same recipe on any number of workers).

    Args:
        learning_rate: Peak AdamW learning rate (5e-5 for pretrained T5; about 1e-3 for tiny from scratch).
        batch_size: Examples per optimizer step, over all workers (step-by-step puts 2 rows per example in the
            batch); each worker takes batch_size / workers of them.
        grad_accum: Micro-batches per optimizer step on each worker (batch_size must divide by workers x grad_accum).
        max_steps: Optimizer steps budget (0: none; then --max-minutes must be set).
        max_minutes: Wall-clock training budget in minutes, validation included (0: none).
        schedule: Learning-rate schedule after warmup; linear decays to zero over the step or time budget.
        warmup_steps: Linear warmup steps.
    """

    learning_rate: float = 5e-5
    batch_size: int = 64
    grad_accum: int = 1
    max_steps: int = 10000
    max_minutes: float = 0.0
    schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                f"--batch-size and --grad-accum must be positive, got {self.batch_size} and {self.grad_accum}"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"--batch-size {self.batch_size} does not divide into --grad-accum {self.grad_accum} micro-batches"
            )
        if self.max_steps < 0 or self.max_minutes < 0 or (self.max_steps == 0 and self.max_minutes == 0):
            raise ValueError("give a budget: --max-steps and/or --max-minutes (positive)")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"--schedule must be linear or constant, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")


@dataclass(frozen=True)
class EvalOptions:
    """Validation (model selection), test and logging.

    Args:
        eval_every: Validate (label-only generation), keep the best model and checkpoint every this many steps.
        eval_limit: Evaluate on at most this many validation and test examples (0: all), the same ones in every run.
        eval_batch_size: Batch size of evaluation generation (per worker).
        log_every: Steps between rows of the CSV loss log.
        report_to: Also send every log row and the final metrics to none, tensorboard (event files in <out>/tensorboard)
            or mlflow (transformers' word for it).
        tracking_uri: MLflow tracking URI for --report-to mlflow ("": $MLFLOW_TRACKING_URI, else MLflow's local
            default).
    """

    eval_every: int = 250
    eval_limit: int = 0
    eval_batch_size: int = 64
    log_every: int = 10
    report_to: tracking.ReportTo = "none"
    tracking_uri: str = ""

    def __post_init__(self) -> None:
        if min(self.eval_every, self.eval_batch_size, self.log_every) < 1 or self.eval_limit < 0:
            raise ValueError(
                f"--eval-every, --eval-batch-size and --log-every must be positive and --eval-limit 0 or more: {self}"
            )


@dataclass(frozen=True)
class ComputeOptions:
    """Where the run trains: this process, or Ray Train workers.

    Args:
        device: cuda, cpu, or auto (this process; Ray workers use --use-gpu instead).
        bf16: bf16 compute on a GPU (autocast; FSDP: bf16 parameters and all-gathers, fp32 reductions and master
            weights). CPU runs stay float32.
        workers: Training processes. 1: this process (the default); more: Ray Train workers, each on a slice of
            every batch.
        use_gpu: One GPU per Ray Train worker (NCCL); without it workers train on CPUs (gloo).
        strategy: ddp (every worker holds the whole student) or fsdp (parameters, gradients and optimizer state
            sharded over the workers).
        ray_address: Ray cluster to train on ("auto": the one `ray start` made here; "ray://host:10001"); empty: a
            private local Ray when --workers > 1. --out on an object store (s3://...) needs nothing shared
            between the nodes; a local --out must be on a filesystem every node mounts.
        max_failures: Worker failures Ray Train recovers from (restarting every worker from the last checkpoint)
            before the run fails.
    """

    device: str = "auto"
    bf16: bool = True
    workers: int = 1
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    ray_address: str = ""
    max_failures: int = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be 1 or more, got {self.workers}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.on_ray and self.device != "auto":
            raise ValueError("--device picks this process's device; Ray Train workers use --use-gpu")
        if self.use_gpu and not self.on_ray:
            raise ValueError(
                "--use-gpu is for Ray Train workers (--workers N or --ray-address); one process uses --device"
            )
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be -1 (no limit) or more, got {self.max_failures}")

    @property
    def on_ray(self) -> bool:
        return self.workers > 1 or bool(self.ray_address)


# ---------------------------------------------------------------- the plan every worker follows


@dataclass(frozen=True)
class Plan:
    """One run as its workers see it, prepared once by `setup` (picklable: Ray ships it to every worker)."""

    out: Path
    task: tasks.Task
    student: str
    mode: Mode
    data_fraction: float
    seed: int
    teacher_labels: bool
    data: DataOptions
    optim: OptimOptions
    evaluation: EvalOptions
    compute: ComputeOptions
    examples: list[StudentExample]
    counts: dict
    valid: list[tasks.Example]
    test: list[tasks.Example]
    store: str | None = None  # --out on an object store while Ray Train workers train: the run folder's home

    @property
    def with_rationale(self) -> bool:
        return self.mode == "step-by-step"


def train_config(task: str, plan: Plan, rationales: Rationales, vocab_size: int) -> dict:
    """What train_config.json records: every option that changes what is learned. Where it trains (workers,
    strategy, cluster) does not: a run may resume on another number of workers. One source of rationales is
    recorded as its location, several as a list."""
    sources = [str(source) for source in rationale_sources(rationales)]
    return {
        "task": task,
        "labels": plan.task.labels,
        "rationales": (sources[0] if len(sources) == 1 else sources) or None,
        "student": plan.student,
        "mode": plan.mode,
        "data_fraction": plan.data_fraction,
        "seed": plan.seed,
        "vocab_size": vocab_size,
        **{k: v for k, v in asdict(plan.data).items() if k != "allow_incomplete"},  # what was read is `counts`
        **asdict(plan.optim),
        **asdict(plan.evaluation),
        "bf16": plan.compute.bf16,
        "device": plan.compute.device,
    }


# ---------------------------------------------------------------- prediction and evaluation


def predict(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tasks.Example],
    max_input_tokens: int = 1024,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    synced: bool = False,
) -> list[str]:
    """Label-only greedy generation from `predict: x` (the rationale is never generated at inference).
    `synced`: keep stepping until every rank is done (FSDP ranks gather weights together)."""
    model.eval()
    texts = [tasks.label_input(e) for e in examples]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    predictions = [""] * len(texts)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=max_input_tokens,
                return_tensors="pt",
            ).to(device)
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, synced_gpus=synced
            )
            for i, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
                predictions[i] = text.strip()
    return predictions


def evaluation_subset(examples: list[tasks.Example], limit: int) -> list[tasks.Example]:
    """The first `limit` examples of a seed-0 shuffle: the same subset for every run of a grid."""
    if not limit or limit >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


def evaluate(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    task: tasks.Task,
    examples: list[tasks.Example],
    world: World,
    max_input_tokens: int,
    max_new_tokens: int,
    batch_size: int,
) -> dict:
    """Accuracy on `examples`, each rank generating for every world.size-th example (padded to equal counts,
    since FSDP ranks must generate in step); every rank gets the same result."""
    share = math.ceil(len(examples) / world.size)
    mine = examples[world.rank :: world.size]
    with distributed.generation_ready(model, world) as synced:
        predicted = predict(
            model, tokenizer, mine + examples[: share - len(mine)], max_input_tokens, max_new_tokens, batch_size, synced
        )
    by_rank = distributed.gather(predicted[: len(mine)], world)
    predictions = [by_rank[i % world.size][i // world.size] for i in range(len(examples))]
    return {"accuracy": tasks.accuracy(task, predictions, [e.label for e in examples]), "examples": len(examples)}


# ---------------------------------------------------------------- setup


def prepare_out(out: Path, config: dict, overwrite: bool, store: str | None) -> Literal["fresh", "resume", "done"]:
    """What to do with `out` (a copy of `store`, where the run lives there): reuse a finished run of the same
    config, resume its checkpoint, or start over."""
    config_path = out / artifacts.TRAIN_CONFIG
    if overwrite and config_path.exists():
        for path in out.iterdir():  # all but the lock this run holds
            if path.name != artifacts.TRAIN_LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if store:
            storage.delete_prefix(store)
    elif config_path.exists():
        written = artifacts.read_json(config_path, "a training run's options")
        previous = artifacts.current_settings(written)
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise ValueError(
                f"{out} holds a training run with other options (differs in: {', '.join(changed)}); "
                "pass --overwrite to replace it or choose another --out"
            )
        if written != config:  # an earlier stepwise's names: today's from now on
            artifacts.write_json(config_path, config)
        if (out / artifacts.METRICS).exists():
            checkpoints.remove_all(out, store)  # a kill between metrics.json and the clean-up
            return "done"
        if checkpoints.resume_point(out, store) is not None:
            return "resume"
    elif out.exists() and any(p.name != artifacts.TRAIN_LOCK for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and is not a stepwise training folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_all(out, store)  # a fresh start: no stale Ray record either
    artifacts.write_json(config_path, config)
    return "fresh"


def save_tokenizer(out: Path, student: str, examples: list[StudentExample], vocab_size: int) -> None:
    """The run's tokenizer into `out`: trained on the training text for a locally built student, else the
    checkpoint's own."""
    if student in SHAPES:
        explained = [e for e in examples if e.rationale]
        texts = [tasks.LABEL_PREFIX + e.input for e in examples] + [e.label for e in examples]
        texts += [tasks.RATIONALE_PREFIX + e.input for e in explained] + [e.rationale for e in explained]
        train_tokenizer(texts, out, vocab_size=vocab_size)
    else:
        AutoTokenizer.from_pretrained(student).save_pretrained(out)


def rationale_sources(rationales: Rationales) -> list[str | Path]:
    """The sources of rationales, one name each however they were spelled: an absolute folder, or a URI."""
    given = [rationales] if isinstance(rationales, (str, Path)) else list(rationales or ())
    locations = [storage.as_location(source) for source in given if source]
    return [where if storage.is_remote(where) else Path(where).resolve() for where in locations]


def setup(
    task: str,
    out: Path,
    rationales: Rationales,
    student: str,
    mode: str,
    data_fraction: float,
    seed: int,
    vocab_size: int,
    data: DataOptions,
    optim: OptimOptions,
    evaluation: EvalOptions,
    compute: ComputeOptions,
    overwrite: bool,
    labels: list[str] | None = None,
    store: str | None = None,
) -> Plan | None:
    """Check the options, read the data, prepare the folder (None: it already holds this finished run). `store`:
    where the run folder lives while workers train, `out` being this machine's copy."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    if optim.batch_size % (compute.workers * optim.grad_accum):
        raise ValueError(
            f"--batch-size {optim.batch_size} does not divide into --workers {compute.workers} "
            f"x --grad-accum {optim.grad_accum} micro-batches"
        )
    distributed.check_strategy(compute.strategy, group_coming=compute.on_ray)
    task_def = tasks.get_task(task, labels)
    sources = rationale_sources(rationales)
    for source in sources:
        storage.check_location(source, "--rationales", must_exist=True)
        check_task_matches(source, task_def)
        check_extraction_finished(source, data.allow_incomplete)
    records = records_by_source(sources) if sources else None
    teacher_labels = mode == "standard-distill" or (mode == "step-by-step" and data.label_source == "teacher")
    examples, counts = training_examples(task_def, records, teacher_labels, mode == "step-by-step", data_fraction, seed)
    valid = evaluation_subset(tasks.load_split(task_def, "valid"), evaluation.eval_limit)
    if not valid:
        raise ValueError(f"task {task_def.name!r} has no validation examples to select the best checkpoint on")
    test = evaluation_subset(tasks.load_split(task_def, "test"), evaluation.eval_limit)
    plan = Plan(
        out=Path(out), task=task_def, student=student, mode=mode, data_fraction=data_fraction, seed=seed,
        teacher_labels=teacher_labels, data=data, optim=optim, evaluation=evaluation, compute=compute,
        examples=examples, counts=counts, valid=valid, test=test, store=store,
    )  # fmt: skip

    state = prepare_out(plan.out, train_config(task, plan, sources, vocab_size), overwrite, store)
    if state == "done":
        print(f"[train] {out} already holds this finished run; reusing it (--overwrite retrains)", flush=True)
        return None
    if state == "fresh":
        save_tokenizer(plan.out, student, examples, vocab_size)
        tasks.save_task(task_def, plan.out)
    where = (
        f"{compute.workers} Ray Train worker(s), {compute.strategy}, {'GPU' if compute.use_gpu else 'CPU'}"
        if compute.on_ray
        else "one process"
    )
    print(
        f"[train] {task_def.name} {mode} (labels: {'teacher' if teacher_labels else 'gold'}), "
        f"student {student} on {where}; examples: {counts}",
        flush=True,
    )
    return plan


# ---------------------------------------------------------------- one worker's run


@dataclass
class Worker:
    """One training process's state: the student (as stored and as called), its optimizer and where it stands."""

    plan: Plan
    world: World
    tokenizer: PreTrainedTokenizerBase
    columns: dict[str, list[list[int]]]
    max_new_tokens: int
    model: T5ForConditionalGeneration  # parameters, optimizer, checkpoints and generation go through it
    forward: torch.nn.Module  # what the training step calls (the DDP wrapper, or the model itself)
    optimizer: torch.optim.Optimizer
    progress: Progress
    on_ray: bool
    tracker: tracking.Tracker = tracking.NO_TRACKER  # rank 0's
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        """Training seconds over every session of the run (the time budget spans resumed sessions)."""
        return self.progress.elapsed_s + time.monotonic() - self.started

    def budget_spent(self) -> float:
        """The spent share of the step or time budget, whichever is further; rank 0's clock decides for all."""
        optim = self.plan.optim
        spent = max(
            self.progress.step / optim.max_steps if optim.max_steps else 0.0,
            self.elapsed() / (60 * optim.max_minutes) if optim.max_minutes else 0.0,
        )
        return distributed.from_rank0(spent, self.world) if optim.max_minutes else spent


def initial_student(plan: Plan, tokenizer: PreTrainedTokenizerBase, world: World) -> T5ForConditionalGeneration:
    """The student before training: built from `seed` (tiny/small) or loaded (a checkpoint). FSDP ranks but
    rank 0 only lay it out on the meta device: their shards come from rank 0."""
    if distributed.empty_on_meta(world):
        local = plan.student in SHAPES
        config = student_config(tokenizer, plan.student) if local else AutoConfig.from_pretrained(plan.student)
        with torch.device("meta"):
            return T5ForConditionalGeneration(config)
    if plan.student in SHAPES:
        return build_student(tokenizer, plan.student, plan.seed)
    return T5ForConditionalGeneration.from_pretrained(plan.student)


def start_worker(plan: Plan, device: torch.device, on_ray: bool) -> Worker:
    """Tokenize, build and wrap the student, and restore the newest checkpoint if there is one."""
    world = distributed.join(plan.compute.strategy, device)
    tokenizer = AutoTokenizer.from_pretrained(plan.out)
    columns = tokenize_examples(tokenizer, plan.examples, plan.data.max_input_tokens, plan.data.max_target_tokens)
    max_new_tokens = min(plan.data.max_target_tokens, max(len(ids) for ids in columns["label"]) + 2)
    model = initial_student(plan, tokenizer, world)
    model.generation_config.max_new_tokens = max_new_tokens  # saved with the model: label-only decoding length
    forward = distributed.wrap(model, world, plan.compute.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.optim.learning_rate, weight_decay=0.0)
    progress = Progress()
    resume_from = checkpoints.resume_point(plan.out, plan.store, on_ray)
    if resume_from is not None:
        progress = checkpoints.restore(resume_from, model, optimizer)
        if world.main:
            print(
                f"[train] resuming {plan.store or plan.out} at step {progress.step} "
                f"({progress.elapsed_s / 60:.1f} min trained) from {resume_from.where}",
                flush=True,
            )
    if world.main:
        checkpoints.finish_interrupted_writes(plan.out)
        checkpoints.restart_log(plan.out, progress.step)
        params = sum(p.numel() for p in model.parameters())  # an FSDP shard's numel is the whole parameter's
        print(
            f"[train] rank 0 of {world.size} ({world.strategy}): {params / 1e6:.1f}M params on {world.device}",
            flush=True,
        )
    tracker = open_tracker(plan, progress.step) if world.main else tracking.NO_TRACKER
    distributed.barrier(world)
    return Worker(plan, world, tokenizer, columns, max_new_tokens, model, forward, optimizer, progress, on_ray, tracker)


def open_tracker(plan: Plan, resume_step: int) -> tracking.Tracker:
    evaluation = plan.evaluation
    settings = artifacts.read_json(plan.out / artifacts.TRAIN_CONFIG, "the run's settings")
    run_name = f"{plan.out.name} ({plan.mode})"
    return tracking.open_tracker(evaluation.report_to, plan.out, checkpoints.root(plan.out), run_name, settings,
                                 evaluation.tracking_uri, resume_step)  # fmt: skip


def score(worker: Worker, examples: list[tasks.Example]) -> dict:
    """Accuracy of the worker's model on `examples` (every rank takes part)."""
    plan = worker.plan
    return evaluate(worker.model, worker.tokenizer, plan.task, examples, worker.world, plan.data.max_input_tokens,
                    worker.max_new_tokens, plan.evaluation.eval_batch_size)  # fmt: skip


def train_step(worker: Worker, lr: float) -> tuple[torch.Tensor, TokenCounts]:
    """One optimizer step on this worker's slice of the step's batch: its (label, rationale) token loss sums,
    and the whole step's token counts."""
    plan, world = worker.plan, worker.world
    for group in worker.optimizer.param_groups:
        group["lr"] = lr
    # Dropout masks (pretrained students) are fixed per step and rank: a resumed run draws the same ones.
    torch.manual_seed(random.Random(f"{plan.seed}-{worker.progress.step}-{world.rank}").getrandbits(63))
    indices = step_examples(len(plan.examples), plan.optim.batch_size, plan.seed, worker.progress.step)
    counts = target_tokens(worker.columns, indices, plan.with_rationale)
    micro_batches = worker_micro_batches(indices, world.rank, world.size, plan.optim.grad_accum)
    bf16_autocast = plan.compute.bf16 and world.device.type == "cuda" and world.strategy != "fsdp"  # FSDP casts itself
    pad_id, start_id = worker.tokenizer.pad_token_id, worker.model.config.decoder_start_token_id
    sums = torch.zeros(2, device=world.device)
    for number, part in enumerate(micro_batches):
        batch = {
            k: v.to(world.device)
            for k, v in collate(worker.columns, part, plan.with_rationale, pad_id, start_id).items()
        }
        sync = distributed.gradient_sync(worker.forward, world, enabled=number == len(micro_batches) - 1)
        with sync:
            with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
                label_sum, rationale_sum = token_loss_sums(worker.forward, batch)
            # The step's loss is normalised by the whole step's token counts; the all-reduce averages over
            # workers, so each worker's part is scaled back up by the world size.
            (objective(label_sum, rationale_sum, counts, plan.data.alpha) * world.size).backward()
        sums += torch.stack([label_sum.detach(), rationale_sum.detach()])
    torch.nn.utils.clip_grad_norm_(worker.model.parameters(), 1.0)
    worker.optimizer.step()
    worker.optimizer.zero_grad(set_to_none=True)
    worker.progress.step += 1
    return sums, counts


def log_row(worker: Worker, window: list[tuple[torch.Tensor, TokenCounts]], lr: float) -> dict:
    """The mean losses of the steps since the last row, over all workers."""
    sums = distributed.all_sum(torch.stack([s for s, _ in window]), worker.world).tolist()
    alpha = worker.plan.data.alpha
    label = [label_sum / max(c.label, 1) for (label_sum, _), (_, c) in zip(sums, window, strict=True)]
    row = {"step": worker.progress.step, "elapsed_s": round(worker.elapsed(), 1), "lr": lr}
    row["loss"] = row["label_loss"] = round(sum(label) / len(label), 4)
    if worker.plan.with_rationale:
        rationale = [r / max(c.rationale, 1) for (_, r), (_, c) in zip(sums, window, strict=True)]
        row["rationale_loss"] = round(sum(rationale) / len(rationale), 4)
        row["loss"] = round(alpha * row["label_loss"] + (1 - alpha) * row["rationale_loss"], 4)
    return row


def validate_and_checkpoint(worker: Worker) -> float:
    """Validation accuracy now; a new best becomes the folder's model; then a checkpoint (best model first: a
    kill between the two repeats the same steps and finds the same best)."""
    plan, world, progress = worker.plan, worker.world, worker.progress
    accuracy = score(worker, plan.valid)["accuracy"]
    best_files = []
    if accuracy > progress.best_accuracy:
        progress.best_accuracy, progress.best_step = accuracy, progress.step
        best_files = checkpoints.save_best(plan.out, worker.model, world)
    if world.main:
        row = {"step": progress.step, "elapsed_s": round(worker.elapsed(), 1), "valid_accuracy": accuracy}
        checkpoints.append_log(plan.out, row)
        worker.tracker.log(row, progress.step)
        if plan.store:  # before the checkpoint: the store never holds one newer than its best model and log
            checkpoints.push_run(plan.out, plan.store, [*best_files, artifacts.TRAIN_LOG])
    progress.validated_step = progress.step
    progress.elapsed_s, worker.started = worker.elapsed(), time.monotonic()
    checkpoints.save(plan.out, worker.model, worker.optimizer, progress, world, worker.on_ray)
    worker.forward.train()
    return accuracy


def train_loop(worker: Worker) -> None:
    """Optimizer steps until the budget is spent: a log row every log_every steps, validation and a checkpoint
    every eval_every, and both once more at the end."""
    plan, progress = worker.plan, worker.progress
    quiet = {} if worker.world.main else {"disable": True}  # rank 0's bar (disable=False would beat TQDM_DISABLE)
    bar = progress_bar(
        total=plan.optim.max_steps or None, initial=progress.step, desc=f"train {plan.mode}", unit="step", **quiet
    )
    window: list[tuple[torch.Tensor, TokenCounts]] = []
    lr = plan.optim.learning_rate
    worker.forward.train()
    while (spent := worker.budget_spent()) < 1.0:
        lr = plan.optim.learning_rate * lr_factor(plan.optim.schedule, progress.step, plan.optim.warmup_steps, spent)
        window.append(train_step(worker, lr))
        bar.update(1)
        if progress.step % plan.evaluation.log_every == 0:
            write_log_row(worker, window, lr, bar)
        if progress.step % plan.evaluation.eval_every == 0:
            accuracy = validate_and_checkpoint(worker)
            if worker.world.main:
                bar.write(
                    f"[train] step {progress.step}: valid accuracy {accuracy:.4f} "
                    f"(best {progress.best_accuracy:.4f} at step {progress.best_step})"
                )
    if window:  # the last steps since the previous log row
        write_log_row(worker, window, lr, bar)
    if progress.validated_step != progress.step:  # ... and since the previous validation
        validate_and_checkpoint(worker)
    bar.close()


def write_log_row(worker: Worker, window: list[tuple[torch.Tensor, TokenCounts]], lr: float, bar: Any) -> None:
    row = log_row(worker, window, lr)  # a collective: every rank computes it
    window.clear()
    if worker.world.main:
        bar.set_postfix(label=row["label_loss"], rationale=row.get("rationale_loss", "-"), lr=f"{lr:.2e}")
        checkpoints.append_log(worker.plan.out, row)
        worker.tracker.log(row, worker.progress.step)


def finish_worker(worker: Worker) -> None:
    """Test accuracy of the best model on validation (loaded back into every rank); rank 0 writes metrics.json."""
    plan, world, progress = worker.plan, worker.world, worker.progress
    best = T5ForConditionalGeneration.from_pretrained(plan.out).state_dict() if world.main else {}
    distributed.load_full_weights(worker.model, best, world)
    test = score(worker, plan.test) if plan.test else None
    if world.main:
        metrics = {
            "task": plan.task.name, "mode": plan.mode, "label_source": "teacher" if plan.teacher_labels else "gold",
            "student": plan.student, "data_fraction": plan.data_fraction, "seed": plan.seed, "steps": progress.step,
            "train_minutes": round(worker.elapsed() / 60, 2), "best_step": progress.best_step,
            "train_examples": plan.counts, "valid": {"accuracy": progress.best_accuracy, "examples": len(plan.valid)},
            "test": test,
        }  # fmt: skip
        artifacts.write_json(plan.out / artifacts.METRICS, metrics)
        if plan.store:
            checkpoints.push_run(plan.out, plan.store, [artifacts.METRICS, artifacts.TRAIN_LOG])
        worker.tracker.finish(metrics)
    distributed.barrier(world)


def train_worker(plan: Plan, device: torch.device, on_ray: bool = False) -> None:
    """The whole training run as one process of the world sees it (the only process, or one Ray Train worker).
    Where the run folder lives on an object store, the worker's copy of it is a temporary folder of its own."""
    if not plan.store:
        train_in_folder(plan, device, on_ray)
        return
    with tempfile.TemporaryDirectory(prefix="stepwise-run-") as local:
        checkpoints.pull_run(plan.store, Path(local))
        train_in_folder(replace(plan, out=Path(local)), device, on_ray)


def train_in_folder(plan: Plan, device: torch.device, on_ray: bool) -> None:
    worker = start_worker(plan, device, on_ray)
    train_loop(worker)
    finish_worker(worker)


# ---------------------------------------------------------------- the stage


def run(plan: Plan) -> None:
    """Train in this process, or on Ray Train workers (every one runs `train_worker`)."""
    if plan.compute.on_ray:
        from stepwise.training import ray_train

        ray_train.fit(plan, train_worker)
        return
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if plan.compute.device == "auto" else plan.compute.device
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP and FSDP want the GPU's index
    train_worker(plan, device)


def finish(plan: Plan) -> Path:
    """The folder is the model now, not a training state: drop the checkpoints; report."""
    checkpoints.remove_all(plan.out, plan.store)
    metrics = artifacts.read_metrics(plan.out)
    cards.write_model_card(plan.out)
    test_text = (
        f"{metrics['test']['accuracy']:.4f} on {metrics['test']['examples']}"
        if metrics["test"]
        else "n/a (no test split)"
    )
    print(
        f"[train] done: {metrics['steps']} steps in {metrics['train_minutes']:.1f} min; "
        f"valid accuracy {metrics['valid']['accuracy']:.4f} "
        f"(step {metrics['best_step']}), test {test_text}; saved {plan.out}",
        flush=True,
    )
    return plan.out


def main(
    task: str,
    out: str | Path,
    rationales: Sequence[str] | None = None,
    student: str = "tiny",
    mode: Mode = "step-by-step",
    data_fraction: float = 1.0,
    seed: int = 0,
    vocab_size: int = 2000,
    labels: list[str] | None = None,
    data: DataOptions = DataOptions(),
    optim: OptimOptions = OptimOptions(),
    evaluation: EvalOptions = EvalOptions(),
    compute: ComputeOptions = ComputeOptions(),
    overwrite: bool = False,
) -> Path:
    """Train a T5 student on labels (and teacher rationales); save the best model on the validation split.

    Args:
        task: Task name (svamp, cqa, esnli) or a custom task's data file/folder.
        out: Output model folder (Hugging Face format + task.json, train_config.json, metrics.json, log.csv), or a
            prefix on an object store (s3://bucket/prefix): trained in a local folder under STEPWISE_CACHE, then
            uploaded with checksums.json; on Ray Train workers the run folder and Ray's checkpoints live there
            while it trains (nodes that share no disk resume from it).
        rationales: Extraction output folder (JSONL/Parquet shards), or its prefix on an object store
            (s3://bucket/prefix); not needed for standard-finetune. Several (--rationales A B): merged by id, the
            first usable record winning; records of inputs outside the task's splits (the teacher answers a server
            logged) become examples of their own, once per input, never a validation or test input.
        student: A T5 checkpoint name or folder (from_pretrained), or tiny/small: built locally from scratch with a
            tokenizer trained on the task's text.
        mode: step-by-step (labels + rationales), standard-finetune (gold labels), standard-distill (teacher labels).
        data_fraction: Share of the train split used (0.125 ... 1.0), drawn with --seed.
        seed: Seed of the data fraction, the batch order and a locally built student's weights.
        vocab_size: Tokenizer vocabulary size of a locally built tiny/small student.
        labels: A custom task's closed label set, as given to `stepwise extract --labels` (a task file beside the
            data says it once for every stage).
        data: What the student reads and learns.
        optim: The optimizer, the batches and the budget.
        evaluation: Validation, test and logging.
        compute: Where the run trains.
        overwrite: Retrain even if --out already holds a finished or different run.
    """
    out_at = storage.as_location(out)
    storage.check_location(out_at, "--out")
    # On an object store: trained in a local folder named after the location (a rerun here resumes from its
    # checkpoint), and the finished run folder uploaded whole, checksums.json last. On Ray Train workers the store
    # holds the run as it trains (checkpoints.py), and that local folder is the driver's copy of it.
    out = storage.working_folder(out_at) if storage.is_remote(out_at) else Path(out_at)
    store = str(out_at) if storage.is_remote(out_at) and compute.on_ray else None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    # One run per folder: a second one would delete this one's checkpoints and staging folders.
    with artifacts.folder_lock(out / artifacts.TRAIN_LOCK, "train", out, remove=True):
        if store:
            checkpoints.pull_run(store, out)  # a run begun elsewhere resumes here
        plan = setup(
            task, out, rationales, student, mode, data_fraction, seed, vocab_size, data, optim, evaluation, compute,
            overwrite, labels, store,
        )  # fmt: skip
        if plan is not None:
            if store:
                checkpoints.push_run(out, store)  # what every worker starts from
            run(plan)
            if store:
                checkpoints.pull_run(store, out)  # what rank 0 left there
            out = finish(plan)
    if not storage.is_remote(out_at):
        return out
    storage.upload_folder(out, str(out_at))
    print(f"[train] uploaded {out} to {out_at}", flush=True)
    return out_at
