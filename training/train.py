"""`stepwise train`: the distilling step-by-step student and the paper's two baselines.

step-by-step: every example trains two targets from one input, `predict: x` -> label and `explain: x` ->
rationale, in ONE forward pass (the predict and explain rows of a batch are stacked), with
loss = alpha * L_label + (1 - alpha) * L_rationale (each the mean token loss of its own rows).
standard-finetune learns the gold labels, standard-distill the teacher's labels (label rows only).

The output folder is the contract for export and serving: a Hugging Face model (config.json,
model.safetensors, tokenizer files) + task.json + train_config.json + metrics.json + log.csv. The model in
it is the best one on the VALIDATION split; test metrics are computed once, at the end, on that model.
A periodic checkpoint in `checkpoint/` lets a rerun with the same options continue after an interruption;
a rerun of a finished run returns its folder without training again (unless --force).
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import time
import functools
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration

from stepwise import artifacts, tasks
from stepwise.training.data import StudentExample, check_task_matches, records_by_id, training_examples
from stepwise.training.tiny import SHAPES, build_student, train_tokenizer

Mode = Literal["step-by-step", "standard-finetune", "standard-distill"]
MODES: tuple[str, ...] = ("step-by-step", "standard-finetune", "standard-distill")
IGNORE = -100  # target positions that carry no loss (padding)
CHECKPOINT = artifacts.CHECKPOINT
LOG_COLUMNS = ["step", "elapsed_s", "lr", "loss", "label_loss", "rationale_loss", "valid_accuracy"]


# ---------------------------------------------------------------- batches and the loss


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, examples: list[StudentExample], max_input_length: int, max_target_length: int) -> dict[str, list[list[int]]]:
    """Token ids per example, computed once: predict/explain inputs, label and rationale targets."""
    as_example = [tasks.Example("", e.input, e.label) for e in examples]
    columns = {
        "predict": encode(tokenizer, [tasks.label_input(e) for e in as_example], max_input_length),
        "label": encode(tokenizer, [e.label for e in examples], max_target_length),
    }
    if all(e.rationale is not None for e in examples):
        columns["explain"] = encode(tokenizer, [tasks.rationale_input(e) for e in as_example], max_input_length)
        columns["rationale"] = encode(tokenizer, [e.rationale for e in examples], max_target_length)
    return columns


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate(columns: dict[str, list[list[int]]], indices: list[int], with_rationale: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """One batch holding both tasks: the examples' predict rows, then (step-by-step) their explain rows."""
    inputs = [columns["predict"][i] for i in indices]
    targets = [columns["label"][i] for i in indices]
    if with_rationale:
        inputs += [columns["explain"][i] for i in indices]
        targets += [columns["rationale"][i] for i in indices]
    input_ids = _pad(inputs, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long() if pad_id is not None else torch.ones_like(input_ids),
        "targets": _pad(targets, IGNORE),
        "is_label_row": torch.arange(len(inputs)) < len(indices),
    }


def multitask_loss(logits: torch.Tensor, targets: torch.Tensor, is_label_row: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, label loss, rationale loss): per-task mean token losses from one batch holding both tasks,
    weighted alpha and 1 - alpha. A batch of label rows only gives the plain label loss."""
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    real = targets != IGNORE
    label_tokens = real & is_label_row[:, None]
    label_loss = (token_loss * label_tokens).sum() / label_tokens.sum().clamp(min=1)
    if is_label_row.all():
        return label_loss, label_loss, None
    rationale_tokens = real & ~is_label_row[:, None]
    rationale_loss = (token_loss * rationale_tokens).sum() / rationale_tokens.sum().clamp(min=1)
    return alpha * label_loss + (1 - alpha) * rationale_loss, label_loss, rationale_loss


def batch_loss(model: T5ForConditionalGeneration, batch: dict[str, torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    targets = batch["targets"]
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=targets)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids).logits
    return multitask_loss(logits, targets, batch["is_label_row"], alpha)


@functools.lru_cache(maxsize=2)
def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each micro-batch of one epoch: a shuffle fixed by (seed, epoch), so a resumed
    run sees exactly the batches the uninterrupted one would have."""
    order = list(range(count))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def lr_factor(schedule: str, step: int, warmup_steps: int, progress: float) -> float:
    """Warmup then constant or linear decay to zero; `progress` is the spent share of the step or time budget."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * (max(0.0, 1.0 - progress) if schedule == "linear" else 1.0)


# ---------------------------------------------------------------- prediction and evaluation


def predict(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, examples: list[tasks.Example], max_input_length: int = 1024, max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Label-only greedy generation from `predict: x` (the rationale is never generated at inference)."""
    model.eval()
    texts = [tasks.label_input(e) for e in examples]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    predictions = [""] * len(texts)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            encoded = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_input_length, return_tensors="pt").to(device)
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            for i, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                predictions[i] = text.strip()
    return predictions


