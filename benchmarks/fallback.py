"""The served fallback under load: `stepwise serve` with the teacher fallback off, on at a margin that sends ~10% of
the requests to the teacher, and with a dead teacher URL (the student's answers must keep flowing), with and without
the cooldown that skips a teacher for a while after it failed, in one run.

The student is a tiny e-SNLI T5 trained briefly (a random one is sure of everything: margin 1.0 on every input),
exported fp32. The teacher is the tiny random teacher (extraction/tiny_teacher.py) on a vLLM OpenAI server on this
CPU: one thread, slow per token, and its answers are noise (readable thanks to structured output); it stands in for
a real teacher's latency shape, not its cost, so its time per fallback is measured and reported on its own. The
margin is calibrated on the student's own margins over the benchmark's inputs (the 200 first e-SNLI test inputs,
each request one of them, in turn): the 10th percentile. One local Ray + Serve (`serving.lifecycle`, what `stepwise
serve` runs) holds one application per configuration, each its own student replica behind the same HAProxy ingress,
so that the configurations can take turns: every point is measured in several rounds, the order rotating, and pools
them (on a machine shared with other work, load drifts over minutes). The load comes from an httpx client (`hey`
sends one body over and over, and the share sent to the teacher depends on the inputs), which also reads who
answered each request.

    python3 -m stepwise bench fallback   # -> benchmarks/results/fallback.{json,md,png}
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, bench_lock, command_line, free_port, vllm_openai_server
from stepwise import artifacts, envs, tasks
from stepwise.serving import cascade, lifecycle
from stepwise.serving.settings import BatchingOptions, FallbackOptions, OverloadOptions, ScalingOptions, ServeArgs

TEACHER_TOKENS = 320  # the structured answer's longest form: a 300-character rationale line, then the label
SHARE = 0.10  # of the inputs the margin threshold sends to the teacher


# ---------------------------------------------------------------- the student, the inputs, the teacher


def trained_export(workdir: Path, steps: int) -> Path:
    """A tiny e-SNLI student trained `steps` steps (standard fine-tuning), exported fp32 (parity-gated); reused. Not
    int8: barely trained, many of its inputs sit near a decision boundary, where int8 flips enough labels to fail the
    parity gate's accuracy check, and the tiny model's latency is about the same either way (README, Export)."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training import train

    export = workdir / f"export-fp32-{steps}"
    if (export / "parity.json").exists():
        return export
    student = train.main(
        task="esnli",
        out=workdir / f"student-{steps}",
        mode="standard-finetune",
        vocab_size=1000,
        data=train.DataOptions(max_input_tokens=128, max_target_tokens=16),
        optim=train.OptimOptions(learning_rate=1e-3, batch_size=32, max_steps=steps),
        evaluation=train.EvalOptions(eval_every=steps, eval_limit=64),
    )
    return export_main(model=student, out=export, parity=ParityOptions(parity_limit=64), overwrite=True)


def request_bodies(count: int) -> tuple[list[tasks.Example], list[dict]]:
    examples = tasks.load_split(tasks.get_task("esnli"), "test")[:count]
    bodies = []
    for example in examples:
        premise, hypothesis = example.input.removeprefix("Premise: ").split("\nHypothesis: ")
        bodies.append({"inputs": {"premise": premise, "hypothesis": hypothesis}})
    return examples, bodies


def calibrate(export: Path, examples: list[tasks.Example]) -> tuple[dict[str, Any], list[tasks.Example]]:
    """The margin below which SHARE of the inputs go to the teacher (halfway between the student's margins on either
    side of that rank; each input predicted alone, as a single request is), and those inputs."""
    from stepwise.export.runtime import load_runtime, predict

    runtime = load_runtime(export, threads=1)
    margins = [predict(runtime, [example])[0].margin for example in examples]
    ranked = sorted(margins)
    rank = round(SHARE * len(ranked))
    threshold = cascade.threshold_for(margins, rank)
    calibration = {
        "margin": threshold,
        "sent": rank,
        "inputs": len(ranked),
        "student_margin_p10_p50_p90": [round(statistics.quantiles(ranked, n=10)[i], 4) for i in (0, 4, 8)],
    }
    return calibration, [e for e, m in zip(examples, margins, strict=True) if m < threshold]


