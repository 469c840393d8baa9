"""Teacher backends behind one small interface: `generate(work) -> results`, where `work` is a lazy stream
of (example, prompt) pairs and results come back as (example, Generation) pairs as soon as each is done
(not necessarily in input order). Each backend pulls only a bounded window of work ahead, so a long split
streams through and is never held in the engine at once.

- replay: the shipped PaLM-540B completion of each example (no model needed);
- vllm: the in-process engine (vllm.LLM's LLMEngine), kept full by topping up its queue as requests
  finish; prefix caching for the shared few-shot prefix;
- openai: any OpenAI-compatible /v1/completions server, bounded concurrency, retries with backoff, timeouts.

A backend never raises for one bad input: the failure comes back as `Generation.error` and is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from stepwise import tasks


@dataclass
class Generation:
    completions: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    error: str = ""  # set when the teacher produced nothing usable (prompt too long, server error, ...)


Work = Iterable[tuple[tasks.Example, str]]
Results = Iterator[tuple[tasks.Example, Generation]]
Teacher = Callable[[Work], Results]


def replay_teacher() -> Teacher:
    def generate(work: Work) -> Results:
        for example, _ in work:
            if example.teacher_completion is None:
                yield example, Generation(error="replay: no shipped teacher completion for this example")
            else:
                yield example, Generation([example.teacher_completion])

    return generate


# ---------------------------------------------------------------- structured output


# An arithmetic expression the evaluator can always compute: numbers, + - * /, one level of parentheses,
# no literal zero divisor (a free character class lets a random model write "(((" and fail anyway).
_NUMBER = r"(0|[1-9][0-9]{0,6})(\.[0-9]{1,4})?"  # no leading zeros: Python's parser rejects "064"
_NONZERO = r"[1-9][0-9]{0,6}(\.[0-9]{1,4})?"
_GROUP = rf"\({_NUMBER}( [-+*] {_NUMBER}| / {_NONZERO}){{1,3}}\)"
ARITHMETIC = rf"({_NUMBER}|{_GROUP})( [-+*] ({_NUMBER}|{_GROUP})| / ({_NONZERO}|{_GROUP})){{0,3}}"


def answer_regex(task: tasks.Task, example: tasks.Example, max_rationale_chars: int = 300) -> str:
    """A regex for the whole completion: one line of rationale, then the task's answer sentence with a
    label the parser accepts (the example's own choices for a multiple-choice task)."""
    rationale = f"[^\\n]{{1,{max_rationale_chars}}}"
    if task.answer_style == "label":
        return f" {rationale}\\nAnswer: ({'|'.join(map(re.escape, task.labels))})"
    if task.answer_style == "equation":
        return f" {rationale} The answer is ({ARITHMETIC}|\\({ARITHMETIC}\\))\\."
    if example.choices:
        options = "|".join(re.escape(tasks.answer_sentence(task, c, example.choices)) for c in example.choices)
        return f" {rationale} ({options})"
    return f" {rationale} So the answer is [^\\n]{{1,60}}\\."


# ---------------------------------------------------------------- vLLM in-process


def load_vllm(model: str, seed: int, prefix_caching: bool, tensor_parallel_size: int, dtype: str, max_model_len: int,
              gpu_memory_utilization: float, enforce_eager: bool):
    from vllm import LLM
    from vllm.platforms import current_platform

    # On the CPU build, gpu_memory_utilization reserves that share of *host* RAM and refuses to start when
    # other processes hold memory; a fixed KV cache (VLLM_CPU_KVCACHE_SPACE GiB, default 4) is the CPU knob.
    cpu_cache = {"kv_cache_memory_bytes": int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4) * 2**30)} if current_platform.is_cpu() else {}
    return LLM(
        **cpu_cache,
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
    """Generation with an engine from `load_vllm`, streamed: requests go into the engine's queue while
    earlier ones decode, up to twice the batch the scheduler runs at once, so the batch stays full."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    context = engine.model_config.max_model_len
    window = max(1, 2 * engine.vllm_config.scheduler_config.max_num_seqs // sampling["n"])
    request_ids = itertools.count()
    # The seed seeds the engine (load_vllm); a per-request seed crashes vLLM 0.32's CPU runner as soon as a
    # seeded request's prefill is chunked ("CPU Generator does not use offset").
    per_request = {k: v for k, v in sampling.items() if k != "seed"}

    def params_for(example: tasks.Example) -> SamplingParams:
        constraint = StructuredOutputsParams(regex=answer_regex(task, example)) if structured else None
        return SamplingParams(**per_request, stop=tasks.stop_strings(task), structured_outputs=constraint, output_kind=RequestOutputKind.FINAL_ONLY)

    def generate(work: Work) -> Results:
        work = iter(work)
        in_flight: dict[str, tasks.Example] = {}
        try:
            while True:
                pulled = 0
                for example, prompt in itertools.islice(work, window - len(in_flight)):
                    pulled += 1
                    prompt_ids = tokenizer.encode(prompt)
                    # The engine would reject a prompt that cannot fit: record it and go on.
                    if len(prompt_ids) + sampling["max_tokens"] > context:
                        yield example, Generation(error=f"prompt too long: {len(prompt_ids)} tokens + {sampling['max_tokens']} new > max_model_len {context}")
                        continue
                    request_id = f"stepwise-{next(request_ids)}"
                    engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params_for(example))
                    in_flight[request_id] = example
                if not in_flight:
                    if not pulled:  # the work is used up
                        return
                    continue  # everything pulled was too long: pull more
                for output in engine.step():
                    if output.finished:
                        yield in_flight.pop(output.request_id), Generation(
                            [c.text for c in output.outputs], len(output.prompt_token_ids or []), sum(len(c.token_ids) for c in output.outputs)
                        )
        finally:  # a consumer that stops early leaves no requests behind in the engine
            if in_flight:
                engine.abort_request(list(in_flight), internal=False)

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

    def generate(work: Work) -> Results:
        """Keep up to `concurrency` requests in flight; hand each result back as soon as it lands."""
        work = iter(work)
        loop = asyncio.new_event_loop()
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits)
        running: dict[asyncio.Task, tasks.Example] = {}
        try:
            while True:
                for example, prompt in itertools.islice(work, 2 * concurrency - len(running)):
                    running[loop.create_task(complete(client, gate, prompt))] = example
                if not running:
                    return
                finished, _ = loop.run_until_complete(asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED))
                for request in finished:
                    yield running.pop(request), request.result()
        finally:
            if running:
                for request in running:
                    request.cancel()
                loop.run_until_complete(asyncio.wait(running))
            loop.run_until_complete(client.aclose())
            loop.close()

    return generate
