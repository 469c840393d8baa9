"""The largest request serving accepts by default, in one place for both sides: serving refuses more
(`stepwise.serving.settings`) and a TensorRT export's shape profiles cover it (`stepwise.export.run`), so no request
serving lets in needs an engine outside its profiles. Serving refuses at start a TensorRT export whose recorded
profiles are narrower than the limits it runs with. Standard library only."""

from __future__ import annotations

from stepwise import tasks

DEFAULT_MAX_BATCH = 16  # inputs one replica decodes together (serving's --max-batch-size, export's --max-batch)
DEFAULT_MAX_CHOICES = 16  # answer choices of one input (--max-choices of both)
DEFAULT_MAX_CHOICE_TOKENS = 32  # tokens of one answer choice, EOS included (--max-choice-tokens of both)


def candidates_per_input(task: tasks.Task, max_choices: int) -> int:
    """Decoder rows one input takes when its label is scored: the task's labels, a multiple-choice input's choices
    (at most `max_choices`), or one for free text (generated, not scored)."""
    if task.answer_style == "choice":
        return max_choices
    return len(task.labels) if task.closed_label_set else 1
