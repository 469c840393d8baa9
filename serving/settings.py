"""What a served app is configured with: the models and five argument groups (batching, limits, overload,
scaling, fallback). The same settings come from `stepwise serve` flags, from `args:` in serving/serve_config.yaml
(nested by group), or from Python (`ServeArgs(models=..., limits=LimitOptions(max_items=8))`); each group checks
itself, so a bad value fails before any replica starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from stepwise import request_limits
from stepwise.extraction.teachers import ClientOptions, retry_budget_s

MAX_CHOICES = 26  # choices are shown to the student lettered (a) to (z)
Signal = Literal[
    "margin", "consistency", "both"
]  # what sends a prediction to the teacher (FallbackOptions.fallback_signal)
SIGNALS: tuple[str, ...] = get_args(Signal)


@dataclass(frozen=True)
class BatchingOptions:
    """Dynamic batching: concurrent requests for one model are decoded together.

    Args:
        max_batch_size: most inputs one replica decodes together
        batch_wait_timeout_s: how long a batch waits to fill; 0 takes whatever is queued (lowest latency)
        max_ongoing_requests: requests one replica works on at once (at least max_batch_size, or batches never fill)
    """

    max_batch_size: int = request_limits.DEFAULT_MAX_BATCH
    batch_wait_timeout_s: float = 0.0
    max_ongoing_requests: int = 64

    def __post_init__(self) -> None:
        _at_least(self, max_batch_size=1, max_ongoing_requests=1, batch_wait_timeout_s=0)
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                f"max_batch_size ({self.max_batch_size}), or batches never fill"
            )


@dataclass(frozen=True)
class LimitOptions:
    """What one request may ask for; beyond it the request is refused (413/422) before any decoding.

    Args:
        max_body_bytes: largest request body, checked before the JSON is read (413)
        max_items: most inputs in one request (413)
        max_input_chars: longest input text or field, in characters (413)
        max_choices: most answer choices of one input (413)
        max_choice_chars: longest answer choice, in characters (413)
        max_choice_tokens: longest answer choice, in tokens of the model's tokenizer (413): bounds the scoring work
            per input
        request_timeout_s: a request still decoding after this many seconds gets 504
    """

    max_body_bytes: int = 1_000_000
    max_items: int = 64
    max_input_chars: int = 4000
    max_choices: int = request_limits.DEFAULT_MAX_CHOICES
    max_choice_chars: int = 200
    max_choice_tokens: int = request_limits.DEFAULT_MAX_CHOICE_TOKENS
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _at_least(
            self,
            max_body_bytes=1,
            max_items=1,
            max_input_chars=1,
            max_choices=1,
            max_choice_chars=1,
            max_choice_tokens=1,
        )
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.max_choices > MAX_CHOICES:
            raise ValueError(
                f"max_choices must be at most {MAX_CHOICES} (choices are lettered a-z), got {self.max_choices}"
            )


@dataclass(frozen=True)
class OverloadOptions:
    """Backpressure: what happens when more requests arrive than the replicas work on.

    Args:
        max_queued_requests: requests waiting for a replica before new ones get 503 (-1: unbounded)
        retry_after_s: Retry-After header of a 503 on overload
    """

    max_queued_requests: int = 128
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        _at_least(self, max_queued_requests=-1, retry_after_s=0)


@dataclass(frozen=True)
class ScalingOptions:
    """Replicas and what each one holds.

    Args:
        replicas: replicas when not autoscaling
        min_replicas: autoscaling floor (with --max-replicas)
        max_replicas: autoscaling ceiling; setting it turns autoscaling on
        target_ongoing_requests: autoscaling target of ongoing requests per replica
        replica_cpus: CPUs Ray reserves per replica
        replica_gpus: GPUs per replica; default 1 when an export targets cuda or tensorrt, else 0
        ort_threads: ONNX Runtime intra-op threads per session
    """

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    replica_cpus: float = 1.0
    replica_gpus: float | None = None
    ort_threads: int = 1

    def __post_init__(self) -> None:
        _at_least(self, replicas=1, min_replicas=0, ort_threads=1)
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas}) or 1")
        if self.replica_cpus <= 0 or self.target_ongoing_requests <= 0 or (self.replica_gpus or 0) < 0:
            raise ValueError("replica_cpus and target_ongoing_requests must be positive, replica_gpus not negative")


@dataclass(frozen=True)
class FallbackOptions:
    """A student-first cascade: predictions the student is unsure of (margin below the threshold; or, by
    --fallback-signal, whose rationale reaches another label) go to a teacher,
    an OpenAI-compatible server such as vLLM's, through the extraction stage's client.

    Args:
        fallback: base URL of the teacher server, e.g. http://127.0.0.1:8001 ("": no fallback)
        fallback_margin: predictions whose margin (label probability minus the runner-up's) is below this go to the
            teacher
        fallback_share: send the share of predictions the export was calibrated for instead (the margin in its
            cascade_settings.json, written by `stepwise cascade --target-share SHARE`; 0: use --fallback-margin)
        fallback_signal: what sends a prediction to the teacher: margin (below the threshold); consistency (every
            prediction's rationale is decoded, and the label it reaches disagrees with the student's label; no
            margin); both (the rationale is decoded for the predictions below the margin only, and sends those whose
            rationale disagrees). consistency and both need an export trained step-by-step
        fallback_model: model name the teacher server serves
        fallback_timeout_s: seconds per teacher request; past it, or on any teacher error, the student's answer stands
        fallback_retries: retries of a failed teacher request
        fallback_max_tokens: tokens the teacher may write (rationale and answer)
        fallback_concurrency: most teacher requests in flight per replica
        fallback_structured: constrain the teacher's answer to the task's label set (vLLM structured outputs)
        fallback_cooldown_s: after the teacher fails (no answer, connection or server error), unsure predictions skip it
            for this many seconds, the student's answer standing at once (0: always ask)
        fallback_api_key_env: environment variable holding the teacher's bearer token, read on each replica's node
            (never a flag: the process list would show it)
        fallback_log: a folder on each replica's node where every teacher answer is appended as a training row in
            the extraction format (DIR/<model id>/: `stepwise train --rationales EXTRACT_DIR DIR/<model id>`); the
            rows hold the request's input, so they are user data ("": off)
    """

    fallback: str = ""
    fallback_margin: float = 0.0
    fallback_share: float = 0.0
    fallback_signal: Signal = "margin"
    fallback_model: str = ""
    fallback_timeout_s: float = 10.0
    fallback_retries: int = 1
    fallback_max_tokens: int = 256
    fallback_concurrency: int = 8
    fallback_structured: bool = True
    fallback_cooldown_s: float = 5.0
    fallback_api_key_env: str = "STEPWISE_TEACHER_API_KEY"
    fallback_log: str = ""

    def __post_init__(self) -> None:
        if self.fallback and not self.fallback.startswith(("http://", "https://")):
            raise ValueError(f"--fallback must be an http(s) URL, got {self.fallback!r}")
        if self.fallback and not self.fallback_model:
            raise ValueError("--fallback needs --fallback-model (the model name the teacher server serves)")
        if not 0.0 <= self.fallback_margin <= 1.0:
            raise ValueError(f"--fallback-margin is a probability difference in [0, 1], got {self.fallback_margin}")
        if not 0.0 <= self.fallback_share < 1.0:
            raise ValueError(f"--fallback-share is a share of predictions in (0, 1), got {self.fallback_share}")
        if self.fallback_share and self.fallback_margin:
            raise ValueError(
                "give --fallback-margin or --fallback-share, not both (a share sends by the export's calibrated margin)"
            )
        if self.fallback_signal not in SIGNALS:
            raise ValueError(f"--fallback-signal is one of {', '.join(SIGNALS)}, got {self.fallback_signal!r}")
        margin_given = bool(self.fallback_margin or self.fallback_share)
        if self.fallback_signal == "consistency" and margin_given:
            raise ValueError(
                "--fallback-signal consistency decodes every prediction's rationale and takes no margin: "
                "drop --fallback-margin/--fallback-share (or gate the decoding by the margin: --fallback-signal both)"
            )
        if self.fallback_signal == "both" and self.fallback and not margin_given:
            raise ValueError(
                "--fallback-signal both decodes rationales for the predictions below the margin: "
                "give --fallback-margin or --fallback-share"
            )
        if self.fallback_share and not self.fallback:
            raise ValueError("--fallback-share sends predictions to the teacher: it needs --fallback")
        _at_least(self, fallback_retries=0, fallback_max_tokens=1, fallback_concurrency=1)
        if self.fallback_timeout_s <= 0:
            raise ValueError(f"--fallback-timeout-s must be positive, got {self.fallback_timeout_s}")
        _at_least(self, fallback_cooldown_s=0)
        if self.fallback_log and not self.fallback:
            raise ValueError("--fallback-log keeps the teacher's answers: it needs --fallback")

    def client(self) -> ClientOptions:
        """The extraction stage's client options for this teacher."""
        return ClientOptions(
            base_url=self.fallback,
            api_key_env=self.fallback_api_key_env,
            timeout_s=self.fallback_timeout_s,
            retries=self.fallback_retries,
            concurrency=self.fallback_concurrency,
        )

    @property
    def budget_s(self) -> float:
        """The longest a prediction waits for the teacher (every attempt, the backoff between them, a second for the
        slot and the parsing); 0 without a teacher. Past it the student's answer stands."""
        return retry_budget_s(self.client()) + 1.0 if self.fallback else 0.0


GROUPS = {
    "batching": BatchingOptions,
    "limits": LimitOptions,
    "overload": OverloadOptions,
    "scaling": ScalingOptions,
    "fallback": FallbackOptions,
}


@dataclass(frozen=True)
class ServeArgs:
    """Everything the app builder takes. `models` maps a model id to an export folder."""

    models: dict[str, str]
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    limits: LimitOptions = field(default_factory=LimitOptions)
    overload: OverloadOptions = field(default_factory=OverloadOptions)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    fallback: FallbackOptions = field(default_factory=FallbackOptions)
    access_log: bool = False
    allow_unverified: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no models to serve: give at least one export folder")

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServeArgs:
        """From `args:` of a Serve config file or `to_dict`, read as `stepwise serve --config` reads a file (one
        table per group, or the options at the top level; unknown or misplaced keys are errors); groups already
        built are taken as they are."""
        from stepwise.cli import placed_keys

        built = {name: value for name, value in args.items() if name in GROUPS and isinstance(value, GROUPS[name])}
        owners = {f.name: None for f in dataclasses.fields(cls) if f.name not in GROUPS}
        owners |= {f.name: name for name, group in GROUPS.items() for f in dataclasses.fields(group)}
        flat = placed_keys({k: v for k, v in args.items() if k not in built}, owners, "serve settings")
        values: dict[str, Any] = {name: value for name, value in flat.items() if owners[name] is None}
        for name, group in GROUPS.items():
            values[name] = built.get(name) or group(**{k: v for k, v in flat.items() if owners[k] == name})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _at_least(group: Any, **floors: float) -> None:
    for name, floor in floors.items():
        if getattr(group, name) < floor:
            raise ValueError(f"{name} must be at least {floor}, got {getattr(group, name)}")
