"""The training loop on one GPU without Ray: bf16 in one process, under DDP and under FSDP (a group of one).

DDP and FSDP run as a torch.distributed group of one (NCCL), through the same `train_worker` Ray Train workers run.

Checks, each printed with its numbers; the exit status is 1 when any fails:
  1. a tiny student learns the words task (label = the category most of four words belong to, chance 25%) in
     one process (bf16 autocast), under DDP and under FSDP (bf16 parameters, fp32 reductions): validation
     accuracy >= 0.75, and the three agree on the first losses (DDP: same arithmetic; FSDP: within bf16 rounding);
  2. a t5-v1_1-base-shaped student (random weights, built here) trains two step-by-step steps at inputs of 1024
     and targets of 256 tokens, 8 examples (16 rows), under DDP and FSDP: peak GPU memory against the model
     states `stepwise bench training-memory` counts, i.e. what the activations of 8 examples take.

Needs only torch, transformers (4.57 or 5.x), sentencepiece and tqdm, and this checkout (no Ray, no hub, no
stepwise environment), from the repository root:

    python3 -m benchmarks.gpu_train_check [--out results.json]       # on a bare GPU box
    python3 -m benchmarks.gpu_train_check --device cpu --skip-base   # the same loop on CPU (gloo, float32)
    python3 -m stepwise bench gpu-train-check ...                    # the same, in the student environment
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from benchmarks.harness import free_port
from stepwise import artifacts

GiB = 2**30


def losses(out: Path) -> list[float]:
    with (out / artifacts.TRAIN_LOG).open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def run(label: str, strategy: str | None, device: str, **train_options) -> dict:
    """One `stepwise train` run in this process: plain (strategy None) or as rank 0 of a group of one."""
    import torch
    import torch.distributed as dist

    from stepwise.training import train

    if strategy:
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    try:
        out = train.main(
            compute=train.ComputeOptions(device=device, bf16=True, strategy=strategy or "ddp"), **train_options
        )
    finally:
        if strategy:
            dist.destroy_process_group()
    metrics = artifacts.read_metrics(out)
    return {
        "run": label,
        "seconds": round(time.monotonic() - started, 1),
        "losses": losses(out),
        "valid_accuracy": metrics["valid"]["accuracy"],
        "test_accuracy": metrics["test"]["accuracy"] if metrics["test"] else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if device == "cuda" else None,
    }


def base_student(folder: Path, task: Path) -> tuple[Path, int]:
    """A t5-v1_1-base-shaped T5 with random weights (vocabulary 32128) and a tokenizer trained on the task;
    the folder and the parameter count."""
    from transformers import T5Config, T5ForConditionalGeneration

    from stepwise import tasks
    from stepwise.training.tiny import train_tokenizer

    examples = tasks.load_split(tasks.get_task(str(task)), "train")
    tokenizer = train_tokenizer(
        [tasks.label_input(e) for e in examples] + [e.label for e in examples], folder, vocab_size=200
    )
    config = T5Config(
        vocab_size=32128,
        d_model=768,
        d_ff=2048,
        num_layers=12,
        num_heads=12,
        d_kv=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def main(device: Literal["cuda", "cpu"] = "cuda", skip_base: bool = False, out: Path | None = None) -> Path:
    """The training loop on one GPU without Ray: bf16 in one process, under DDP and under FSDP (a group of one).

    Args:
        device: cuda, or cpu for the same loop on CPU (gloo, float32)
        skip_base: only the tiny-student checks (not the t5-v1_1-base shape)
        out: where the results go as JSON (default: gpu_train_check.json in the run's temporary folder)
    """
    import torch
    import transformers

    from stepwise.training.tiny import write_words_task
    from stepwise.training.train import DataOptions, EvalOptions, OptimOptions

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: pass --device cpu for the CPU variant")
    environment = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    print(json.dumps(environment), flush=True)
    results: dict = {"environment": environment, "runs": [], "checks": []}

    def check(name: str, passed: bool, detail: str) -> None:
        results["checks"].append({"check": name, "passed": bool(passed), "detail": detail})
        print(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="stepwise-gpu-check-"))
    task, rationales = write_words_task(work / "words")
    tiny = dict(
        task=str(task),
        rationales=rationales,
        student="tiny",
        mode="step-by-step",
        seed=0,
        vocab_size=200,
        data=DataOptions(max_input_tokens=32, max_target_tokens=24),
        optim=OptimOptions(learning_rate=3e-3, batch_size=32, max_steps=40),
        evaluation=EvalOptions(eval_every=20, eval_limit=64, log_every=1),
    )
    tiny_runs = {}
    for label, strategy in (("one process", None), ("ddp", "ddp"), ("fsdp", "fsdp")):
        tiny_runs[label] = run(f"tiny, {label}", strategy, device, out=work / f"tiny-{label.replace(' ', '-')}", **tiny)
        results["runs"].append(tiny_runs[label])
        print(json.dumps(tiny_runs[label]), flush=True)
        check(
            f"tiny {label} learns",
            tiny_runs[label]["valid_accuracy"] >= 0.75,
            f"valid accuracy {tiny_runs[label]['valid_accuracy']:.3f} (chance 0.25)",
        )
    alone, ddp, fsdp = (tiny_runs[k]["losses"] for k in ("one process", "ddp", "fsdp"))
    check(
        "ddp = one process",
        all(abs(a - b) <= 1e-3 * abs(a) + 1e-3 for a, b in zip(alone[:10], ddp[:10], strict=True)),
        f"first losses {alone[:3]} vs {ddp[:3]}",
    )
    check(
        "fsdp ~ one process (bf16)",
        all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(alone[:3], fsdp[:3], strict=True)),
        f"first losses {alone[:3]} vs {fsdp[:3]}",
    )

    if not skip_base:
        long_task, long_rationales = write_words_task(work / "long-words", filler_words=1100)
        student, params = base_student(work / "base-student", long_task)
        base = dict(
            task=str(long_task),
            rationales=long_rationales,
            student=str(student),
            mode="step-by-step",
            seed=0,
            data=DataOptions(max_input_tokens=1024, max_target_tokens=256),
            optim=OptimOptions(learning_rate=5e-5, batch_size=8, max_steps=2),
            evaluation=EvalOptions(eval_every=2, eval_limit=8, eval_batch_size=8, log_every=1),
        )
        for label, strategy, states in (
            ("ddp", "ddp", 18),
            ("fsdp", "fsdp", 16),
        ):  # bytes per parameter of the model states (one GPU: nothing sharded)
            row = run(f"t5-v1_1-base shape, {label}", strategy, device, out=work / f"base-{label}", **base)
            row["model_states_gib"] = round(states * params / GiB, 2)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            finite = all(loss == loss and loss < 1e4 for loss in row["losses"])
            detail = (
                f"{params / 1e6:.0f}M params; peak {row['peak_gib']} GiB, model states {row['model_states_gib']} GiB"
                if row["peak_gib"]
                else "cpu"
            )
            check(f"base shape {label} trains", finite and len(row["losses"]) == 2, f"losses {row['losses']}; {detail}")

    out = artifacts.write_json(Path(out) if out else work / "gpu_train_check.json", results)
    failed = [c["check"] for c in results["checks"] if not c["passed"]]
    summary = f"{len(results['checks']) - len(failed)}/{len(results['checks'])} checks passed"
    if failed:
        raise RuntimeError(f"{summary}; failed: {', '.join(failed)} (results: {out})")
    print(summary, flush=True)
    return out


if __name__ == "__main__":
    from stepwise.cli import run_command

    run_command(main, sys.argv[1:], prog="python3 -m benchmarks.gpu_train_check")
