"""Helpers shared by the serving tests (imported by name: pytest puts this folder on the path)."""

from __future__ import annotations

import time

import httpx

from stepwise import tasks


def premise_hypothesis(example: tasks.Example) -> dict[str, str]:
    premise, hypothesis = example.input.removeprefix("Premise: ").split("\nHypothesis: ")
    return {"premise": premise, "hypothesis": hypothesis}


def metric_samples(metrics_text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` whose labels include `labels` (Prometheus text format)."""
    samples = []
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
        found = dict(part.split("=", 1) for part in label_text.split('",') if "=" in part)
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            samples.append((found, float(value)))
    return samples


def wait_for_metric(
    url: str, name: str, total: float | None = None, **labels: str
) -> list[tuple[dict[str, str], float]]:
    """Samples of a metric once Ray has exported them (every second or so), or [] after 30 s; with `total`, once
    their sum has reached it (Ray exports counters as they are at each interval), or the last ones seen."""
    samples = []
    for _ in range(60):
        samples = metric_samples(httpx.get(url, timeout=10).text, name, **labels)
        if samples and (total is None or sum(v for _, v in samples) >= total):
            return samples
        time.sleep(0.5)
    return samples
