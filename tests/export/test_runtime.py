"""export/runtime.py against the real ONNX Runtime sessions of a tiny exported student, checked against
the PyTorch model it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from stepwise.export import parity
from stepwise.export.runtime import Prediction, candidate_batch, load_runtime, predict, score_candidates, sequence_log_likelihood
from stepwise import tasks


def test_candidate_batch_shifts_targets_right_and_masks_padding(tiny_student_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_student_dir)
    decoder_ids, targets, mask = candidate_batch(tokenizer, ["entailment", "neutral"], start_id=0, pad_id=0)
    for row, label in enumerate(["entailment", "neutral"]):
        ids = tokenizer(label).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        assert targets[row, : len(ids)].tolist() == ids
        assert mask[row].sum() == len(ids)
        assert decoder_ids[row, 0] == 0 and decoder_ids[row, 1 : len(ids)].tolist() == ids[:-1]


def test_sequence_log_likelihood_sums_masked_log_probs():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]], dtype=np.float32))
    score = sequence_log_likelihood(logits, np.array([[0, 1]]), np.array([[1.0, 0.0]], dtype=np.float32))
    assert score[0] == pytest.approx(np.log(0.5), abs=1e-6)


def test_runtime_reports_what_it_runs(tiny_export_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    config = json.loads((tiny_export_dir / "export_config.json").read_text())
    assert runtime.providers == ["CPUExecutionProvider"]
    assert runtime.version == config["version"] and runtime.model_id == config["model_id"]
    assert runtime.task == tasks.load_task(tiny_export_dir)


def test_greedy_labels_match_pytorch_generate(tiny_export_dir, tiny_student_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:12]
    model, tokenizer = parity.load_torch_model(tiny_student_dir)
    expected = parity.torch_greedy_labels(model, tokenizer, [tasks.label_input(e) for e in examples], runtime.export_config["max_new_tokens"]["label"])
    predictions = predict(runtime, examples, fast_path=False)
    assert [p.label for p in predictions] == expected
    assert any(expected), "a random untied model should generate some tokens"


def test_fast_path_scores_match_pytorch_and_pick_a_task_label(tiny_export_dir, tiny_student_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:12]
    texts = [tasks.label_input(e) for e in examples]
    scores = score_candidates(runtime, texts, [runtime.task.labels] * len(examples))
    model, tokenizer = parity.load_torch_model(tiny_student_dir)
    for example, text, onnx_scores in zip(examples, texts, scores):
        logits, targets, mask = parity.torch_teacher_forced_logits(model, tokenizer, [text] * 3, runtime.task.labels)
        np.testing.assert_allclose(onnx_scores, sequence_log_likelihood(logits, targets, mask), atol=1e-3)
    labels = [p.label for p in predict(runtime, examples)]
    assert labels == parity.torch_fast_path_labels(model, tokenizer, runtime.task, examples)
    assert set(labels) <= set(runtime.task.labels)


def test_explain_adds_rationales_and_keeps_labels(tiny_export_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:3]
    plain = predict(runtime, examples)
    explained = predict(runtime, examples, explain=True)
    assert all(isinstance(p, Prediction) and p.rationale is None for p in plain)
    assert [p.label for p in explained] == [p.label for p in plain]
    assert all(isinstance(p.rationale, str) and p.rationale for p in explained)
    assert predict(runtime, []) == []


def test_io_binding_path_gives_the_same_predictions(tiny_export_dir):
    """The CUDA path keeps the cache on the device through IO binding; the same code runs bound to the CPU."""
    examples = tasks.load_split(tasks.load_task(tiny_export_dir), "valid")[:6]
    plain = load_runtime(tiny_export_dir, threads=1, io_binding=False)
    bound = load_runtime(tiny_export_dir, threads=1, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    for fast_path in (True, False):
        assert predict(bound, examples, fast_path=fast_path) == predict(plain, examples, fast_path=fast_path)


def test_load_runtime_rejects_a_folder_without_export_config(tiny_student_dir):
    with pytest.raises(FileNotFoundError, match="export_config.json"):
        load_runtime(tiny_student_dir)
