"""The artifact contract's writers: one run per folder (the flock), folders replaced whole."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from stepwise import artifacts


def test_a_second_run_on_a_folder_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    lock = tmp_path / ".run.train.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from stepwise import artifacts
            with artifacts.folder_lock(Path({str(lock)!r}), "train", Path({str(out)!r}), remove=True):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert artifacts.lock_holder(lock) == f"pid {holder.pid}"
        with pytest.raises(
            ValueError, match=rf"{out} is being written by another `stepwise train` \(pid {holder.pid}\)"
        ):
            with artifacts.folder_lock(lock, "train", out):
                pass
    finally:
        holder.kill()  # kill -9: the lock goes with its process
        holder.wait()
    assert artifacts.lock_holder(lock) == ""
    with artifacts.folder_lock(lock, "train", out, remove=True):
        assert artifacts.lock_holder(lock) == f"pid {os.getpid()}"
    assert not lock.exists(), "a lock beside its folder is removed when done"


def test_replacing_a_folder_leaves_a_whole_one_at_every_step(tmp_path):
    final, staging = tmp_path / "export", tmp_path / ".export.staging"
    staging.mkdir()
    (staging / "model.onnx").write_text("first")
    artifacts.replace_folder(staging, final)  # nothing there yet: a plain commit
    assert (final / "model.onnx").read_text() == "first" and not staging.exists()
    staging.mkdir()
    (staging / "model.onnx").write_text("second")
    artifacts.replace_folder(staging, final)  # swapped in one step where the filesystem can
    assert (final / "model.onnx").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "neither the old folder nor a staging one left"


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    """Where there is no atomic swap, the old folder steps aside first: a kill then leaves no `final`, and the
    next run puts the old export back before it does anything else."""
    final = tmp_path / "export"
    previous = artifacts.previous_name(final)
    previous.mkdir()
    (previous / "model.onnx").write_text("old")
    assert artifacts.recover_previous(final) is True
    assert (final / "model.onnx").read_text() == "old" and not previous.exists()
    previous.mkdir()  # a leftover beside a present folder is only removed
    assert artifacts.recover_previous(final) is False and not previous.exists()
    assert (final / "model.onnx").read_text() == "old"


def test_a_failed_write_leaves_no_temp_file_and_the_old_content(tmp_path, monkeypatch):
    path = artifacts.write_atomic(tmp_path / "metrics.json", "old")

    def disk_full(descriptor: int) -> None:  # the data reaches the disk at fsync: where a full disk says so
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        artifacts.write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_typed_artifact_that_is_not_a_json_object_is_named(tmp_path):
    (tmp_path / artifacts.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest.json holds a JSON list, not an object: not an extraction folder"):
        artifacts.read_manifest(tmp_path)


def test_train_config_is_read_typed_and_absent_for_a_checkpoint_from_elsewhere(tmp_path):
    assert artifacts.read_train_config(tmp_path) is None  # a Hugging Face checkpoint stepwise did not train
    settings = {"task": "esnli", "student": "tiny", "mode": "step-by-step", "max_input_tokens": 96}
    artifacts.write_json(tmp_path / artifacts.TRAIN_CONFIG, settings)
    with pytest.raises(ValueError, match=r"train_config.json lacks max_target_tokens: a training run's settings"):
        artifacts.read_train_config(tmp_path)
    artifacts.write_json(tmp_path / artifacts.TRAIN_CONFIG, settings | {"max_target_tokens": 48})
    assert artifacts.read_train_config(tmp_path)["max_input_tokens"] == 96
