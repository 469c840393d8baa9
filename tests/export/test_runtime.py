"""export/runtime.py against the real ONNX Runtime sessions of tiny exported students, checked against
the PyTorch models they came from and against the one-pass scorer the batched label path replaced."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.label_memory import CHOICE_TOKENS, UNBOUNDED, worst_request
from stepwise import tasks
from stepwise.export import parity
from stepwise.export.runtime import (
    Prediction,
    candidate_batch,
    candidates_for,
    closed_set_prediction,
    greedy_decode,
    length_groups,
    load_runtime,
    predict,
    score_candidates,
    sequence_log_likelihood,
)

PARITY_SET = 200  # the validation examples `stepwise export`'s parity gate compares by default
CLOSED_EXPORTS = ["tiny_export_dir", "tiny_merged_export_dir", "cqa_export_dir"]  # e-SNLI split and merged, CQA split


def batches(items: list, size: int = 16) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def softmax(scores: np.ndarray) -> np.ndarray:
    weights = np.exp(scores.astype(np.float64) - scores.max())
    return weights / weights.sum()


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


def test_length_groups_split_a_batch_by_length_only_where_padding_costs_more_than_a_call():
    lengths = np.array([40, 12, 41, 10, 39, 11])
    groups = length_groups(lengths, call_cost=16)
    assert sorted(np.concatenate(groups).tolist()) == list(range(6))
    assert [sorted(lengths[g].tolist()) for g in groups] == [[10, 11, 12], [39, 40, 41]]
    assert len(length_groups(lengths, call_cost=10**6)) == 1  # a call dearer than any padding: one group
    assert len(length_groups(lengths, call_cost=0)) == 6  # calls free: no padding at all
    assert [g.tolist() for g in length_groups(np.array([7]), 16)] == [[0]]


def test_runtime_reports_what_it_runs(tiny_export_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    config = json.loads((tiny_export_dir / "export_config.json").read_text())
    assert runtime.providers == ["CPUExecutionProvider"]
    assert runtime.version == config["version"] and runtime.model_id == config["model_id"]
    assert runtime.task == tasks.load_task(tiny_export_dir)


@pytest.mark.parametrize(
    ("provider", "problem"),
    [
        ({"name": "MyCustomExecutionProvider"}, "provider 'MyCustomExecutionProvider' is not one stepwise runs"),
        (
            {"name": "TensorrtExecutionProvider", "options": {"trt_extra_plugin_lib_paths": "/tmp/evil.so"}},
            "TensorrtExecutionProvider options ['trt_extra_plugin_lib_paths'] are not allowed",
        ),
        (
            {"name": "TensorrtExecutionProvider", "options": {"trt_engine_cache_path": "/tmp/stepwise-anywhere"}},
            "option trt_engine_cache_path must be a path inside the export folder, not '/tmp/stepwise-anywhere'",
        ),
        (
            {"name": "TensorrtExecutionProvider", "profiles": {"encoder": {"trt_timing_cache_path": "../../outside"}}},
            "option trt_timing_cache_path must be a path inside the export folder, not '../../outside'",
        ),
    ],
)
def test_an_export_folder_asks_only_for_allowed_providers_and_options(tiny_export_dir, tmp_path, provider, problem):
    """The folder is data someone handed over: what it names is checked before ONNX Runtime sees it, and nothing is
    created outside it."""
    crafted = tmp_path / "crafted"
    shutil.copytree(tiny_export_dir, crafted)
    config = json.loads((crafted / "export_config.json").read_text())
    config["providers"] = [provider, {"name": "CPUExecutionProvider"}]
    (crafted / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="export_config.json: .*" + re.escape(problem)):
        load_runtime(crafted, threads=1)
    assert not (tmp_path.parent / "outside").exists() and not Path("/tmp/stepwise-anywhere").exists()


def test_greedy_labels_match_pytorch_generate(tiny_export_dir, tiny_student_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:12]
    model, tokenizer = parity.load_torch_model(tiny_student_dir)
    expected = parity.torch_greedy_labels(
        model, tokenizer, [tasks.label_input(e) for e in examples], runtime.export_config["max_new_tokens"]["label"]
    )
    predictions = predict(runtime, examples, fast_path=False)
    assert [p.label for p in predictions] == expected
    assert any(expected), "a random untied model should generate some tokens"


def test_fast_path_scores_match_pytorch_and_pick_a_task_label(tiny_export_dir, tiny_student_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:12]
    texts = [tasks.label_input(e) for e in examples]
    scores = score_candidates(runtime, texts, [runtime.task.labels] * len(examples))
    model, tokenizer = parity.load_torch_model(tiny_student_dir)
    for text, onnx_scores in zip(texts, scores, strict=True):
        logits, targets, mask = parity.torch_teacher_forced_logits(model, tokenizer, [text] * 3, runtime.task.labels)
        np.testing.assert_allclose(onnx_scores, sequence_log_likelihood(logits, targets, mask), atol=1e-3)
    labels = [p.label for p in predict(runtime, examples)]
    assert labels == parity.torch_fast_path_labels(model, tokenizer, runtime.task, examples)
    assert set(labels) <= set(runtime.task.labels)


@pytest.mark.parametrize("export", CLOSED_EXPORTS)
def test_batched_label_path_ranks_as_the_one_pass_scorer_on_the_parity_set(export, request):
    """fp32: the same label for every parity example as the previous scorer (every candidate a full decoder
    row), and the same log-likelihoods up to float rounding."""
    runtime = load_runtime(request.getfixturevalue(export), threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:PARITY_SET]
    agree = 0
    for batch in batches(examples):
        texts, candidates = [tasks.label_input(e) for e in batch], [candidates_for(runtime.task, e) for e in batch]
        one_pass = parity.onnx_one_pass_scores(runtime, texts, candidates)
        predictions = predict(runtime, batch)
        for prediction, cs, reference in zip(predictions, candidates, one_pass, strict=True):
            agree += prediction.label == cs[int(np.argmax(reference))]
            np.testing.assert_allclose([prediction.scores[c] for c in cs], softmax(reference), atol=1e-4)
            assert prediction.log_prob == pytest.approx(float(reference.max()), abs=1e-3)
    assert agree / len(examples) == 1.0


@pytest.mark.parametrize("export, student", [("tiny_export_dir", "tiny_student_dir"), ("cqa_export_dir", None)])
def test_probabilities_and_margin_match_pytorch_teacher_forcing(export, student, request, choice_and_open_students):
    runtime = load_runtime(request.getfixturevalue(export), threads=1)
    model, tokenizer = parity.load_torch_model(
        request.getfixturevalue(student) if student else choice_and_open_students["cqa"]
    )
    examples = tasks.load_split(runtime.task, "valid")[:24]
    candidates, expected = parity.torch_candidate_scores(model, tokenizer, runtime.task, examples)
    for prediction, cs, scores in zip(predict(runtime, examples), candidates, expected, strict=True):
        probabilities = softmax(scores)
        assert list(prediction.scores) == cs and sum(prediction.scores.values()) == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose([prediction.scores[c] for c in cs], probabilities, atol=1e-4)
        assert (
            prediction.label == cs[int(np.argmax(scores))]
            and prediction.probability == prediction.scores[prediction.label]
        )
        assert prediction.margin == pytest.approx(np.sort(probabilities)[-1] - np.sort(probabilities)[-2], abs=1e-4)
        assert prediction.log_prob == pytest.approx(float(scores.max()), abs=1e-3)


def test_closed_set_prediction_normalises_over_the_candidates():
    prediction = closed_set_prediction(["yes", "no", "maybe"], np.log(np.array([0.2, 0.5, 0.3], dtype=np.float32)))
    assert prediction.label == "no" and prediction.probability == pytest.approx(0.5)
    assert prediction.margin == pytest.approx(0.2) and prediction.log_prob == pytest.approx(np.log(0.5))
    assert prediction.scores == pytest.approx({"yes": 0.2, "no": 0.5, "maybe": 0.3})
    # Normalised over the set: a shift of every log-likelihood changes nothing; a tie has no margin.
    assert closed_set_prediction(["a", "b"], np.array([-300.0, -301.0])).probability == pytest.approx(
        1 / (1 + np.exp(-1))
    )
    assert closed_set_prediction(["a", "b"], np.array([-2.0, -2.0])).margin == 0.0
    alone = closed_set_prediction(["only"], np.array([-7.0]))
    assert (alone.probability, alone.margin, alone.scores) == (1.0, 1.0, {"only": 1.0})


@pytest.mark.parametrize("export", ["tiny_export_dir", "cqa_export_dir"])
def test_batch_composition_does_not_change_fp32_predictions(export, request):
    runtime = load_runtime(request.getfixturevalue(export), threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:16]
    together = predict(runtime, examples)
    for example, batched in zip(examples, together, strict=True):
        alone = predict(runtime, [example])[0]
        assert alone.label == batched.label
        assert alone.log_prob == pytest.approx(batched.log_prob, abs=1e-4)
        np.testing.assert_allclose(list(alone.scores.values()), list(batched.scores.values()), atol=1e-5)


def test_candidates_sharing_a_first_token_of_any_length_or_eos_alone(tiny_export_dir, tiny_student_dir):
    """Multi-token candidates, two that share their first tokens, and the empty one (EOS alone), scored in
    one call or one call per candidate position (the two ways continuation_calls splits the rows)."""
    runtime = load_runtime(tiny_export_dir, threads=1)
    candidates = ["entailment", "entailment neutral", "neutral", "contradiction", ""]
    token_ids = [runtime.tokenizer(c).input_ids for c in candidates]
    assert token_ids[0][:-1] == token_ids[1][: len(token_ids[0]) - 1] and token_ids[-1] == [
        runtime.tokenizer.eos_token_id
    ]
    assert len(token_ids[1]) >= 3  # several tokens + EOS, the first of them shared with "entailment"
    examples = tasks.load_split(runtime.task, "valid")[:6]
    texts = [tasks.label_input(e) for e in examples]
    model, tokenizer = parity.load_torch_model(tiny_student_dir)
    expected = [
        sequence_log_likelihood(
            *parity.torch_teacher_forced_logits(model, tokenizer, [t] * len(candidates), candidates)
        )
        for t in texts
    ]
    for weight_bytes in (0, 1 << 40):  # per-position calls reading the keys/values in place; one call gathering them
        scored = score_candidates(
            dataclasses.replace(runtime, step_weight_bytes=weight_bytes), texts, [candidates] * len(texts)
        )
        np.testing.assert_allclose(np.stack(scored), np.stack(expected), atol=1e-3)


def test_choice_examples_with_different_numbers_and_lengths_of_choices(cqa_export_dir, choice_and_open_students):
    runtime = load_runtime(cqa_export_dir, threads=1)
    examples = [
        dataclasses.replace(e, choices=e.choices[: 1 + i % 5])
        for i, e in enumerate(tasks.load_split(runtime.task, "valid")[:10])
    ]
    examples.append(dataclasses.replace(examples[0], id="repeated", choices=["same", "other", "same"]))
    model, tokenizer = parity.load_torch_model(choice_and_open_students["cqa"])
    candidates, expected = parity.torch_candidate_scores(model, tokenizer, runtime.task, examples)
    assert candidates[-1] == ["same", "other"]  # a repeated choice is one answer
    assert len({len(runtime.tokenizer(c).input_ids) for cs in candidates for c in cs}) > 2
    texts = [tasks.label_input(e) for e in examples]
    for weight_bytes in (0, 1 << 40):
        scored = score_candidates(dataclasses.replace(runtime, step_weight_bytes=weight_bytes), texts, candidates)
        for got, want in zip(scored, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-3)
    predictions = predict(runtime, examples)
    assert [p.label for p in predictions] == [cs[int(np.argmax(s))] for cs, s in zip(candidates, expected, strict=True)]
    single = predictions[0]  # one choice: certain, nothing to compete with
    assert (single.label, single.probability, single.margin) == (examples[0].choices[0], 1.0, 1.0)


def test_the_largest_request_is_scored_with_its_logits_in_bounded_chunks(cqa_export_dir):
    """16 inputs x 16 choices x 32 tokens (serving's limits): scored in one decoder call, the continuation's logits
    alone are 256 rows x 31 x vocab floats (31 MB here, 1 GB with T5's vocabulary), one call per candidate position
    2 MB each; in chunks of at most 256 KiB the scoring call's peak of traced memory stays within 768 KiB, for both
    ways the rows split into calls, with the same scores."""
    runtime = load_runtime(cqa_export_dir, threads=1)
    examples = worst_request(runtime, input_tokens=16)
    texts = [tasks.label_input(e) for e in examples]
    candidates = [candidates_for(runtime.task, e) for e in examples]
    assert [len(cs) for cs in candidates] == [16] * 16
    assert max(len(ids) for cs in candidates for ids in runtime.tokenizer(cs).input_ids) == CHOICE_TOKENS
    bound = 1 << 18
    whole_logits = 16 * 16 * (CHOICE_TOKENS - 1) * runtime.export_config["model"]["vocab_size"] * 4

    def scored_with_peak(**changes) -> tuple[np.ndarray, int]:
        tracemalloc.start()  # numpy's arrays, the ONNX sessions' outputs among them, are traced
        try:
            scores = score_candidates(dataclasses.replace(runtime, **changes), texts, candidates)
            return np.stack(scores), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    for weight_bytes in (0, 1 << 40):  # one call per candidate position; one call for every row
        chunked, peak = scored_with_peak(step_weight_bytes=weight_bytes, logits_chunk_bytes=bound)
        whole, whole_peak = scored_with_peak(step_weight_bytes=weight_bytes, logits_chunk_bytes=UNBOUNDED)
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-4)
        assert peak < 3 * bound < whole_peak, f"{peak >> 10} KiB traced with logits chunks of {bound >> 10} KiB"
        if weight_bytes:
            assert whole_peak > whole_logits


def test_greedy_log_prob_is_the_generated_sequence_log_likelihood(tiny_export_dir, tiny_student_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:6]
    texts = [tasks.label_input(e) for e in examples]
    ids, log_probs = greedy_decode(runtime, texts, runtime.export_config["max_new_tokens"]["label"], score=True)
    model, tokenizer = parity.load_torch_model(tiny_student_dir)
    start = model.config.decoder_start_token_id
    for text, generated, log_prob in zip(texts, ids, log_probs, strict=True):
        with torch.inference_mode():
            logits = model(
                **tokenizer([text], return_tensors="pt"), decoder_input_ids=torch.tensor([[start] + generated[:-1]])
            ).logits
        expected = torch.log_softmax(logits[0], -1)[torch.arange(len(generated)), torch.tensor(generated)].sum()
        assert log_prob == pytest.approx(float(expected), abs=1e-3)
    predictions = predict(runtime, examples, fast_path=False)
    assert [p.log_prob for p in predictions] == pytest.approx(list(log_probs))
    assert all(p.probability is None and p.margin is None and p.scores is None for p in predictions)


def test_explain_adds_rationales_and_keeps_labels(tiny_export_dir):
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:3]
    plain = predict(runtime, examples)
    explained = predict(runtime, examples, explain=True)
    assert all(isinstance(p, Prediction) and p.rationale is None for p in plain)
    assert [(p.label, p.probability, p.scores) for p in explained] == [
        (p.label, p.probability, p.scores) for p in plain
    ]
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