def evaluation_subset(examples: list[tasks.Example], limit: int) -> list[tasks.Example]:
    """The first `limit` examples of a seed-0 shuffle: the same subset for every run of a grid."""
    if not limit or limit >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


def evaluate(model, tokenizer, task: tasks.Task, examples: list[tasks.Example], max_input_length: int, max_new_tokens: int, batch_size: int) -> dict:
    predictions = predict(model, tokenizer, examples, max_input_length, max_new_tokens, batch_size)
    return {"accuracy": tasks.accuracy(task, predictions, [e.label for e in examples]), "examples": len(examples)}


# ---------------------------------------------------------------- the output folder


def _prepare_out(out: Path, config: dict, force: bool) -> Literal["fresh", "resume", "done"]:
    """What to do with `out`: reuse a finished run of the same config, resume its checkpoint, or start over."""
    config_path = out / artifacts.TRAIN_CONFIG
    if force and config_path.exists():
        shutil.rmtree(out)
    elif config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise ValueError(f"{out} holds a training run with other options (differs in: {', '.join(changed)}); pass --force to replace it or choose another --out")
        if (out / artifacts.METRICS).exists():
            return "done"
        if (out / CHECKPOINT / "state.pt").exists():
            return "resume"
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and is not a stepwise training folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(config_path, config)
    return "fresh"


