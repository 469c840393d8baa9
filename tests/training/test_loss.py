"""The step-by-step objective: both tasks in one batch and one forward pass, per-task mean token losses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from stepwise import tasks
from stepwise.training.data import StudentExample
from stepwise.training.train import IGNORE, batch_loss, collate, epoch_batches, lr_factor, tokenize_examples


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    model = T5ForConditionalGeneration.from_pretrained(tiny_student_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_student_dir)


@pytest.fixture(scope="module")
def columns(student):
    train = tasks.load_split(tasks.get_task("esnli"), "train")[:8]
    examples = [StudentExample(e.input, e.label, e.rationale or "no reason") for e in train]
    return tokenize_examples(student[1], examples, max_input_length=128, max_target_length=64)


def test_batch_stacks_predict_rows_then_explain_rows(student, columns):
    _, tokenizer = student
    batch = collate(columns, [2, 5, 7], with_rationale=True, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert batch["is_label_row"].tolist() == [True] * 3 + [False] * 3
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("predict:") for t in decoded[:3]) and all(t.startswith("explain:") for t in decoded[3:])
    assert tokenizer.decode([t for t in batch["targets"][0].tolist() if t != IGNORE], skip_special_tokens=True) == tokenizer.decode(columns["label"][2], skip_special_tokens=True)
    assert batch["attention_mask"].sum(1).tolist() == [len(columns["predict"][i]) for i in (2, 5, 7)] + [len(columns["explain"][i]) for i in (2, 5, 7)]
    label_only = collate(columns, [2, 5, 7], with_rationale=False, pad_id=tokenizer.pad_token_id)
    assert label_only["input_ids"].shape[0] == 3 and label_only["is_label_row"].all()


def test_alpha_weights_two_task_losses_from_one_forward_pass(student, columns):
    model, tokenizer = student
    indices = [0, 1, 3, 4]
    both = collate(columns, indices, with_rationale=True, pad_id=tokenizer.pad_token_id)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        loss_alpha_1, label_loss, rationale_loss = batch_loss(model, both, alpha=1.0)
        loss_alpha_0, _, _ = batch_loss(model, both, alpha=0.0)
        loss_half, _, _ = batch_loss(model, both, alpha=0.5)
        plain_label, plain_label_again, none = batch_loss(model, collate(columns, indices, with_rationale=False, pad_id=tokenizer.pad_token_id), alpha=0.5)
    hook.remove()
    assert len(calls) == 4  # one forward pass per batch, both tasks included
    assert none is None and plain_label == plain_label_again
    # alpha = 1 is exactly the label loss a label-only batch gives (rows are independent; padding carries no loss)
    torch.testing.assert_close(loss_alpha_1, plain_label, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(label_loss, plain_label, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_alpha_0, rationale_loss)
    torch.testing.assert_close(loss_half, 0.5 * label_loss + 0.5 * rationale_loss)
    assert rationale_loss.item() > 0 and abs(rationale_loss.item() - label_loss.item()) > 1e-3  # two different tasks


def test_batch_order_and_schedule_are_reproducible():
    assert epoch_batches(10, 4, 0, 1) == epoch_batches(10, 4, 0, 1) != epoch_batches(10, 4, 0, 2)
    assert sorted(i for batch in epoch_batches(10, 4, 0, 1) for i in batch) == list(range(10))
    assert lr_factor("linear", 0, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor("linear", 50, 10, 0.5) == pytest.approx(0.5)
    assert lr_factor("constant", 50, 10, 0.9) == 1.0
