"""The served fallback: the student answers what it is sure of; a prediction whose margin is below the threshold
(or, with `--fallback-signal consistency|both`, whose rationale reaches another label than its own) goes to a
teacher (an OpenAI-compatible server, e.g. vLLM's) with the task's few-shot chain-of-thought prompt, through the
extraction stage's completion client (timeouts, retries). The teacher's answer is parsed by the task layer; when the
teacher fails, times out or answers something unreadable, the student's answer stands, marked with the reason. A
teacher never turns a request into an error."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from stepwise import tasks
from stepwise.export.runtime import Prediction
from stepwise.extraction.teachers import Generation, SamplingOptions, answer_regex, openai_completion
from stepwise.serving.settings import FallbackOptions

logger = logging.getLogger("ray.serve")


@dataclass
class Teacher:
    """One served task's teacher: its few-shot prefix, the completion call and a bound on requests in flight."""

    task: tasks.Task
    shots: list[str]
    complete: Callable[..., Awaitable[Generation]]
    client: Any  # httpx.AsyncClient
    gate: asyncio.Semaphore
    settings: FallbackOptions
    down_until: float = 0.0  # time.monotonic() until which the teacher is skipped, after it failed
    down_kind: str = ""  # how it failed, in words that carry nothing of the request that saw it


@dataclass(frozen=True)
class Outcome:
    prediction: Prediction
    source: str  # "student" or "teacher"
    error: str | None  # why the teacher's answer was not used
    seconds: float  # spent on the teacher (0 when not asked)
    signal: str | None = None  # what sent it to the teacher (the --fallback-signal); None when not sent


def few_shots(task: tasks.Task) -> list[str]:
    """The teacher's few-shot prefix for `task`, from its train split as in extraction (so the task's data must be
    readable where the replicas run)."""
    try:
        return tasks.exemplars(task, tasks.load_split(task, "train"))
    except (OSError, ValueError) as problem:
        raise ValueError(
            f"the teacher fallback builds its few-shot prompt from the train split of task {task.name!r}, "
            f"which cannot be read here: {problem}"
        ) from None


def prepare(settings: FallbackOptions, task: tasks.Task) -> Teacher:
    """A teacher for `task`. Nothing connects yet: the client and the gate bind to the event loop that first uses
    them."""
    import httpx

    client_options = settings.client()
    sampling = SamplingOptions(max_tokens=settings.fallback_max_tokens)
    slots = settings.fallback_concurrency
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.fallback_timeout_s),
        limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
    )
    complete = openai_completion(task, settings.fallback_model, sampling, client_options)
    return Teacher(task, few_shots(task), complete, client, asyncio.Semaphore(slots), settings)


def unsure(settings: FallbackOptions, prediction: Prediction, threshold: float) -> bool:
    """The student's answer goes to the teacher (signal margin), or has its rationale checked first (consistency:
    every prediction; both: those below the margin): a closed label set's margin below the model's threshold (open
    labels have no margin and are never sent)."""
    if not settings.fallback or prediction.margin is None:
        return False
    return settings.fallback_signal == "consistency" or prediction.margin < threshold


def threshold(settings: FallbackOptions, folder: str | Path, model_id: str) -> float:
    """The margin a model's unsure predictions are below: --fallback-margin, or with --fallback-share the export's
    calibrated one (a ValueError saying how to calibrate it when it has none for that share)."""
    from stepwise.serving.cascade import calibrated_margin

    if not settings.fallback_share:
        return settings.fallback_margin
    return calibrated_margin(folder, settings.fallback_share, model_id)


def check_signal(settings: FallbackOptions, folder: str | Path, model_id: str) -> None:
    """ValueError naming the export, unless its --fallback-signal can be read from it (margin always can)."""
    from stepwise.serving.cascade import check_step_by_step

    if settings.fallback and settings.fallback_signal != "margin":
        check_step_by_step(folder, f"model {model_id!r}", f"--fallback-signal {settings.fallback_signal}")


def cooling_down(teacher: Teacher) -> str:
    """Why the teacher is skipped now ("" when it is asked): it failed less than the cooldown ago."""
    left = teacher.down_until - time.monotonic()
    return f"teacher skipped for {left:.1f} s more: it was failing ({teacher.down_kind})" if left > 0 else ""


async def ask(teacher: Teacher, example: tasks.Example, student: Prediction) -> Outcome:
    """The teacher's parsed answer to `example`, or the student's with the reason it stands."""
    settings, started = teacher.settings, time.perf_counter()
    skipped = cooling_down(teacher)
    if skipped:
        return Outcome(student, "student", skipped, 0.0)
    prompt = tasks.few_shot_prompt(teacher.task, teacher.shots, example)
    extra = (
        {"structured_outputs": {"regex": answer_regex(teacher.task, example)}} if settings.fallback_structured else None
    )
    generation = Generation()
    try:
        # The budget bounds the whole exchange: waiting for a free slot, every attempt and the backoff between them.
        async with asyncio.timeout(settings.budget_s):
            async with teacher.gate:
                skipped = cooling_down(teacher)  # it may have failed while this one waited for the slot
                if not skipped:
                    generation = await teacher.complete(teacher.client, prompt, extra)
    except TimeoutError:
        generation = Generation(error=f"no answer within {settings.budget_s:.1f} s", down="no answer within the budget")
    except Exception as problem:  # whatever goes wrong with the teacher, the request still gets the student's answer
        logger.warning(f"teacher fallback failed for {example.id}: {type(problem).__name__}: {problem}")
        generation = Generation(error=f"{type(problem).__name__}: {problem}")
    seconds = time.perf_counter() - started
    if skipped:
        return Outcome(student, "student", skipped, seconds)
    if generation.error:
        # Only the teacher's own failures (unreachable, timing out, 5xx) cool it down for everyone: a 4xx or an
        # unreadable answer is this request's (an input over the teacher's context), and one client must not turn
        # the fallback off for the others.
        if generation.down and settings.fallback_cooldown_s:
            teacher.down_until = time.monotonic() + settings.fallback_cooldown_s
            teacher.down_kind = generation.down
        return Outcome(student, "student", f"teacher failed: {generation.error}", seconds)
    parsed = tasks.parse_completion(teacher.task, next(iter(generation.completions), None), example.choices)
    if parsed.status != "ok":
        return Outcome(student, "student", f"teacher's answer unreadable: {parsed.reason}", seconds)
    # The scores stay the student's (why it asked); the probability is the one the student gave the teacher's label.
    answer = dataclasses.replace(
        student, label=parsed.label, rationale=parsed.rationale, probability=(student.scores or {}).get(parsed.label)
    )
    return Outcome(answer, "teacher", None, seconds)
