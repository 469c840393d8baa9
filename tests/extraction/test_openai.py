"""The openai backend against a real vLLM OpenAI-compatible server on loopback, and against a dead port."""

from __future__ import annotations

import json

import pytest

from stepwise import cli, tasks
from stepwise.extraction import read_records

from helpers import free_port


@pytest.fixture
def vllm_server(tiny_teacher, start_vllm_server, tmp_path):
    with start_vllm_server(tiny_teacher, tmp_path) as base_url:
        yield base_url


@pytest.mark.slow
def test_openai_backend_against_a_real_vllm_server(vllm_server, tmp_path):
    out = tmp_path / "out"
    cli.main(
        [
            "extract",
            "--task",
            "cqa",
            "--split",
            "valid",
            "--teacher",
            "openai",
            "--model",
            "tiny",
            "--base-url",
            vllm_server,
            "--limit",
            "12",
            "--chunk-size",
            "5",
            "--n",
            "2",
            "--temperature",
            "0.8",
            "--max-tokens",
            "24",
            "--concurrency",
            "4",
            "--out",
            str(out),
        ]
    )
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(
        e.id for e in tasks.load_split(tasks.get_task("cqa"), "valid")[:12]
    )
    for record in records:
        assert record["status"] in ("ok", "malformed") and len(record["completions"]) == 2
        assert record["tokens_in"] > 100 and 0 < record["tokens_out"] <= 48  # the server's usage: 2 samples x 24
        assert record["teacher"]["backend"] == "openai" and record["teacher"]["sampling"]["n"] == 2


def test_unreachable_server_gives_error_records_not_a_crash(tmp_path):
    out = tmp_path / "out"
    cli.main(
        [
            "extract",
            "--task",
            "svamp",
            "--split",
            "valid",
            "--teacher",
            "openai",
            "--model",
            "m",
            "--base-url",
            f"http://127.0.0.1:{free_port()}",
            "--limit",
            "3",
            "--retries",
            "2",
            "--timeout-s",
            "2",
            "--out",
            str(out),
        ]
    )
    records = read_records(out)
    assert len(records) == 3 and {r["status"] for r in records} == {"error"}
    assert all(r["reason"].startswith("server error after 2 retries: ConnectError") for r in records)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["failure_reasons"] == {"server error after 2 retries": 3}
    assert not manifest["complete"]  # error records are still to do: a rerun retries them
