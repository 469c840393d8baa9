"""The served cascade: the student answers what it is sure of; a prediction whose margin is below the threshold
goes to a teacher (an OpenAI-compatible server, e.g. vLLM's) with the task's few-shot chain-of-thought prompt,
through the extraction stage's completion client (timeouts, retries). The teacher's answer is parsed by the task
layer; when the teacher fails, times out or answers something unreadable, the student's answer stands, marked
with the reason. A teacher never turns a request into an error."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from stepwise import tasks
from stepwise.export.runtime import Prediction
from stepwise.extraction.teachers import Generation, OpenAIClient, Sampling, answer_regex, openai_completion
from stepwise.serving.settings import Fallback


@dataclass
class Teacher:
    """One served task's teacher: its few-shot prefix, the completion call and a bound on requests in flight."""

    task: tasks.Task
    shots: list[str]
    complete: Callable[..., Awaitable[Generation]]
    client: Any  # httpx.AsyncClient
    gate: asyncio.Semaphore
    settings: Fallback


@dataclass(frozen=True)
class Outcome:
    prediction: Prediction
    source: str  # "student" or "teacher"
    error: str | None  # why the teacher's answer was not used
    seconds: float  # spent on the teacher (0 when not asked)


def prepare(settings: Fallback, task: tasks.Task) -> Teacher:
    """A teacher for `task`. Its few-shot prefix comes from the task's train split (as in extraction), so the
    task's data must be readable where the replica runs."""
    import httpx

    try:
        shots = tasks.exemplars(task, tasks.load_split(task, "train"))
    except (OSError, ValueError) as problem:
        raise ValueError(f"the teacher fallback builds its few-shot prompt from task {task.name!r}'s train split, which cannot be read here: {problem}") from None
    sampling = Sampling(max_tokens=settings.fallback_max_tokens)
    client_options = OpenAIClient(base_url=settings.fallback, timeout=settings.fallback_timeout_s, retries=settings.fallback_retries,
                                  concurrency=settings.fallback_concurrency)
    client = httpx.AsyncClient(timeout=httpx.Timeout(settings.fallback_timeout_s), limits=httpx.Limits(max_connections=settings.fallback_concurrency))
    return Teacher(task, shots, openai_completion(task, settings.fallback_model, sampling, client_options), client,
                   asyncio.Semaphore(settings.fallback_concurrency), settings)


def unsure(settings: Fallback, prediction: Prediction) -> bool:
    """The student's answer goes to the teacher: a closed label set's margin below the threshold."""
    return bool(settings.fallback) and prediction.margin is not None and prediction.margin < settings.fallback_margin


async def ask(teacher: Teacher, example: tasks.Example, student: Prediction) -> Outcome:
    """The teacher's parsed answer to `example`, or the student's with the reason it stands."""
    settings, started = teacher.settings, time.perf_counter()
    prompt = tasks.few_shot_prompt(teacher.task, teacher.shots, example)
    extra = {"structured_outputs": {"regex": answer_regex(teacher.task, example)}} if settings.fallback_structured else None
    # The client retries within its own timeout per attempt; this bounds the whole exchange, backoff included.
    budget = settings.fallback_timeout_s * (settings.fallback_retries + 1) + 2.0
    try:
        async with teacher.gate:
            generation = await asyncio.wait_for(teacher.complete(teacher.client, prompt, extra), budget)
    except TimeoutError:
        generation = Generation(error=f"no answer within {budget:.0f} s")
    seconds = time.perf_counter() - started
    if generation.error:
        return Outcome(student, "student", f"teacher failed: {generation.error}", seconds)
    parsed = tasks.parse_completion(teacher.task, generation.completions[0], example.choices)
    if parsed.status != "ok":
        return Outcome(student, "student", f"teacher's answer unreadable: {parsed.reason}", seconds)
    # The scores stay the student's (why it asked); the probability is the one the student gave the teacher's label.
    answer = dataclasses.replace(student, label=parsed.label, rationale=parsed.rationale, probability=(student.scores or {}).get(parsed.label))
    return Outcome(answer, "teacher", None, seconds)