def build_teacher(workdir: Path) -> Path:
    out = workdir / "tiny-teacher"
    if not (out / "config.json").exists():
        subprocess.run(
            [str(envs.venv_python("teacher")), "-m", "stepwise.extraction.tiny_teacher", str(out)],
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            check=True,
            capture_output=True,
        )
    return out


def teacher_alone(teacher_url: str, examples: list[tasks.Example]) -> dict[str, Any]:
    """What one fallback costs on its own: the served fallback's exchange (prompt, structured output, parse) for each
    input, one after another, straight to the teacher."""
    from stepwise.export.runtime import Prediction
    from stepwise.serving import fallback

    settings = FallbackOptions(
        fallback=teacher_url,
        fallback_margin=1.0,
        fallback_model="tiny",
        fallback_max_tokens=TEACHER_TOKENS,
        fallback_timeout_s=120,
        fallback_retries=0,
    )
    student = Prediction("neutral", None, 1 / 3, 0.0, {"entailment": 1 / 3, "neutral": 1 / 3, "contradiction": 1 / 3})

    async def ask_each() -> list[fallback.Outcome]:
        teacher = fallback.prepare(settings, tasks.get_task("esnli"))
        return [await fallback.ask(teacher, example, student) for example in examples]

    outcomes = asyncio.run(ask_each())
    seconds = [1000 * o.seconds for o in outcomes]
    return {
        "calls": len(outcomes),
        "p50_ms": round(statistics.median(seconds), 1),
        "max_ms": round(max(seconds), 1),
        "answered": sum(o.source == "teacher" for o in outcomes),
        "rationale_chars_p50": statistics.median(len(o.prediction.rationale or "") for o in outcomes),
    }


# ---------------------------------------------------------------- serving and load


def start_apps(export: Path, workdir: Path, configs: dict[str, FallbackOptions]) -> dict[str, str]:
    """One local Ray + Serve (`serving.lifecycle`, as `stepwise serve` runs it) with one application per fallback
    configuration, each its own student replica behind the same HAProxy ingress; config name -> its /v1/predict URL."""
    from ray import serve

    from stepwise.serving import app

    os.environ["OMP_NUM_THREADS"] = "1"
    base = ServeArgs(
        models={"esnli": str(export)},
        batching=BatchingOptions(max_ongoing_requests=128),
        overload=OverloadOptions(max_queued_requests=1024),
        scaling=ScalingOptions(replica_cpus=0.5),
    )
    names = list(configs)
    prefixes = {name: "/" + re.sub(r"\W+", "-", name).strip("-") for name in names}
    url = lifecycle.start(
        dataclasses.replace(base, fallback=configs[names[0]]), port=free_port(), run_dir=workdir / "serve"
    )
    prefixes[names[0]] = ""
    for name in names[1:]:
        serve.run(
            app.build_app(dataclasses.replace(base, fallback=configs[name])),
            name=prefixes[name].strip("/"),
            route_prefix=prefixes[name],
        )
    return {name: f"{url}{prefix}/v1/predict" for name, prefix in prefixes.items()}


