"""The PyTorch reference for the parity gate (and the benchmark's eager baseline): the same label
decoding as export/runtime.py, run by the trained Hugging Face model, and the comparison of the two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from stepwise import artifacts, progress, tasks
from stepwise.export import runtime as ort_runtime


def load_torch_model(model_dir: Path) -> tuple[T5ForConditionalGeneration, Any]:
    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.inference_mode()
def torch_greedy_labels(
    model: T5ForConditionalGeneration,
    tokenizer: Any,
    texts: list[str],
    max_new_tokens: int,
    max_input_tokens: int = artifacts.T5_MAX_INPUT_TOKENS,
) -> list[str]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_input_tokens, return_tensors="pt")
    ids = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.inference_mode()
def torch_teacher_forced_logits(
    model: T5ForConditionalGeneration,
    tokenizer: Any,
    texts: list[str],
    targets: list[str],
    max_input_tokens: int = artifacts.T5_MAX_INPUT_TOKENS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits for each (text, target) pair, with the targets and mask from the shared candidate batching."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_input_tokens, return_tensors="pt")
    decoder_ids, target_ids, mask = ort_runtime.candidate_batch(
        tokenizer, targets, model.config.decoder_start_token_id, model.config.pad_token_id
    )
    logits = model(**batch, decoder_input_ids=torch.from_numpy(decoder_ids)).logits
    return logits.numpy(), target_ids, mask


@torch.inference_mode()
def torch_candidate_scores(
    model: T5ForConditionalGeneration,
    tokenizer: Any,
    task: tasks.Task,
    examples: list[tasks.Example],
    max_input_tokens: int = artifacts.T5_MAX_INPUT_TOKENS,
) -> tuple[list[list[str]], list[np.ndarray]]:
    """Closed label set: each example's candidates and their log-likelihoods (EOS included), every candidate
    a row of one teacher-forced decoder pass: the reference the runtime's batched scorer must match."""
    candidates = [ort_runtime.candidates_for(task, e) for e in examples]
    counts = [len(c) for c in candidates]
    batch = tokenizer(
        [tasks.label_input(e) for e in examples],
        padding=True,
        truncation=True,
        max_length=max_input_tokens,
        return_tensors="pt",
    ).to(model.device)  # the benchmarks time PyTorch on a GPU too
    hidden = model.get_encoder()(**batch).last_hidden_state
    rows = torch.from_numpy(np.repeat(np.arange(len(examples)), counts)).to(model.device)
    decoder_ids, targets, mask = ort_runtime.candidate_batch(
        tokenizer, [c for cs in candidates for c in cs], model.config.decoder_start_token_id, model.config.pad_token_id
    )
    logits = model(
        encoder_outputs=(hidden[rows],),
        attention_mask=batch["attention_mask"][rows],
        decoder_input_ids=torch.from_numpy(decoder_ids).to(model.device),
    ).logits
    return candidates, np.split(
        ort_runtime.sequence_log_likelihood(logits.float().cpu().numpy(), targets, mask), np.cumsum(counts)[:-1]
    )


def torch_fast_path_predictions(
    model: T5ForConditionalGeneration,
    tokenizer: Any,
    task: tasks.Task,
    examples: list[tasks.Example],
    max_input_tokens: int = artifacts.T5_MAX_INPUT_TOKENS,
) -> list[ort_runtime.Prediction]:
    """Closed label set: the runtime's predictions (label, probabilities, margin) from PyTorch's scores."""
    candidates, scores = torch_candidate_scores(model, tokenizer, task, examples, max_input_tokens)
    return [ort_runtime.closed_set_prediction(cs, s) for cs, s in zip(candidates, scores, strict=True)]


def torch_fast_path_labels(
    model: T5ForConditionalGeneration,
    tokenizer: Any,
    task: tasks.Task,
    examples: list[tasks.Example],
    max_input_tokens: int = artifacts.T5_MAX_INPUT_TOKENS,
) -> list[str]:
    return [p.label for p in torch_fast_path_predictions(model, tokenizer, task, examples, max_input_tokens)]


