"""Where artifacts live: a local folder, or a prefix on an object store (`s3://bucket/prefix`, `gs://bucket/prefix`).

Every stage takes either for its inputs and `--out`. The bytes move through `pyarrow.fs`, the filesystem layer Ray
itself uses (Ray Data, Ray Train's `storage_path`), with `fsspec` for schemes pyarrow lacks; S3's conditional
writes (`If-None-Match`, `If-Match`), which pyarrow does not expose, go through boto3. Credentials come from where
the cloud's own tools look (for S3: the environment, `AWS_PROFILE` and the shared files, a web-identity token, the
container or instance role), never from the command line; `AWS_ENDPOINT_URL` points both at an S3-compatible
server (MinIO, Ceph, or the tests' moto server on loopback).

An object store has no rename: a stage that writes a folder there builds it on local disk and uploads it file by
file with `checksums.json` last (`upload_folder`); a reader takes the folder only when that file is there and
every file matches it (`download_folder`, `cached_download`). Standard library at import (pyarrow and boto3 are
imported when a remote location is used), so it imports in both environments.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHECKSUMS = "checksums.json"  # {"files": {relative path: sha256}, "digest": sha256 of that mapping}
PYARROW_SCHEMES = ("s3", "gs", "gcs")  # pyarrow.fs has these; any other scheme goes to fsspec if it knows it


class LocationError(ValueError):
    """A location that cannot be used (unknown scheme, missing bucket, no credentials); raised before any work."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (`if_absent`) or changed since it was read (`if_match`)."""


# ---------------------------------------------------------------- locations


def is_remote(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def scheme(location: str) -> str:
    return str(location).split("://", 1)[0].lower()


def bucket(location: str) -> str:
    return str(location).split("://", 1)[1].split("/", 1)[0]


def join(location: str | Path, *parts: str) -> str | Path:
    """`location/part/...`, a URI for a remote location and a Path for a local one."""
    if not is_remote(location):
        return Path(location).joinpath(*parts)
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def as_location(text: str | Path) -> str | Path:
    """What a user typed as a location: a URI stays a string, anything else becomes a Path."""
    text = str(text)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return text.rstrip("/") if is_remote(text) else Path(text)


@functools.cache
def _filesystem_for(scheme_name: str, bucket_name: str) -> Any:
    if scheme_name in PYARROW_SCHEMES:
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(f"{scheme_name}://{bucket_name}")[0]
    try:
        import fsspec
        import pyarrow.fs
    except ImportError:
        raise LocationError(f"{scheme_name}:// needs fsspec, which this environment lacks") from None
    try:
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec.filesystem(scheme_name)))
    except (ImportError, ValueError) as problem:  # fsspec names the missing package (s3fs, adlfs, ...)
        raise LocationError(f"{scheme_name}:// is not a storage scheme stepwise can use here: {problem}") from None


