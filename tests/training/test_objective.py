"""The step-by-step objective: both tasks in one batch and one forward pass, per-task mean token losses over the
whole optimizer step, and batches fixed by (seed, step) however a step is split into workers and micro-batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from stepwise import tasks
from stepwise.training.data import StudentExample
from stepwise.training.objective import (
    IGNORE,
    collate,
    lr_factor,
    objective,
    step_examples,
    target_tokens,
    token_loss_sums,
    tokenize_examples,
    worker_micro_batches,
)


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    model = T5ForConditionalGeneration.from_pretrained(tiny_student_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_student_dir)


@pytest.fixture(scope="module")
def columns(student):
    train = tasks.load_split(tasks.get_task("esnli"), "train")[:8]
    examples = [StudentExample(e.input, e.label, e.rationale or "no reason") for e in train]
    return tokenize_examples(student[1], examples, max_input_tokens=128, max_target_tokens=64)


def test_batch_stacks_predict_rows_then_explain_rows(student, columns):
    _, tokenizer = student
    batch = collate(columns, [2, 5, 7], with_rationale=True, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert batch["is_label_row"].tolist() == [True] * 3 + [False] * 3
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("predict:") for t in decoded[:3]) and all(t.startswith("explain:") for t in decoded[3:])
    assert tokenizer.decode(
        [t for t in batch["targets"][0].tolist() if t != IGNORE], skip_special_tokens=True
    ) == tokenizer.decode(columns["label"][2], skip_special_tokens=True)
    assert batch["attention_mask"].sum(1).tolist() == [len(columns["predict"][i]) for i in (2, 5, 7)] + [
        len(columns["explain"][i]) for i in (2, 5, 7)
    ]
    # The decoder reads the targets shifted right behind the start token, padding as the pad id.
    assert batch["decoder_input_ids"][:, 0].tolist() == [tokenizer.pad_token_id] * 6
    assert batch["decoder_input_ids"][0, 1 : len(columns["label"][2])].tolist() == columns["label"][2][:-1]
    assert (batch["decoder_input_ids"] != IGNORE).all()
    label_only = collate(columns, [2, 5, 7], with_rationale=False, pad_id=tokenizer.pad_token_id)
    assert label_only["input_ids"].shape[0] == 3 and label_only["is_label_row"].all()


def test_decoder_inputs_match_the_models_own_shift(student, columns):
    model, tokenizer = student
    batch = collate(
        columns,
        [0, 1, 3],
        with_rationale=True,
        pad_id=tokenizer.pad_token_id,
        decoder_start_id=model.config.decoder_start_token_id,
    )
    assert torch.equal(batch["decoder_input_ids"], model.prepare_decoder_input_ids_from_labels(labels=batch["targets"]))


def test_alpha_weights_two_task_losses_from_one_forward_pass(student, columns):
    model, tokenizer = student
    indices = [0, 1, 3, 4]
    both = collate(columns, indices, with_rationale=True, pad_id=tokenizer.pad_token_id)
    counts = target_tokens(columns, indices, with_rationale=True)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        label_sum, rationale_sum = token_loss_sums(model, both)
        plain_label_sum, nothing = token_loss_sums(
            model, collate(columns, indices, with_rationale=False, pad_id=tokenizer.pad_token_id)
        )
    hook.remove()
    assert len(calls) == 2  # one forward pass per batch, both tasks included
    assert nothing.item() == 0 and counts.label == sum(len(columns["label"][i]) for i in indices)
    # The label rows give the same loss with or without the explain rows beside them (rows are independent;
    # padding carries no loss).
    torch.testing.assert_close(label_sum, plain_label_sum, rtol=1e-5, atol=1e-4)
    label_loss, rationale_loss = label_sum / counts.label, rationale_sum / counts.rationale
    torch.testing.assert_close(objective(label_sum, rationale_sum, counts, alpha=1.0), label_loss)
    torch.testing.assert_close(objective(label_sum, rationale_sum, counts, alpha=0.0), rationale_loss)
    torch.testing.assert_close(
        objective(label_sum, rationale_sum, counts, alpha=0.5), 0.5 * label_loss + 0.5 * rationale_loss
    )
    assert abs(rationale_loss.item() - label_loss.item()) > 1e-3  # two different tasks
    torch.testing.assert_close(
        objective(plain_label_sum, nothing, counts._replace(rationale=0), alpha=0.5), plain_label_sum / counts.label
    )


def _gradient(model, batches_with_scale, columns, counts, pad_id) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    for indices, scale in batches_with_scale:
        label_sum, rationale_sum = token_loss_sums(model, collate(columns, indices, True, pad_id))
        (objective(label_sum, rationale_sum, counts, alpha=0.5) * scale).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_any_split_of_a_step_computes_the_gradient_of_the_whole_step(student, columns):
    """2 workers x 2 micro-batches, scaled and averaged as DDP does, give one process's gradient: the losses of
    the parts are normalised by the whole step's token counts."""
    model, tokenizer = student
    step = [0, 1, 2, 3, 4, 5, 6, 7]
    counts = target_tokens(columns, step, with_rationale=True)
    whole = _gradient(model, [(step, 1.0)], columns, counts, tokenizer.pad_token_id)
    workers = 2
    # Each worker scales its loss by the world size and DDP averages the gradients over the workers.
    parts = [
        (micro, workers * (1 / workers))
        for rank in range(workers)
        for micro in worker_micro_batches(step, rank, workers, grad_accum=2)
    ]
    assert sorted(i for micro, _ in parts for i in micro) == step
    split = _gradient(model, parts, columns, counts, tokenizer.pad_token_id)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)
    # Averaging per-part means instead (what a plain per-micro-batch loss does) would not: the parts hold
    # different token counts.
    per_part = []
    for micro, _ in parts:
        own = target_tokens(columns, micro, with_rationale=True)
        per_part.append(_gradient(model, [(micro, 1 / len(parts))], columns, own, tokenizer.pad_token_id))
    assert not torch.allclose(torch.stack(per_part).sum(0), whole, rtol=1e-3, atol=1e-5)


def test_the_batches_of_a_step_are_fixed_by_seed_and_step():
    count, batch = 10, 4
    assert (
        step_examples(count, batch, seed=0, step=3)
        == step_examples(count, batch, seed=0, step=3)
        != step_examples(count, batch, seed=1, step=3)
    )
    stream = [
        i for step in range(5) for i in step_examples(count, batch, seed=0, step=step)
    ]  # 20 entries: two whole epochs
    assert (
        sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10)) and stream[:10] != stream[10:]
    )
    assert all(
        len(step_examples(count, batch, 0, step)) == batch for step in range(7)
    )  # steps run across epoch ends, never short
    big = step_examples(3, 8, seed=0, step=0)  # a batch larger than the data holds every example at least twice
    assert len(big) == 8 and set(big) == {0, 1, 2}


def test_each_worker_takes_a_fixed_slice_of_a_step():
    step = list(range(100, 116))
    slices = {rank: worker_micro_batches(step, rank, workers=4, grad_accum=2) for rank in range(4)}
    assert [i for rank in range(4) for micro in slices[rank] for i in micro] == step
    assert all(len(micro) == 2 for micro_batches in slices.values() for micro in micro_batches)
    assert worker_micro_batches(step, 0, workers=1, grad_accum=1) == [step]


def test_learning_rate_schedule():
    assert lr_factor("linear", 0, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor("linear", 50, 10, 0.5) == pytest.approx(0.5)
    assert lr_factor("constant", 50, 10, 0.9) == 1.0
    assert lr_factor("linear", 50, 0, 1.0) == 0.0