async def load(url: str, bodies: list[dict], clients: int, requests: int) -> dict[str, Any]:
    """`requests` requests from `clients` concurrent clients, the inputs in turn: latencies by who answered, statuses,
    fallback errors by kind (numbers left out) and the wall time."""
    import httpx

    run: dict[str, Any] = {
        "latencies": {"student": [], "teacher": [], "student, teacher failed": []},
        "statuses": {},
        "errors": {},
    }
    remaining = iter(range(requests))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients), timeout=300) as client:

        async def one_client() -> None:
            for i in remaining:
                started = time.perf_counter()
                response = await client.post(url, json=bodies[i % len(bodies)])
                ms = 1000 * (time.perf_counter() - started)
                run["statuses"][str(response.status_code)] = run["statuses"].get(str(response.status_code), 0) + 1
                if response.status_code == 200:
                    [answer] = response.json()["predictions"]
                    error = answer.get("fallback_error")
                    run["latencies"]["student, teacher failed" if error else answer["source"]].append(ms)
                    if error:
                        kind = re.sub(r"\d+(\.\d+)?", "N", error.split(": All connection")[0])
                        run["errors"][kind] = run["errors"].get(kind, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        run["wall_s"] = time.perf_counter() - started
    return run


def summary(runs: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """One point from its rounds: latencies pooled, throughput over the rounds' total time."""
    by_source = {source: [ms for run in runs for ms in run["latencies"][source]] for source in runs[0]["latencies"]}
    every = sorted(ms for values in by_source.values() for ms in values)
    counted: dict[str, dict[str, int]] = {"statuses": {}, "errors": {}}
    for run in runs:
        for field, counts in counted.items():
            for key, n in run[field].items():
                counts[key] = counts.get(key, 0) + n
    return {
        "clients": clients,
        "requests": len(every),
        "p50_ms": round(statistics.median(every), 1),
        "p99_ms": round(statistics.quantiles(every, n=100)[98], 1),
        "rps": round(len(every) / sum(run["wall_s"] for run in runs), 1),
        "rps_per_round": [round(sum(map(len, run["latencies"].values())) / run["wall_s"], 1) for run in runs],
        "statuses": counted["statuses"],
        "fallback_errors": counted["errors"],
        "by_source": {
            source: {"requests": len(v), "p50_ms": round(statistics.median(v), 1)}
            for source, v in by_source.items()
            if v
        },
    }


def measure(
    urls: dict[str, str], bodies: list[dict], concurrency: Sequence[int], requests: int, rounds: int
) -> list[dict[str, Any]]:
    """Every configuration at every concurrency, in `rounds` rounds that take turns (the order rotating each round), so
    that the shared machine's changing load falls on all of them alike."""
    names = list(urls)
    for url in urls.values():
        asyncio.run(load(url, bodies[:8], 2, 16))  # warm-up: the model loaded, connections open, the teacher asked once
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {
        (name, clients): [] for name in names for clients in concurrency
    }
    for round_number in range(rounds):
        for name in names[round_number % len(names) :] + names[: round_number % len(names)]:
            for clients in concurrency:
                runs[(name, clients)].append(asyncio.run(load(urls[name], bodies, clients, requests)))
                print(
                    f"[bench] round {round_number + 1} {name:30s} c={clients:<3d} "
                    f"{runs[(name, clients)][-1]['wall_s']:.1f} s",
                    flush=True,
                )
    return [
        {"config": name, "points": [summary(runs[(name, clients)], clients) for clients in concurrency]}
        for name in names
    ]


# ---------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    base = {p["clients"]: p for p in result["rows"][0]["points"]}
    teacher = result["teacher_alone"]
    lines = [
        f"Student: {result['student']}. Teacher: {result['teacher']}. "
        f"Inputs: {result['calibration']['inputs']} e-SNLI test inputs in turn, one per "
        f"request; threshold margin {result['calibration']['margin']:.4f} "
        f"sends {result['calibration']['sent']} of them "
        f"({result['calibration']['sent'] / result['calibration']['inputs']:.0%}) to the teacher. "
        f"Load: httpx, {result['requests_per_point']} requests per point "
        f"({result['rounds']} rounds, taking turns with the other configurations).",
        "",
        f"The teacher alone (the fallback's exchange, one call at a time, {teacher['calls']} unsure inputs): "
        f"p50 {teacher['p50_ms']} ms per fallback, "
        f"max {teacher['max_ms']} ms; {teacher['answered']}/{teacher['calls']} answers readable.",
        "",
        "| fallback | clients | p50 ms | p99 ms | req/s | p50 / off | p99 / off | req/s / off "
        "| answered by | non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for p in row["points"]:
            ref = base[p["clients"]]
            sources = ", ".join(
                f"{source} {v['requests']} (p50 {v['p50_ms']} ms)" for source, v in p["by_source"].items()
            )
            non_200 = sum(n for code, n in p["statuses"].items() if code != "200")
            lines.append(
                f"| {row['config']} | {p['clients']} | {p['p50_ms']} | {p['p99_ms']} | {p['rps']} | "
                f"{p['p50_ms'] / ref['p50_ms']:.2f} | "
                f"{p['p99_ms'] / ref['p99_ms']:.2f} | {p['rps'] / ref['rps']:.2f} | {sources} | {non_200} |"
            )
    lines += [
        "",
        "Why the student's answer stood where the teacher was asked (`fallback_error`, numbers as N):",
        "",
        "| fallback | clients | fallback_error | requests |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row['config']} | {p['clients']} | `{error}` | {count} |"
        for row in result["rows"]
        for p in row["points"]
        for error, count in p["fallback_errors"].items()
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, clients = result["rows"], [p["clients"] for p in result["rows"][0]["points"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(rows)
    for metric, ax, label in (
        ("p50_ms", axes[0], "p50 latency, ms"),
        ("p99_ms", axes[1], "p99 latency, ms (log)"),
        ("rps", axes[2], "requests per second"),
    ):
        for i, row in enumerate(rows):
            ax.bar(
                [c + i * width for c in range(len(clients))],
                [p[metric] for p in row["points"]],
                width,
                label=row["config"],
            )
        ax.set_xticks(
            [c + width * (len(rows) - 1) / 2 for c in range(len(clients))],
            [f"{c} client{'s' if c > 1 else ''}" for c in clients],
        )
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"stepwise serve with a teacher fallback (~{SHARE:.0%} of requests), "
        "tiny student + tiny teacher on vLLM CPU; shared 2-core machine",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    concurrency: Sequence[int] = (1, 16),
    requests: int = 200,
    rounds: int = 3,
    train_steps: int = 100,
    workdir: Path = Path("runs/bench-fallback"),
    out: Path = RESULTS / "fallback",
) -> Path:
    """Served p50/p99 and throughput with the teacher fallback off, on (~10% of requests) and with a dead teacher.

    Args:
        concurrency: concurrent clients per point
        requests: requests per point and round (the inputs in turn)
        rounds: rounds over every configuration and concurrency, taking turns; a point pools its rounds
        train_steps: training steps of the tiny student (its margins must spread for a 10% share to exist)
        workdir: the student, the teacher and the servers' run folders
        out: result files (.json, .md, .png) without suffix
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    export = trained_export(workdir, train_steps)
    examples, bodies = request_bodies(200)
    calibration, unsure = calibrate(export, examples)
    print(f"[bench] calibration: {calibration}", flush=True)
    with bench_lock(), ExitStack() as running:
        teacher_model = build_teacher(workdir)
        teacher_url = running.enter_context(
            vllm_openai_server(teacher_model, workdir / "teacher-server", python=envs.venv_python("teacher"))
        )
        alone = teacher_alone(teacher_url, unsure)
        print(f"[bench] teacher alone: {alone}", flush=True)
        common = {
            "fallback_margin": calibration["margin"],
            "fallback_model": "tiny",
            "fallback_max_tokens": TEACHER_TOKENS,
        }
        dead = f"http://127.0.0.1:{free_port()}"
        configs = {
            "off": FallbackOptions(),
            "on (vLLM tiny teacher)": FallbackOptions(fallback=teacher_url, **common),
            "dead teacher URL": FallbackOptions(fallback=dead, **common),
            "dead teacher URL, no cooldown": FallbackOptions(fallback=dead, fallback_cooldown_s=0, **common),
        }
        running.callback(lifecycle.stop)
        urls = start_apps(export, workdir, configs)
        rows = measure(urls, bodies, concurrency, requests, rounds)
        for row in rows:
            row["fallback"] = dataclasses.asdict(configs[row["config"]])
    result = {
        "command": command_line(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other work: compare rows of one run",
        "student": f"tiny T5 (1.3M parameters) trained {train_steps} steps on e-SNLI, fp32 ONNX, "
        "one replica per configuration (0.5 CPU reserved), 1 ONNX Runtime thread",
        "teacher": "the tiny random Llama-shaped teacher (2 layers, hidden 128) on vLLM's OpenAI server, "
        "CPU, 1 thread, structured output, "
        f"up to {TEACHER_TOKENS} tokens",
        "requests_per_point": requests * rounds,
        "rounds": rounds,
        "calibration": calibration,
        "teacher_alone": alone,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    artifacts.write_json(out.with_suffix(".json"), result)
    artifacts.write_atomic(out.with_suffix(".md"), table)
    plot(result, out.with_suffix(".png"))
    print(table)
    return out.with_suffix(".json")