def filesystem(location: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a remote location and the location's path inside it (`bucket/prefix`)."""
    path = str(location).split("://", 1)[1].rstrip("/")
    return _filesystem_for(scheme(location), bucket(location)), path


def check_location(location: str | Path, what: str, must_exist: bool = False) -> None:
    """Fail in one line naming `location` unless it can be used: a known scheme, credentials, an existing bucket,
    and (`must_exist`) something there. Called by each stage before any work starts."""
    if not is_remote(location):
        if must_exist and not Path(location).exists():
            raise LocationError(f"{what} {location} does not exist")
        return
    location = str(location)
    known = scheme(location) in PYARROW_SCHEMES or _fsspec_knows(scheme(location))
    if not known or not bucket(location):
        raise LocationError(
            f"{what} {location}: unknown storage scheme {scheme(location)}:// (stepwise reads and writes local "
            "folders, s3://bucket/prefix and gs://bucket/prefix)"
        )
    if scheme(location) == "s3":
        _check_s3(location, what)
    try:
        fs, path = filesystem(location)
        info = fs.get_file_info(path)
    except OSError as problem:
        raise LocationError(f"{what} {location}: {_first_line(problem)}") from None
    if must_exist and info.type.name == "NotFound":
        raise LocationError(f"{what} {location} does not exist")


def _fsspec_knows(scheme_name: str) -> bool:
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        return False
    return scheme_name in known_implementations


def _check_s3(location: str, what: str) -> None:
    import boto3
    import botocore.exceptions

    if boto3.Session().get_credentials() is None:
        raise LocationError(
            f"{what} {location}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE, in the environment, or run with an instance or pod role)"
        )
    try:
        _s3_client().head_bucket(Bucket=bucket(location))
    except botocore.exceptions.ClientError as problem:
        code = problem.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise LocationError(f"{what} {location}: bucket {bucket(location)} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise LocationError(f"{what} {location}: access to bucket {bucket(location)} denied ({code})") from None
        raise LocationError(f"{what} {location}: {_first_line(problem)}") from None
    except botocore.exceptions.BotoCoreError as problem:  # endpoint unreachable, bad endpoint URL
        raise LocationError(f"{what} {location}: {_first_line(problem)}") from None


def _first_line(problem: BaseException) -> str:
    return str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__


@functools.cache
def _s3_client() -> Any:
    import boto3

    return boto3.client("s3")


# ---------------------------------------------------------------- objects


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    return fs.get_file_info(path).type.name != "NotFound"


def read_bytes(location: str | Path) -> bytes:
    if not is_remote(location):
        try:
            return Path(location).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{location} does not exist") from None
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} does not exist") from None


def write_bytes(location: str | Path, data: bytes, if_absent: bool = False, if_match: str | None = None) -> str | None:
    """Write one object whole (an upload is visible complete or not at all; a local file is written atomically);
    return its ETag where the store gives one. `if_absent`: only if no object is there; `if_match`: only if the
    object still has that ETag. A lost condition raises PreconditionFailed. Conditions are atomic on S3; on other
    stores they are checked just before the write (stated in extraction/README.md)."""
    if not is_remote(location):
        if if_absent and Path(location).exists():
            raise PreconditionFailed(location)
        _write_file_atomic(Path(location), data)
        return None
    if scheme(location) == "s3" and (if_absent or if_match):
        import botocore.exceptions

        key = str(location).split("://", 1)[1].split("/", 1)[1]
        condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
        try:
            reply = _s3_client().put_object(Bucket=bucket(location), Key=key, Body=data, **condition)
        except botocore.exceptions.ClientError as problem:
            if problem.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise PreconditionFailed(location) from None
            raise
        return reply.get("ETag")
    if if_absent and exists(location):
        raise PreconditionFailed(location)
    if if_match is not None and etag(location) != if_match:
        raise PreconditionFailed(location)
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
    return etag(location) if scheme(location) == "s3" else None


def _write_file_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a Ctrl-C: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def etag(location: str | Path) -> str | None:
    """The object's ETag (S3), None elsewhere or when it does not exist."""
    if scheme(location) != "s3":
        return None
    import botocore.exceptions

    key = str(location).split("://", 1)[1].split("/", 1)[1]
    try:
        return _s3_client().head_object(Bucket=bucket(location), Key=key)["ETag"]
    except botocore.exceptions.ClientError:
        return None


def delete(location: str | Path) -> None:
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(location: str | Path) -> list[str]:
    """Paths of every file under a folder, or every object under a remote prefix, relative to it, sorted."""
    if not is_remote(location):
        folder = Path(location)
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    import pyarrow.fs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(info.path[len(path) + 1 :] for info in infos if info.type == pyarrow.fs.FileType.File)


def delete_prefix(location: str) -> None:
    for name in list_files(location):
        delete(str(join(location, name)))


# ---------------------------------------------------------------- folders


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, Any]:
    """`checksums.json`'s content for a local folder: every file's sha256, and one digest over them all that names
    the folder's content (the cache key of `cached_download`)."""
    files = {
        str(p.relative_to(folder)): file_digest(p)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    return {"files": files, "digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def write_checksums(folder: Path) -> dict[str, Any]:
    checksums = folder_checksums(folder)
    _write_file_atomic(Path(folder) / CHECKSUMS, (json.dumps(checksums, indent=2) + "\n").encode())
    return checksums


def upload_folder(folder: Path, location: str) -> None:
    """Upload a finished local folder to `location`, replacing what was there: `checksums.json` goes first out
    (so a reader never takes a half-replaced folder for whole) and last in, once every file is up."""
    checksums = write_checksums(folder)
    delete(str(join(location, CHECKSUMS)))
    upload_files(folder, checksums["files"], location)
    stale = set(list_files(location)) - set(checksums["files"]) - {CHECKSUMS}
    for name in stale:
        delete(str(join(location, name)))
    write_bytes(str(join(location, CHECKSUMS)), (Path(folder) / CHECKSUMS).read_bytes())


def add_file(location: str, name: str, data: bytes) -> None:
    """Put one more file into a folder `upload_folder` wrote, and its checksum into the folder's `checksums.json`
    after it: a reader never sees a listed file missing, and `cached_download` fetches the changed folder anew."""
    checksums = read_checksums(location, f"adding {name}")
    write_bytes(str(join(location, name)), data)
    files = checksums["files"] | {name: hashlib.sha256(data).hexdigest()}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    write_bytes(
        str(join(location, CHECKSUMS)), (json.dumps({"files": files, "digest": digest}, indent=2) + "\n").encode()
    )


def upload_files(folder: Path, names: Iterable[str], location: str) -> None:
    """Copy the named files of a local folder to the same names under `location`, each one whole object."""
    for name in names:
        fs, path = filesystem(str(join(location, name)))
        with (Path(folder) / name).open("rb") as source, fs.open_output_stream(path) as target:
            shutil.copyfileobj(source, target, 1 << 20)


def download_files(location: str, folder: Path, names: Iterable[str]) -> None:
    """Copy the named objects under `location` into the same names in a local folder, each written atomically."""
    for name in names:
        _write_file_atomic(_inside(Path(folder), name, location), read_bytes(str(join(location, name))))


def read_checksums(location: str, what: str) -> dict[str, Any]:
    try:
        checksums = json.loads(read_bytes(str(join(location, CHECKSUMS))))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{location} has no {CHECKSUMS}: not a folder a stepwise stage finished uploading ({what})"
        ) from None
    except json.JSONDecodeError:
        raise ValueError(f"{location}/{CHECKSUMS} is not valid JSON ({what})") from None
    if not isinstance(checksums, dict) or not isinstance(checksums.get("files"), dict):
        raise ValueError(f"{location}/{CHECKSUMS} is not a checksum list ({what})")
    return checksums


def download_folder(location: str, target: Path, what: str) -> Path:
    """Download a folder `upload_folder` wrote into local `target` (created), verifying every file against its
    checksum; a mismatch is an error naming the file, and nothing is left in `target` then."""
    checksums = read_checksums(location, what)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        for name, expected in checksums["files"].items():
            local = _inside(target, name, location)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs, path = filesystem(str(join(location, name)))
            with fs.open_input_stream(path) as source, local.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            if file_digest(local) != expected:
                raise ValueError(
                    f"{location}/{name} does not match its checksum in {CHECKSUMS} (changed or corrupted after "
                    f"upload): refusing {what}"
                )
        (target / CHECKSUMS).write_text(json.dumps(checksums, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _inside(folder: Path, name: str, location: str) -> Path:
    """`folder/name`, refusing a name from a checksum list that would land outside `folder`."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{location}/{CHECKSUMS} names {name!r}, outside the folder: refusing it")
    return path


def local_folder(location: str | Path, what: str) -> Path:
    """A folder to read from this machine: a local one as it is (absolute), a remote one through the cache."""
    location = as_location(location)
    if is_remote(location):
        return cached_download(str(location), what)
    return Path(location).expanduser().resolve()


@functools.cache
def mirror(location: str) -> Path:
    """A local copy of an input on an object store, made once per process: one object (with the task files a
    custom dataset may have beside it, `<stem>.task.json` / `.task.toml`) or every object under a prefix (a folder
    of split files). Kept at `cache/inputs/<hash of the location>/<its name>`, replaced on each new process."""
    location = str(as_location(location))
    name = location.rsplit("/", 1)[-1]
    local = cache_root() / "inputs" / hashlib.sha256(location.encode()).hexdigest()[:16] / name
    shutil.rmtree(local.parent, ignore_errors=True)
    fs, path = filesystem(location)
    if fs.get_file_info(path).type.name == "File":  # one object
        stem = location.rsplit(".", 1)[0] if "." in name else location
        task_files = [f"{stem}.task.json", f"{stem}.task.toml"]
        for source in [location, *(f for f in task_files if exists(f))]:
            _write_file_atomic(local.parent / source.rsplit("/", 1)[-1], read_bytes(source))
        return local
    names = list_files(location)
    if not names:
        raise FileNotFoundError(f"{location} does not exist")
    download_files(location, local, names)
    return local


def working_folder(location: str | Path) -> Path:
    """The local folder a stage writes a remote output in before it uploads it, the same for the same location
    (a rerun on this machine finds its checkpoints there): `cache/runs/<hash of the location>`."""
    return cache_root() / "runs" / hashlib.sha256(str(as_location(location)).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where downloaded folders are kept, keyed by content (`STEPWISE_CACHE`, default ~/.cache/stepwise)."""
    return Path(os.environ.get("STEPWISE_CACHE", Path.home() / ".cache" / "stepwise"))


def cached_download(location: str, what: str, cache: Path | None = None) -> Path:
    """A local copy of a remote folder, downloaded once per content: `cache/<digest>/`, reused while its files still
    match (a second replica on the node, a restart), downloaded again when the folder changed upstream."""
    checksums = read_checksums(location, what)
    digest = hashlib.sha256(json.dumps(checksums["files"], sort_keys=True).encode()).hexdigest()
    final = Path(cache or cache_root()) / digest
    if final.is_dir() and folder_checksums(final)["files"] == checksums["files"]:
        return final
    staging = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    download_folder(location, staging, what)
    if final.exists():  # another process got there first, or a stale copy: replace it
        shutil.rmtree(final, ignore_errors=True)
    try:  # one rename, no fsync: every use checks the copy against its checksums, a torn one is fetched again
        os.rename(staging, final)
    except OSError:  # another replica committed the same content meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return final
