"""What the student learns from, step by step: token ids, the batches of every optimizer step, and the loss.

step-by-step: every example trains two targets from one input, `predict: x` -> label and `explain: x` ->
rationale, in ONE forward pass (the predict and explain rows of a batch are stacked), with
loss = alpha * L_label + (1 - alpha) * L_rationale, each the mean token loss over the optimizer step's own rows.
standard-finetune and standard-distill have label rows only.

The batches are a function of (seed, step) alone, and the loss of a step is normalised by the token counts of
the whole step: any split of a step into workers and accumulated micro-batches computes the same gradient, so a
resumed run, or one on more workers, learns what a single uninterrupted process learns.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from stepwise import tasks
from stepwise.training.data import StudentExample

IGNORE = -100  # target positions that carry no loss (padding)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[StudentExample], max_input_tokens: int, max_target_tokens: int
) -> dict[str, list[list[int]]]:
    """Token ids per example, computed once: predict/explain inputs, label and rationale targets."""
    as_example = [tasks.Example("", e.input, e.label) for e in examples]
    columns = {
        "predict": encode(tokenizer, [tasks.label_input(e) for e in as_example], max_input_tokens),
        "label": encode(tokenizer, [e.label for e in examples], max_target_tokens),
    }
    if all(e.rationale is not None for e in examples):
        columns["explain"] = encode(tokenizer, [tasks.rationale_input(e) for e in as_example], max_input_tokens)
        columns["rationale"] = encode(tokenizer, [e.rationale for e in examples], max_target_tokens)
    return columns


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate(
    columns: dict[str, list[list[int]]],
    indices: list[int],
    with_rationale: bool,
    pad_id: int,
    decoder_start_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """One batch holding both tasks: the examples' predict rows, then (step-by-step) their explain rows.
    The decoder reads the targets shifted right behind its start token (T5's: the pad id)."""
    inputs = [columns["predict"][i] for i in indices]
    targets = [columns["label"][i] for i in indices]
    if with_rationale:
        inputs += [columns["explain"][i] for i in indices]
        targets += [columns["rationale"][i] for i in indices]
    input_ids, target_ids = _pad(inputs, pad_id), _pad(targets, IGNORE)
    decoder_input_ids = torch.cat(
        [
            torch.full_like(target_ids[:, :1], pad_id if decoder_start_id is None else decoder_start_id),
            target_ids[:, :-1],
        ],
        1,
    )
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long(),
        "decoder_input_ids": decoder_input_ids.masked_fill(decoder_input_ids == IGNORE, pad_id),
        "targets": target_ids,
        "is_label_row": torch.arange(len(inputs)) < len(indices),
    }


class TokenCounts(NamedTuple):
    """Target tokens of one optimizer step's label rows and explain rows (the loss's denominators)."""

    label: int
    rationale: int


def target_tokens(columns: dict[str, list[list[int]]], indices: list[int], with_rationale: bool) -> TokenCounts:
    return TokenCounts(
        sum(len(columns["label"][i]) for i in indices),
        sum(len(columns["rationale"][i]) for i in indices) if with_rationale else 0,
    )


def token_loss_sums(forward: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of the batch's label rows and of its explain rows, from one forward pass."""
    logits = forward(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    ).logits
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), batch["targets"], ignore_index=IGNORE, reduction="none"
    )  # 0 at padding
    label_rows = batch["is_label_row"][:, None]
    return (token_loss * label_rows).sum(), (token_loss * ~label_rows).sum()


def objective(label_sum: torch.Tensor, rationale_sum: torch.Tensor, counts: TokenCounts, alpha: float) -> torch.Tensor:
    """alpha * mean label token loss + (1 - alpha) * mean rationale token loss (the plain label loss when the
    step has no explain rows). Sums of a part of the step give that part's share of the step's loss."""
    label_loss = label_sum / max(counts.label, 1)
    if not counts.rationale:
        return label_loss
    return alpha * label_loss + (1 - alpha) * rationale_sum / counts.rationale


@functools.lru_cache(maxsize=4)
def epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The examples of one epoch in a shuffled order fixed by (seed, epoch)."""
    order = list(range(count))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return tuple(order)


def step_examples(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step `step`: entries step*B ... (step+1)*B - 1 of the endless stream of
    epoch orders (B = batch_size). Fixed by (seed, step) alone, so a resumed run, or a run on any number of
    workers, learns from exactly the batches an uninterrupted single process would."""
    indices: list[int] = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, count)
        taken = epoch_order(count, seed, epoch)[offset : offset + batch_size - len(indices)]
        indices += taken
        position += len(taken)
    return indices


def worker_micro_batches(indices: list[int], rank: int, workers: int, grad_accum: int) -> list[list[int]]:
    """Worker `rank`'s share of one step's examples (a contiguous slice), cut into `grad_accum` micro-batches."""
    share = len(indices) // workers
    mine = indices[rank * share : (rank + 1) * share]
    size = share // grad_accum
    return [mine[i * size : (i + 1) * size] for i in range(grad_accum)]


def lr_factor(schedule: str, step: int, warmup_steps: int, progress: float) -> float:
    """Warmup then constant or linear decay to zero; `progress` is the spent share of the step or time budget."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * (max(0.0, 1.0 - progress) if schedule == "linear" else 1.0)
