"""Teacher backends behind one small interface: `generate(examples, prompts) -> list[Generation]`.

- replay: the shipped PaLM-540B completion of each example (no model needed);
- vllm: the in-process engine (vllm.LLM), one call per chunk, prefix caching for the shared few-shot prefix;
- openai: any OpenAI-compatible /v1/completions server, bounded concurrency, retries with backoff, timeouts.

A backend never raises for one bad input: the failure comes back as `Generation.error` and is recorded.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from typing import Callable

from stepwise import tasks


@dataclass
class Generation:
    completions: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    error: str = ""  # set when the teacher produced nothing usable (prompt too long, server error, ...)


Teacher = Callable[[list[tasks.Example], list[str]], list[Generation]]


def replay_teacher() -> Teacher:
    def generate(examples: list[tasks.Example], prompts: list[str]) -> list[Generation]:
        return [
            Generation([e.teacher_completion]) if e.teacher_completion is not None else Generation(error="replay: no shipped teacher completion for this example")
            for e in examples
        ]

    return generate


# ---------------------------------------------------------------- structured output


def answer_regex(task: tasks.Task, example: tasks.Example, max_rationale_chars: int = 300) -> str:
    """A regex for the whole completion: one line of rationale, then the task's answer sentence with a
    label the parser accepts (the example's own choices for a multiple-choice task)."""
    rationale = f"[^\\n]{{1,{max_rationale_chars}}}"
    if task.answer_style == "label":
        return f" {rationale}\\nAnswer: ({'|'.join(map(re.escape, task.labels))})"
    if task.answer_style == "equation":
        return f" {rationale} The answer is [0-9(][0-9 .+*/()-]{{0,40}}\\."
    if example.choices:
        options = "|".join(re.escape(tasks.answer_sentence(task, c, example.choices)) for c in example.choices)
        return f" {rationale} ({options})"
    return f" {rationale} So the answer is [^\\n]{{1,60}}\\."


# ---------------------------------------------------------------- vLLM in-process


def load_vllm(model: str, seed: int, prefix_caching: bool, tensor_parallel_size: int, dtype: str, max_model_len: int,
              gpu_memory_utilization: float, enforce_eager: bool):
    from vllm import LLM

    return LLM(
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        max_model_len=max_model_len or None,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        enable_prefix_caching=prefix_caching,
        seed=seed,
    )


def vllm_teacher(task: tasks.Task, llm, sampling: dict, structured: bool) -> Teacher:
    """Generation with an engine from `load_vllm`: one `llm.generate` per chunk (the engine batches it)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    tokenizer = llm.get_tokenizer()
    context = llm.llm_engine.model_config.max_model_len

    def params_for(example: tasks.Example) -> SamplingParams:
        constraint = StructuredOutputsParams(regex=answer_regex(task, example)) if structured else None
        return SamplingParams(**sampling, stop=tasks.stop_strings(task), structured_outputs=constraint)

    def generate(examples: list[tasks.Example], prompts: list[str]) -> list[Generation]:
        results = [Generation() for _ in prompts]
        # A prompt that cannot fit would make the engine reject the whole call: record it, send the rest.
        fits = []
        for i, prompt in enumerate(prompts):
            length = len(tokenizer.encode(prompt))
            if length + sampling["max_tokens"] > context:
                results[i].error = f"prompt too long: {length} tokens + {sampling['max_tokens']} new > max_model_len {context}"
            else:
                fits.append(i)
        if fits:
            outputs = llm.generate([prompts[i] for i in fits], [params_for(examples[i]) for i in fits], use_tqdm=False)
            for i, output in zip(fits, outputs):
                results[i] = Generation(
                    [c.text for c in output.outputs],
                    len(output.prompt_token_ids or []),
                    sum(len(c.token_ids) for c in output.outputs),
                )
        return results

    return generate


# ---------------------------------------------------------------- OpenAI-compatible server


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def openai_teacher(task: tasks.Task, base_url: str, model: str, sampling: dict, concurrency: int, timeout: float, retries: int, api_key: str) -> Teacher:
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model,
        "n": sampling["n"],
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "max_tokens": sampling["max_tokens"],
        "seed": sampling["seed"],
        "stop": tasks.stop_strings(task),
    }

    async def complete(client: httpx.AsyncClient, gate: asyncio.Semaphore, prompt: str) -> Generation:
        last = ""
        for attempt in range(retries + 1):
            if attempt:  # exponential backoff with jitter, so retries from many requests spread out
                await asyncio.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                async with gate:
                    response = await client.post(url, json=dict(body, prompt=prompt), headers=headers)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:  # a client error will not change on retry
                return Generation(error=f"server error: HTTP {response.status_code}: {response.text[:200]}")
            data = response.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            usage = data.get("usage") or {}
            return Generation([c["text"] for c in choices], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        return Generation(error=f"server error after {retries} retries: {last}")

    async def complete_all(prompts: list[str]) -> list[Generation]:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
            return await asyncio.gather(*(complete(client, gate, p) for p in prompts))

    def generate(examples: list[tasks.Example], prompts: list[str]) -> list[Generation]:
        return asyncio.run(complete_all(prompts))

    return generate
