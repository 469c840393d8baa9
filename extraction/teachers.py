"""Teacher backends behind one small interface: `generate(work) -> results`, where `work` is a lazy stream
of (example, prompt) pairs and results come back as (example, Generation) pairs as soon as each is done
(not necessarily in input order). Each backend pulls only a bounded window of work ahead, so a long split
streams through and is never held in the engine at once.

- replay: the teacher completion that comes with each example (the shipped PaLM-540B outputs, or a custom
  dataset's `completion` column), parsed like a fresh one; no model needed;
- dataset: the rationale that comes with each example (a custom dataset's `rationale` column) and its gold
  label, taken as they are; no model needed;
- vllm: the in-process engine (vllm.LLM's LLMEngine), kept full by topping up its queue as requests
  finish; prefix caching for the shared few-shot prefix;
- openai: any OpenAI-compatible /v1/completions server, bounded concurrency, retries with backoff, timeouts.

A backend never raises for one bad input: the failure comes back as `Generation.error` and is recorded.

The option groups (`SamplingOptions`, `EngineOptions`, `ClientOptions`) are the `stepwise extract` flags that configure
the backends; each checks its own values.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable, Iterable, Iterator, Literal

from stepwise import tasks


@dataclass
class Generation:
    completions: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    error: str = ""  # set when the teacher produced nothing usable (prompt too long, server error, ...)
    down: str = ""  # the teacher itself is failing, not this request: its kind (ConnectError, ReadTimeout, HTTP 503)
    given: tasks.Parsed | None = None  # a rationale and label taken from the data as they are (no completion to parse)


Work = Iterable[tuple[tasks.Example, str]]
Results = Iterator[tuple[tasks.Example, Generation]]
Teacher = Callable[[Work], Results]


# ---------------------------------------------------------------- option groups


@dataclass(frozen=True)
class SamplingOptions:
    """How the teacher samples (vllm and openai).

    Args:
        n: samples per input; with n > 1 the majority label wins (self-consistency; use --temperature > 0)
        temperature: sampling temperature (0: greedy)
        top_p: nucleus sampling
        max_tokens: new tokens per completion
        seed: sampling seed
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be 1 or more, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 or more, got {self.temperature}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"--n {self.n} with --temperature 0 draws the same greedy completion {self.n} times: "
                "pass --temperature > 0 (e.g. 0.7)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be 1 or more, got {self.max_tokens}")


@dataclass(frozen=True)
class EngineOptions:
    """The in-process vLLM engine (--teacher vllm; one per Ray actor with --on-ray).

    Args:
        structured: constrain each completion to a rationale line plus a parseable answer sentence (a label of the
            task's set, one of the example's choices, or a computable equation)
        prefix_caching: cache the shared few-shot prefix across prompts
        tensor_parallel_size: GPUs per engine
        dtype: model dtype
        max_model_len: context length (0: the model's)
        gpu_memory_utilization: share of GPU memory for weights + KV cache
        enforce_eager: skip graph capture / torch.compile (faster start-up)
    """

    structured: bool = False
    prefix_caching: bool = True
    tensor_parallel_size: int = 1
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = 0
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be 1 or more, got {self.tensor_parallel_size}")
        if self.max_model_len < 0:
            raise ValueError(f"--max-model-len must be 0 (the model's) or more, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class ClientOptions:
    """The client of an OpenAI-compatible /v1/completions server (--teacher openai).

    Args:
        base_url: server root, e.g. http://127.0.0.1:8000
        api_key: bearer token, if the server wants one (better: put it in the environment variable below, where the
            process list does not show it)
        api_key_env: environment variable the bearer token is read from when --api-key is not given
        concurrency: requests in flight at once
        timeout_s: seconds per request before it is retried
        retries: retries per request (exponential backoff) before the record is an error
    """

    base_url: str = "http://127.0.0.1:8000"
    api_key: str = ""
    api_key_env: str = "STEPWISE_TEACHER_API_KEY"
    concurrency: int = 16
    timeout_s: float = 120.0
    retries: int = 4

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be 1 or more, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout-s must be more than 0 seconds, got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"--retries must be 0 or more, got {self.retries}")


# ---------------------------------------------------------------- teachers that read the data


def replay_teacher(task: tasks.Task) -> Teacher:
    """Each example's own teacher completion, to be parsed like a fresh one."""
    if task.source:
        missing = (
            f"no teacher completion in the data: put the teacher's raw text in a 'completion' column of "
            f"{task.source}, or use --teacher dataset (the 'rationale' column), vllm or openai"
        )
    else:
        missing = "no shipped teacher completion: use --teacher vllm or openai for this example"

    def generate(work: Work) -> Results:
        for example, _ in work:
            if example.teacher_completion is None:
                yield example, Generation(error=missing)
            else:
                yield example, Generation([example.teacher_completion])

    return generate


def dataset_teacher(task: tasks.Task) -> Teacher:
    """Each example's own rationale with its gold label, as they are (no model, nothing to parse)."""
    missing = (
        f"no rationale in the data: fill the 'rationale' column of {task.source or task.name}, "
        "or use --teacher replay, vllm or openai"
    )

    def generate(work: Work) -> Results:
        for example, _ in work:
            if example.rationale is None or not example.rationale.strip():
                yield example, Generation(error=missing)
            else:
                yield example, Generation(given=tasks.Parsed(example.rationale.strip(), example.label, "ok"))

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