def onnx_one_pass_scores(
    runtime: ort_runtime.Runtime, texts: list[str], candidates: list[list[str]]
) -> list[np.ndarray]:
    """The runtime's scorer before the batched label path: every candidate a row of one teacher-forced
    decoder pass, its example's encoder states copied to it and projected to cross-attention keys/values
    again per row. Kept as the exact reference for the tests and the benchmark's before/after."""
    model = runtime.export_config["model"]
    hidden, mask = ort_runtime.encode(runtime, texts)
    counts = [len(c) for c in candidates]
    rows = np.repeat(np.arange(len(texts)), counts)
    decoder_ids, targets, target_mask = ort_runtime.candidate_batch(
        runtime.tokenizer, [c for cs in candidates for c in cs], model["decoder_start_token_id"], model["pad_token_id"]
    )
    logits, _ = ort_runtime.decoder_logits(runtime, ort_runtime.to_numpy(hidden)[rows], mask[rows], decoder_ids)
    return np.split(ort_runtime.sequence_log_likelihood(logits, targets, target_mask), np.cumsum(counts)[:-1])


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def compare(
    runtime: ort_runtime.Runtime,
    model_dir: Path,
    examples: list[tasks.Example],
    batch_size: int = 16,
    logit_batches: int = 4,
) -> dict[str, Any]:
    """ONNX vs PyTorch on `examples`: greedy labels, fast-path labels (closed label sets) and the largest
    difference of their candidate probabilities, accuracy on the path serving uses, and the max absolute
    teacher-forced logit difference on the gold labels."""
    model, tokenizer = load_torch_model(model_dir)
    task = runtime.task
    max_new = runtime.export_config["max_new_tokens"]["label"]
    max_input = runtime.export_config["max_input_tokens"]
    closed = task.closed_label_set
    out: dict[str, list[str]] = {"torch_greedy": [], "onnx_greedy": [], "torch_fast": [], "onnx_fast": []}
    max_diff = max_probability_diff = 0.0
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    for index, batch in enumerate(progress.bar(batches, desc="parity", unit="batch")):
        texts = [tasks.label_input(e) for e in batch]
        out["torch_greedy"] += torch_greedy_labels(model, tokenizer, texts, max_new, max_input)
        out["onnx_greedy"] += [p.label for p in ort_runtime.predict(runtime, batch, fast_path=False)]
        if closed:
            torch_fast = torch_fast_path_predictions(model, tokenizer, task, batch, max_input)
            onnx_fast = ort_runtime.predict(runtime, batch, fast_path=True)
            out["torch_fast"] += [p.label for p in torch_fast]
            out["onnx_fast"] += [p.label for p in onnx_fast]
            for expected, got in zip(torch_fast, onnx_fast, strict=True):
                max_probability_diff = max(
                    max_probability_diff, max(abs(p - got.scores[c]) for c, p in expected.scores.items())
                )
        if index < logit_batches:
            torch_logits, targets, mask = torch_teacher_forced_logits(
                model, tokenizer, texts, [e.label for e in batch], max_input
            )
            hidden, attention = ort_runtime.encode(runtime, texts)
            decoder_ids = np.concatenate(
                [np.full((len(batch), 1), model.config.decoder_start_token_id), targets[:, :-1]], axis=1
            )
            onnx_logits, _ = ort_runtime.decoder_logits(runtime, hidden, attention, decoder_ids)
            difference = np.abs(onnx_logits.astype(np.float32) - torch_logits)[mask.astype(bool)]
            max_diff = max(max_diff, float(difference.max()))
    served = "fast" if closed else "greedy"
    golds = [e.label for e in examples]
    report: dict[str, Any] = {
        "examples": len(examples),
        "batch_size": batch_size,
        "served_path": "fast_path" if closed else "greedy",
        "greedy_agreement": agreement(out["torch_greedy"], out["onnx_greedy"]),
        "fast_path_agreement": agreement(out["torch_fast"], out["onnx_fast"]) if closed else None,
        "max_abs_probability_diff": max_probability_diff if closed else None,
        "accuracy_pytorch": tasks.accuracy(task, out[f"torch_{served}"], golds),
        "accuracy_onnx": tasks.accuracy(task, out[f"onnx_{served}"], golds),
        "max_abs_logit_diff": max_diff,
        "logit_batches": min(logit_batches, len(batches)),
    }
    report["accuracy_delta"] = report["accuracy_onnx"] - report["accuracy_pytorch"]
    return report


def gate(
    report: dict[str, Any], precision: str, min_agreement: float, max_accuracy_drop: float, max_logit_diff: float
) -> list[str]:
    """Reasons the export fails parity (empty: it passes). Every precision must keep the labels of the
    decoding path serving uses and the accuracy; fp32 must also match greedy generation and the logits
    (int8/fp16 greedy agreement is reported: whole generated strings flip on small logit changes)."""
    served = "fast_path_agreement" if report["served_path"] == "fast_path" else "greedy_agreement"
    checked = [served] + (["greedy_agreement"] if precision == "fp32" and served != "greedy_agreement" else [])
    failures = [f"{key} {report[key]:.3f} < {min_agreement}" for key in checked if report[key] < min_agreement]
    if -report["accuracy_delta"] > max_accuracy_drop + 1e-9:  # 0.39 - 0.37 is 0.020000000000000018 in floats
        failures.append(f"accuracy dropped by {-report['accuracy_delta']:.3f} > {max_accuracy_drop}")
    if precision == "fp32" and report["max_abs_logit_diff"] > max_logit_diff:
        failures.append(f"max abs logit difference {report['max_abs_logit_diff']:.2e} > {max_logit_diff}")
    return failures
