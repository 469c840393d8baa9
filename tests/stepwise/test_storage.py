"""Object storage through stepwise.storage against a real S3 server on loopback (moto): one-line errors for bad
locations, conditional writes, folders uploaded and downloaded whole with checksums, the content-keyed cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stepwise import storage

from helpers import ROOT, cli_env


def test_locations_are_parsed_as_users_write_them(tmp_path):
    assert storage.as_location("s3://b/p/") == "s3://b/p" and storage.is_remote("gs://b/p")
    assert storage.as_location(str(tmp_path)) == tmp_path and storage.as_location(f"file://{tmp_path}") == tmp_path
    assert (
        storage.join("s3://b/p", "x", "y.json") == "s3://b/p/x/y.json" and storage.join(tmp_path, "a") == tmp_path / "a"
    )


def test_bad_locations_fail_in_one_line_naming_them(bucket):
    missing = "s3://no-such-bucket-stepwise/run"
    with pytest.raises(
        storage.LocationError, match="s3://no-such-bucket-stepwise/run: bucket no-such-bucket-stepwise does not exist"
    ):
        storage.check_location(missing, "--out")
    with pytest.raises(storage.LocationError, match=r"--out nope://b/x: unknown storage scheme nope://"):
        storage.check_location("nope://b/x", "--out")
    with pytest.raises(storage.LocationError, match=f"--model {bucket}/absent does not exist"):
        storage.check_location(f"{bucket}/absent", "--model", must_exist=True)
    storage.check_location(f"{bucket}/new-run", "--out")  # an existing bucket, nothing there yet: fine


def test_no_credentials_is_a_one_line_error_before_any_request(bucket, tmp_path):
    """In a fresh process without credentials (and no instance role to ask), the error names the location."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("AWS_") or k in ("AWS_ENDPOINT_URL",)}
    env |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none")}  # fmt: skip
    script = f"from stepwise import storage; storage.check_location({bucket + '/x'!r}, '--out')"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and f"--out {bucket}/x: no S3 credentials" in result.stderr


def test_conditional_writes_are_atomic_on_s3(bucket):
    key = f"{bucket}/lock"
    first = storage.write_bytes(key, b"one", if_absent=True)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes(key, b"two", if_absent=True)
    second = storage.write_bytes(key, b"three", if_match=first)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes(key, b"four", if_match=first)  # changed since `first` was read
    assert storage.read_bytes(key) == b"three" and storage.etag(key) == second


def test_a_folder_round_trips_with_checksums_and_a_tampered_file_is_refused(bucket, tmp_path):
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\0" * 3_000_000)
    (folder / "sub" / "config.json").write_text("{}")
    remote = f"{bucket}/exports/one"
    storage.upload_folder(folder, remote)
    assert storage.list_files(remote) == ["checksums.json", "model.onnx", "sub/config.json"]

    cache = tmp_path / "cache"
    local = storage.cached_download(remote, "an export", cache)
    assert (local / "model.onnx").read_bytes() == b"\0" * 3_000_000 and (local / "sub" / "config.json").exists()
    assert storage.cached_download(remote, "an export", cache) == local  # one download per content

    storage.write_bytes(f"{remote}/sub/config.json", b'{"changed": true}')
    with pytest.raises(ValueError, match="sub/config.json does not match its checksum"):
        storage.cached_download(remote, "an export", tmp_path / "cache2")
    assert not list((tmp_path / "cache2").iterdir())  # nothing half-downloaded is left to be served


def test_a_folder_without_checksums_is_not_taken_for_whole(bucket):
    storage.write_bytes(f"{bucket}/half/model.onnx", b"x")
    with pytest.raises(FileNotFoundError, match="has no checksums.json: not a folder a stepwise stage finished"):
        storage.cached_download(f"{bucket}/half", "an export")


def test_a_checksum_list_cannot_write_outside_the_folder(bucket, tmp_path):
    listing = {"files": {"../escaped": "0" * 64}, "digest": "x"}
    storage.write_bytes(f"{bucket}/evil/checksums.json", json.dumps(listing).encode())
    with pytest.raises(ValueError, match="outside the folder"):
        storage.download_folder(f"{bucket}/evil", tmp_path / "in", "an export")
    assert not (tmp_path / "escaped").exists()