def load_vllm(model: str, engine: EngineOptions, seed: int):
    from vllm import LLM
    from vllm.platforms import current_platform

    # On the CPU build, gpu_memory_utilization reserves that share of *host* RAM and refuses to start when
    # other processes hold memory; a fixed KV cache (VLLM_CPU_KVCACHE_SPACE GiB, default 4) is the CPU knob.
    cpu_cache = (
        {"kv_cache_memory_bytes": int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4) * 2**30)}
        if current_platform.is_cpu()
        else {}
    )
    return LLM(
        **cpu_cache,
        model=model,
        tensor_parallel_size=engine.tensor_parallel_size,
        dtype=engine.dtype,
        max_model_len=engine.max_model_len or None,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enforce_eager=engine.enforce_eager,
        enable_prefix_caching=engine.prefix_caching,
        seed=seed,
    )


def vllm_teacher(task: tasks.Task, llm, sampling: SamplingOptions, structured: bool) -> Teacher:
    """Generation with an engine from `load_vllm`, streamed: requests go into the engine's queue while
    earlier ones decode, up to twice the batch the scheduler runs at once, so the batch stays full."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    context = engine.model_config.max_model_len
    window = max(1, 2 * engine.vllm_config.scheduler_config.max_num_seqs // sampling.n)
    request_ids = itertools.count()
    # The seed seeds the engine (load_vllm); a per-request seed crashes vLLM 0.32's CPU runner as soon as a
    # seeded request's prefill is chunked ("CPU Generator does not use offset").
    per_request = {k: v for k, v in asdict(sampling).items() if k != "seed"}

    def params_for(example: tasks.Example) -> SamplingParams:
        constraint = StructuredOutputsParams(regex=answer_regex(task, example)) if structured else None
        return SamplingParams(
            **per_request,
            stop=tasks.stop_strings(task),
            structured_outputs=constraint,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

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
                    if len(prompt_ids) + sampling.max_tokens > context:
                        too_long = f"{len(prompt_ids)} tokens + {sampling.max_tokens} new > max_model_len {context}"
                        yield example, Generation(error=f"prompt too long: {too_long}")
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
                        yield (
                            in_flight.pop(output.request_id),
                            Generation(
                                [c.text for c in output.outputs],
                                len(output.prompt_token_ids or []),
                                sum(len(c.token_ids) for c in output.outputs),
                            ),
                        )
        finally:  # a consumer that stops early leaves no requests behind in the engine
            if in_flight:
                engine.abort_request(list(in_flight), internal=False)

    return generate


# ---------------------------------------------------------------- OpenAI-compatible server


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def backoff_s(attempt: int) -> float:
    """The wait before retry `attempt` (1, 2, ...): exponential, capped at 30 s; jitter takes 50-150% of it."""
    return min(30.0, 0.5 * 2 ** (attempt - 1))


def retry_budget_s(client_options: ClientOptions) -> float:
    """How long one `complete` call may take, every attempt's timeout and the longest waits between them included
    (the timeout bounds each network operation of an attempt, so a caller that needs a hard bound enforces this)."""
    return client_options.timeout_s * (client_options.retries + 1) + sum(
        1.5 * backoff_s(k) for k in range(1, client_options.retries + 1)
    )


def openai_completion(
    task: tasks.Task, model: str, sampling: SamplingOptions, client_options: ClientOptions
) -> Callable[..., Awaitable[Generation]]:
    """`complete(client, prompt, extra=None)`: one prompt (and `extra` request fields, e.g. vLLM's
    `structured_outputs`) to an OpenAI-compatible /v1/completions server through an
    httpx.AsyncClient, with retries (exponential backoff and jitter) on connection errors, timeouts and
    408/429/5xx; never raises for a failed request: the Generation's `error` says why. Used by the extraction
    backend below and by serving's teacher fallback."""
    import httpx

    url = client_options.base_url.rstrip("/") + "/v1/completions"
    # Read where the requests are made (a Serve replica has the environment of the node it runs on).
    api_key = client_options.api_key or os.environ.get(client_options.api_key_env, "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, **asdict(sampling), "stop": tasks.stop_strings(task)}
    retries = client_options.retries

    async def complete(client: httpx.AsyncClient, prompt: str, extra: dict | None = None) -> Generation:
        last, kind = "", ""
        for attempt in range(retries + 1):
            if attempt:  # exponential backoff with jitter, so retries from many requests spread out
                await asyncio.sleep(backoff_s(attempt) * (0.5 + random.random()))
            try:
                response = await client.post(url, json=body | {"prompt": prompt} | (extra or {}), headers=headers)
            except httpx.HTTPError as exc:
                last, kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
                continue
            if response.status_code in RETRYABLE_STATUS:
                last, kind = f"HTTP {response.status_code}: {response.text[:200]}", f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:  # a client error will not change on retry
                return Generation(error=f"server error: HTTP {response.status_code}: {response.text[:200]}")
            try:
                data = response.json()
                choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
                usage = data.get("usage") or {}
                return Generation(
                    [c["text"] for c in choices], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
                )
            except (ValueError, KeyError, TypeError, AttributeError) as problem:  # a 200 that is not a completion
                return Generation(
                    error=f"not a completion response ({type(problem).__name__}: {problem}): {response.text[:200]}"
                )
        return Generation(error=f"server error after {retries} retries: {last}", down=kind)

    return complete


def openai_teacher(task: tasks.Task, model: str, sampling: SamplingOptions, client_options: ClientOptions) -> Teacher:
    import httpx

    complete = openai_completion(task, model, sampling, client_options)
    concurrency = client_options.concurrency

    def generate(work: Work) -> Results:
        """Keep up to `concurrency` requests in flight; hand each result back as soon as it lands."""
        work = iter(work)
        loop = asyncio.new_event_loop()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = httpx.AsyncClient(timeout=httpx.Timeout(client_options.timeout_s), limits=limits)
        running: dict[asyncio.Task, tasks.Example] = {}
        try:
            while True:
                for example, prompt in itertools.islice(work, concurrency - len(running)):
                    running[loop.create_task(complete(client, prompt))] = example
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