def _save_checkpoint(out: Path, model: T5ForConditionalGeneration, state: dict) -> None:
    """Model + optimizer + counters, written beside the old checkpoint and swapped in, so a kill at any
    moment leaves one whole checkpoint."""
    tmp, old, final = out / f".{CHECKPOINT}.tmp", out / f".{CHECKPOINT}.old", out / CHECKPOINT
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(state, tmp / "state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _restart_log(out: Path, upto_step: int) -> None:
    """Keep the log rows up to the checkpoint's step (rows written after it are trained again)."""
    path = out / artifacts.TRAIN_LOG
    rows = []
    if path.exists():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _append_log(out: Path, row: dict) -> None:
    with (out / artifacts.TRAIN_LOG).open("a", newline="") as f:
        csv.DictWriter(f, LOG_COLUMNS).writerow(row)


# ---------------------------------------------------------------- the stage


def main(
    task: str,
    out: Path,
    rationales: Path | None = None,
    student: str = "tiny",
    mode: Mode = "step-by-step",
    label_source: Literal["gold", "teacher"] = "gold",
    alpha: float = 0.5,
    data_fraction: float = 1.0,
    seed: int = 0,
    learning_rate: float = 5e-5,
    batch_size: int = 64,
    grad_accum: int = 1,
    max_steps: int = 10000,
    max_minutes: float = 0.0,
    schedule: Literal["linear", "constant"] = "linear",
    warmup_steps: int = 0,
    max_input_length: int = 1024,
    max_target_length: int = 256,
    eval_every: int = 250,
    eval_limit: int = 0,
    eval_batch_size: int = 64,
    log_every: int = 10,
    vocab_size: int = 2000,
    bf16: bool = True,
    device: str = "auto",
    force: bool = False,
) -> Path:
    """Train a T5 student on labels (and teacher rationales); save the best model on the validation split.

    Args:
        task: Task name (svamp, cqa, esnli) or a custom task's data file/folder.
        out: Output model folder (Hugging Face format + task.json, train_config.json, metrics.json, log.csv).
        rationales: Extraction output folder (JSONL/Parquet shards); not needed for standard-finetune.
        student: A T5 checkpoint name or folder (from_pretrained), or tiny/small: built locally from scratch with a tokenizer trained on the task's text.
        mode: step-by-step (labels + rationales), standard-finetune (gold labels), standard-distill (teacher labels).
        label_source: Labels learned in step-by-step mode: the gold ones or the teacher's.
        alpha: Weight of the label loss; the rationale loss gets 1 - alpha.
        data_fraction: Share of the train split used (0.125 ... 1.0), drawn with --seed.
        seed: Seed of the data fraction, the batch order and a locally built student's weights.
        learning_rate: Peak AdamW learning rate (5e-5 for pretrained T5; about 1e-3 for tiny from scratch).
        batch_size: Examples per optimizer step (step-by-step puts 2 rows per example in the batch).
        grad_accum: Micro-batches per optimizer step (batch_size must divide by it).
        max_steps: Optimizer steps budget (0: none; then --max-minutes must be set).
        max_minutes: Wall-clock training budget in minutes, validation included (0: none).
        schedule: Learning-rate schedule after warmup; linear decays to zero over the step or time budget.
        warmup_steps: Linear warmup steps.
        max_input_length: Input tokens kept (truncated beyond).
        max_target_length: Label and rationale tokens kept (truncated beyond).
        eval_every: Validate (label-only generation), keep the best model and checkpoint every this many steps.
        eval_limit: Evaluate on at most this many validation and test examples (0: all), the same ones in every run.
        eval_batch_size: Batch size of evaluation generation.
        log_every: Steps between rows of the CSV loss log.
        vocab_size: Tokenizer vocabulary size of a locally built tiny/small student.
        bf16: bf16 autocast on a GPU (CPU runs stay float32).
        device: cuda, cpu, or auto.
        force: Retrain even if --out already holds a finished or different run.
    """
    out = Path(out)
    rationales = Path(rationales).resolve() if rationales else None  # one folder, however it was spelled
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k not in ("out", "force")}
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    if max_steps <= 0 and max_minutes <= 0:
        raise ValueError("give a budget: --max-steps and/or --max-minutes")
    if batch_size % grad_accum:
        raise ValueError(f"--batch-size {batch_size} does not divide into --grad-accum {grad_accum} micro-batches")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    task_def = tasks.get_task(task)
    records = None
    if rationales is not None:
        check_task_matches(rationales, task_def)
        records = records_by_id(rationales)
    with_rationale = mode == "step-by-step"
    teacher_labels = mode == "standard-distill" or (mode == "step-by-step" and label_source == "teacher")
    examples, counts = training_examples(task_def, records, teacher_labels, with_rationale, data_fraction, seed)

    state = _prepare_out(out, config, force)
    if state == "done":
        print(f"[train] {out} already holds this finished run; reusing it (--force retrains)", flush=True)
        return out
    run_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    torch.manual_seed(seed)
    if state == "resume":
        tokenizer = AutoTokenizer.from_pretrained(out)
        model = T5ForConditionalGeneration.from_pretrained(out / CHECKPOINT)
    elif student in SHAPES:
        texts = [tasks.LABEL_PREFIX + e.input for e in examples] + [e.label for e in examples]
        texts += [tasks.RATIONALE_PREFIX + e.input for e in examples if e.rationale] + [e.rationale for e in examples if e.rationale]
        tokenizer = train_tokenizer(texts, out, vocab_size=vocab_size)
        model = build_student(tokenizer, student, seed)
    else:
        tokenizer = AutoTokenizer.from_pretrained(student)
        model = T5ForConditionalGeneration.from_pretrained(student)
        tokenizer.save_pretrained(out)
    tasks.save_task(task_def, out)
    model.to(run_device)

    columns = tokenize_examples(tokenizer, examples, max_input_length, max_target_length)
    max_new_tokens = min(max_target_length, max(len(ids) for ids in columns["label"]) + 2)
    model.generation_config.max_new_tokens = max_new_tokens  # saved with the model: label-only decoding length
    valid = evaluation_subset(tasks.load_split(task_def, "valid"), eval_limit)
    test = evaluation_subset(tasks.load_split(task_def, "test"), eval_limit)
    if not valid:
        raise ValueError(f"task {task_def.name!r} has no validation examples to select the best checkpoint on")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    step, micro_step, elapsed_before, best = 0, 0, 0.0, {"accuracy": -1.0, "step": 0}
    if state == "resume":
        saved = torch.load(out / CHECKPOINT / "state.pt", map_location=run_device, weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        step, micro_step, elapsed_before, best = saved["step"], saved["micro_step"], saved["elapsed_s"], saved["best"]
        torch.set_rng_state(saved["rng"])
        if run_device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        print(f"[train] resuming {out} at step {step} ({elapsed_before / 60:.1f} min trained)", flush=True)
    _restart_log(out, step)
    print(f"[train] {task_def.name} {mode} ({'labels: ' + ('teacher' if teacher_labels else 'gold')}), student {student}, "
          f"{model.num_parameters() / 1e6:.1f}M params on {run_device}; examples: {counts}", flush=True)

    micro_size = batch_size // grad_accum
    per_epoch = math.ceil(len(examples) / micro_size)
    autocast = torch.autocast(device_type=run_device.type, dtype=torch.bfloat16, enabled=bf16 and run_device.type == "cuda")
    started = time.monotonic()
    elapsed = lambda: elapsed_before + time.monotonic() - started  # noqa: E731 - the budget spans resumed sessions
    budget_spent = lambda: max(step / max_steps if max_steps else 0.0, elapsed() / (60 * max_minutes) if max_minutes else 0.0)  # noqa: E731
    window: dict[str, list[float]] = {"loss": [], "label_loss": [], "rationale_loss": []}
    progress = tqdm(total=max_steps or None, initial=step, desc=f"train {mode}", unit="step", dynamic_ncols=True)

    def validate_and_checkpoint() -> None:
        result = evaluate(model, tokenizer, task_def, valid, max_input_length, max_new_tokens, eval_batch_size)
        if result["accuracy"] > best["accuracy"]:
            best.update(accuracy=result["accuracy"], step=step)
            model.save_pretrained(out)  # the folder's model is always the best on validation so far
        _append_log(out, {"step": step, "elapsed_s": round(elapsed(), 1), "valid_accuracy": result["accuracy"]})
        _save_checkpoint(out, model, {"optimizer": optimizer.state_dict(), "step": step, "micro_step": micro_step, "elapsed_s": elapsed(), "best": dict(best),
                                     "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if run_device.type == "cuda" else None})
        progress.write(f"[train] step {step}: valid accuracy {result['accuracy']:.4f} (best {best['accuracy']:.4f} at step {best['step']})")
        model.train()

    def log_losses(lr: float) -> None:
        means = {k: round(sum(v) / len(v), 4) for k, v in window.items() if v}
        progress.set_postfix(label=means["label_loss"], rationale=means.get("rationale_loss", "-"), lr=f"{lr:.2e}")
        _append_log(out, {"step": step, "elapsed_s": round(elapsed(), 1), "lr": lr, **means})
        for values in window.values():
            values.clear()

    model.train()
    lr = learning_rate
    while budget_spent() < 1.0:
        lr = learning_rate * lr_factor(schedule, step, warmup_steps, budget_spent())
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(grad_accum):
            epoch, position = divmod(micro_step, per_epoch)
            indices = epoch_batches(len(examples), micro_size, seed, epoch)[position]
            batch = {k: v.to(run_device) for k, v in collate(columns, indices, with_rationale, tokenizer.pad_token_id).items()}
            with autocast:
                loss, label_loss, rationale_loss = batch_loss(model, batch, alpha)
            (loss / grad_accum).backward()
            micro_step += 1
            window["loss"].append(loss.item())
            window["label_loss"].append(label_loss.item())
            if rationale_loss is not None:
                window["rationale_loss"].append(rationale_loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        if step % log_every == 0:
            log_losses(lr)
        if step % eval_every == 0:
            validate_and_checkpoint()
    if window["loss"]:  # the last steps since the previous log row
        log_losses(lr)
    if step % eval_every:  # ... and since the previous validation
        validate_and_checkpoint()
    progress.close()

    trained_minutes = elapsed() / 60
    model = T5ForConditionalGeneration.from_pretrained(out).to(run_device)
    metrics = {
        "task": task_def.name, "mode": mode, "label_source": "teacher" if teacher_labels else "gold", "student": student,
        "data_fraction": data_fraction, "seed": seed, "steps": step, "train_minutes": round(trained_minutes, 2),
        "best_step": best["step"], "train_examples": counts,
        "valid": {"accuracy": best["accuracy"], "examples": len(valid)},
        "test": evaluate(model, tokenizer, task_def, test, max_input_length, max_new_tokens, eval_batch_size) if test else None,
    }
    artifacts.write_json(out / artifacts.METRICS, metrics)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)  # finished: the folder is the model, not a training state
    test_text = f"{metrics['test']['accuracy']:.4f} on {len(test)}" if test else "n/a (no test split)"
    print(f"[train] done: {step} steps in {trained_minutes:.1f} min; valid accuracy {best['accuracy']:.4f} (step {best['step']}), test {test_text}; saved {out}", flush=True)
    return out
