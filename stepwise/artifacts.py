"""The artifact contract: the folders the stages hand each other, their file names, and the one way to
write and read them. Standard library only (pyarrow for Parquet shards), so it imports in both environments.

    extraction folder   manifest.json, task.json, shard-<hash>.jsonl | shard-<hash>.parquet, .extract.lock (the
                        lock a run holds while it writes), README.md (the dataset card, stepwise.cards)
    model folder        Hugging Face model files, task.json, train_config.json, metrics.json, log.csv, README.md
                        (the model card; checkpoint/ while a run is unfinished; tensorboard/ with --report-to)
    export folder       *.onnx, tokenizer files, task.json, train_config.json, export_config.json, parity.json,
                        README.md (the model card); cascade_settings.json once `stepwise cascade --target-share`
                        (or --target-accuracy) has calibrated the served fallback's margin on it

Every file is written whole or not at all (`write_atomic`): a reader, or a rerun after kill -9, never sees
half of one. An extraction folder may also be a prefix on an object store (`s3://bucket/prefix`,
`stepwise.storage`): its files are then objects, each uploaded whole, and the readers here take either.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from stepwise import storage
from stepwise.storage import fsync_dir

TASK = "task.json"
MANIFEST = "manifest.json"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.json"
TRAIN_LOG = "log.csv"
CHECKPOINT = "checkpoint"
EXPORT_CONFIG = "export_config.json"
PARITY = "parity.json"
CASCADE_SETTINGS = "cascade_settings.json"  # the calibrated fallback margin, written after the export
EXTRACT_LOCK = ".extract.lock"  # held (flock) by the one `stepwise extract` run writing a folder
TRAIN_LOCK = ".train.lock"  # held by the one `stepwise train` run writing a model folder
SHARD_FORMATS = ("jsonl", "parquet")
JSON_TEXT_IN_PARQUET = ("votes", "teacher")  # nested dicts whose keys vary: JSON text columns in Parquet


# ---------------------------------------------------------------- writing


def write_atomic(path: str | Path, data: str | bytes) -> str | Path:
    """Write `data` to `path` so that a reader (or a restart after kill -9) sees all of it or nothing (a file:
    temp file, fsync, rename; an object store's upload is whole by itself, so `path` may be a URI)."""
    storage.write_bytes(path, data.encode() if isinstance(data, str) else data)
    return path


def write_json(path: str | Path, data: Any) -> str | Path:
    return write_atomic(path, json_text(data))


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, files before the folders holding them."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_dir():
            fsync_dir(path)
        else:
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def commit_folder(staging: Path, final: Path) -> Path:
    """Give a fully written `staging` folder its `final` name (which must not exist) in one rename, after
    fsyncing every file in it: a reader, or a restart after kill -9, sees the whole folder or none of it."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or filesystem
    cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def previous_name(final: Path) -> Path:
    return Path(final).with_name(f".{Path(final).name}.previous")


def replace_folder(staging: Path, final: Path) -> Path:
    """`commit_folder` onto a `final` that may already exist: the two folders swap in one step, so `final`
    is always a whole folder, old or new; then the old one is removed. Without an atomic swap, `final` moves
    aside to .<name>.previous first, and `recover_previous` puts it back after a kill between the two renames."""
    staging, final = Path(staging), Path(final)
    if not final.exists():
        return commit_folder(staging, final)
    fsync_tree(staging)
    if _exchange(staging, final):
        fsync_dir(final.parent)
        _remove_tree(staging)  # the old folder, under the staging name now
        return final
    previous = previous_name(final)
    _remove_tree(previous)
    os.rename(final, previous)
    os.rename(staging, final)
    fsync_dir(final.parent)
    _remove_tree(previous)
    return final


def recover_previous(final: Path) -> bool:
    """After a kill between `replace_folder`'s two renames, `final` is missing and the old folder waits as
    .<name>.previous: put it back (True). A leftover beside a present `final` is only removed."""
    previous = previous_name(final)
    if not previous.exists():
        return False
    if Path(final).exists():
        _remove_tree(previous)
        return False
    os.rename(previous, final)
    fsync_dir(Path(final).parent)
    return True


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def move_files_into(committed: Path, target: Path) -> None:
    """Move the files of a committed folder (`commit_folder`) into `target`, replacing same-named files one
    atomic rename each, then remove the folder. Idempotent: rerun after a kill in the middle, it finishes the
    move, so `target` ends up with the whole new set, never a truncated file."""
    committed, target = Path(committed), Path(target)
    for path in sorted(p for p in committed.rglob("*") if p.is_file()):
        destination = target / path.relative_to(committed)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    fsync_dir(target)
    for folder in sorted((p for p in committed.rglob("*") if p.is_dir()), reverse=True):
        folder.rmdir()
    committed.rmdir()
    fsync_dir(target)


def remove_partial_files(folder: Path) -> None:
    """Temp files of a write that a kill interrupted."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- one run per folder


@contextmanager
def folder_lock(lock: Path, command: str, folder: Path, remove: bool = False) -> Iterator[None]:
    """Hold `folder` for one run of `stepwise <command>` through the file `lock`: a second run fails at once,
    naming the first. The lock is the operating system's (flock), so it goes with its process, kill -9
    included; a shared filesystem must support flock for it to hold across machines. `remove`: delete the
    lock file when done (a lock beside the folder, not inside it)."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = lock.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process"
            handle.close()
            raise ValueError(
                f"{folder} is being written by another `stepwise {command}` ({holder}); wait for it to finish, "
                "or choose another --out"
            ) from None
        if lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # its holder removed the file between our open and our lock: lock the file there now
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        if remove:
            lock.unlink(missing_ok=True)
        handle.close()  # closing the file releases the lock


def lock_holder(lock: Path) -> str:
    """Who holds `lock` now ("" when nobody does, or there is no such file)."""
    try:
        handle = Path(lock).open("r")
    except FileNotFoundError:
        return ""
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return ""
        except BlockingIOError:
            return handle.read().strip() or "a process"


# ---------------------------------------------------------------- typed readers


class Manifest(TypedDict):
    config: dict[str, Any]  # everything that changes what a record says (task, split, teacher, sampling, prompt)
    config_hash: str
    expected_records: int
    shards: int
    counts: dict[str, Any]  # records, ok, malformed, error, parse_rate, teacher_accuracy, tokens_in/out, ...
    complete: bool
    last_run: dict[str, Any] | None


def whole_manifest(records: int, config: dict[str, Any]) -> Manifest:
    """The manifest of an extraction folder written whole in one go (no teacher run: a test's, a converter's)."""
    return {
        "config": config,
        "config_hash": "",
        "expected_records": records,
        "shards": 1,
        "counts": {"records": records},
        "complete": True,
        "last_run": None,
    }


class Metrics(TypedDict):
    task: str
    mode: str
    steps: int
    train_minutes: float
    best_step: int
    train_examples: dict[str, int]
    valid: dict[str, Any]  # accuracy, examples
    test: dict[str, Any] | None


class ParityReport(TypedDict):
    passed: bool
    skipped: bool
    examples: int
    served_path: str  # "fast_path" or "greedy"
    greedy_agreement: float
    fast_path_agreement: float | None
    accuracy_pytorch: float
    accuracy_onnx: float
    accuracy_delta: float
    max_abs_logit_diff: float
    failures: list[str]


class TrainConfig(TypedDict):
    """What train_config.json holds that later stages read (it records every option that changes what is learned;
    `stepwise.training.train.train_config` writes it)."""

    task: str
    student: str
    mode: str
    max_input_tokens: int  # input tokens the student learned from: export's default input limit
    max_target_tokens: int  # label and rationale tokens: export's default rationale limit


# train_config.json keys renamed since (the option's old name -> its name now); folders written before still read.
RENAMED_SETTINGS = {"max_input_length": "max_input_tokens", "max_target_length": "max_target_tokens"}


def current_settings(config: dict) -> dict:
    """A train_config.json's settings under today's names (a run folder trained by an earlier stepwise)."""
    return {RENAMED_SETTINGS.get(key, key): value for key, value in config.items()}


# T5's pretraining input length: the input limit of an exported checkpoint that brings no train_config.json.
T5_MAX_INPUT_TOKENS = 512


class ExportConfig(TypedDict):
    model_id: str
    version: str
    target: str  # cpu, cuda, tensorrt
    precision: str  # fp32, fp16, int8
    decoder_layout: str  # split or merged
    files: dict[str, str]  # encoder, decoder, decoder_with_past -> file name
    providers: list[dict[str, Any]]
    model: dict[str, Any]  # d_model, num_heads, d_kv, num_decoder_layers, vocab_size, special token ids
    max_input_tokens: int
    max_new_tokens: dict[str, int]  # label, rationale


class CascadeSettings(TypedDict):
    """The served fallback's margin, calibrated on a held-out split (`stepwise cascade --target-share`)."""

    target: dict[str, float]  # {"share": 0.1} or {"accuracy": 0.6}: what it was calibrated for
    threshold: float  # predictions whose margin is below it go to the teacher
    share: float  # the share of the calibration split below the threshold
    accuracy: float  # the cascade's accuracy on the calibration split at that share
    split: str
    examples: int
    teacher: str  # whose answers scored the accuracy
    version: str  # the export's version (export_config.json) it was calibrated on


class ParityFailed(Exception):
    """An export that did not match its PyTorch model; carries the parity report that says how."""

    def __init__(self, folder: Path, report: ParityReport):
        self.folder, self.report = Path(folder), report
        super().__init__(f"parity gate failed ({folder / PARITY}): " + "; ".join(report["failures"]))


Typed = TypeVar("Typed", Manifest, Metrics, ParityReport, TrainConfig, ExportConfig, CascadeSettings)


def read_json(path: str | Path, what: str) -> Any:
    """A JSON artifact (a file, or an object at a URI); a missing or unreadable one is an error that says what the
    file should have been."""
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:
        folder, name = str(path).rsplit("/", 1)
        raise FileNotFoundError(f"{folder} has no {name}: {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as problem:
        raise ValueError(f"{path} is not valid JSON ({problem.msg} at line {problem.lineno}): {what}") from None


def _read_typed(folder: str | Path, name: str, kind: type[Typed], what: str) -> Typed:
    path = storage.join(folder, name)
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object: {what}")
    data = current_settings(data) if name == TRAIN_CONFIG else data
    missing = sorted(set(kind.__required_keys__) - set(data))
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: {what} (written by another stepwise version?)")
    return data


def read_manifest(folder: str | Path) -> Manifest:
    return _read_typed(folder, MANIFEST, Manifest, "not an extraction folder (run `stepwise extract` first)")


def read_metrics(folder: Path) -> Metrics:
    return _read_typed(folder, METRICS, Metrics, "not a finished training run (run `stepwise train` first)")


def read_parity(folder: Path) -> ParityReport:
    return _read_typed(
        folder, PARITY, ParityReport, "an export folder without a parity report (rerun `stepwise export`)"
    )


def read_train_config(folder: str | Path) -> TrainConfig | None:
    """A training run's settings (a local folder or a prefix on an object store); None for a model folder from
    elsewhere (a checkpoint stepwise did not train)."""
    if not storage.exists(storage.join(folder, TRAIN_CONFIG)):
        return None
    return _read_typed(folder, TRAIN_CONFIG, TrainConfig, "a training run's settings (written by `stepwise train`)")


def read_export_config(folder: Path) -> ExportConfig:
    return _read_typed(folder, EXPORT_CONFIG, ExportConfig, "not a folder written by `stepwise export`")


def read_cascade_settings(folder: str | Path) -> CascadeSettings | None:
    """An export's calibrated fallback margin (a local folder or a prefix on an object store); None when it has
    none."""
    if not storage.exists(storage.join(folder, CASCADE_SETTINGS)):
        return None
    return _read_typed(folder, CASCADE_SETTINGS, CascadeSettings, "an export's calibrated fallback margin")


def write_cascade_settings(folder: str | Path, settings: CascadeSettings) -> str | Path:
    """Write `settings` into an export folder, local or on an object store (its checksum list then names the new
    file too, so the servers' caches fetch the folder anew). The export's version hashes its ONNX files only, so it
    stays; a local folder that carries a checksum list (a downloaded or uploaded copy) gets it recomputed, so that
    every file, this one included, is still covered and an upload of the folder takes it along."""
    if storage.is_remote(folder):
        storage.add_file(str(folder), CASCADE_SETTINGS, (json.dumps(settings, indent=2) + "\n").encode())
        return storage.join(folder, CASCADE_SETTINGS)
    folder = Path(folder)
    write_json(folder / CASCADE_SETTINGS, settings)
    if (folder / storage.CHECKSUMS).exists():
        storage.write_checksums(folder)
    return folder / CASCADE_SETTINGS


# ---------------------------------------------------------------- extraction records


def shard_paths(folder: str | Path) -> list[Any]:
    """The shard files of an extraction folder (Paths), or its shard objects (URIs) on an object store."""
    if storage.is_remote(folder):
        names = storage.list_files(str(folder))
        return [storage.join(folder, n) for n in names if "/" not in n and is_shard_name(n)]
    return sorted(p for fmt in SHARD_FORMATS for p in Path(folder).glob(f"shard-*.{fmt}"))


def is_shard_name(name: str) -> bool:
    return name.startswith("shard-") and name.rsplit(".", 1)[-1] in SHARD_FORMATS


def iter_records(folder: str | Path) -> Iterator[dict]:
    """Every record of an extraction folder's shards (JSONL, or Parquet with its JSON text columns decoded)."""
    for path in shard_paths(folder):
        yield from read_shard(path)


def read_shard(path: str | Path) -> Iterator[dict]:
    """The records of one shard file (or object), read whole: a shard holds one chunk."""
    data = storage.read_bytes(path)
    if str(path).endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            folder = str(path).rsplit("/", 1)[0]
            missing = f"{folder} holds Parquet shards but pyarrow is not installed in this environment"
            raise ImportError(missing) from None
        for row in pq.read_table(pa.BufferReader(data)).to_pylist():
            yield {k: json.loads(v) if k in JSON_TEXT_IN_PARQUET and isinstance(v, str) else v for k, v in row.items()}
        return
    for number, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as problem:
            raise ValueError(f"{path}:{number}: not a JSON record ({problem.msg})") from None


def read_records(folder: str | Path) -> list[dict]:
    """All records of an extraction folder, local or on an object store (see `stepwise.extraction` for their
    fields)."""
    if not storage.is_remote(folder) and not Path(folder).is_dir():
        raise FileNotFoundError(f"extraction folder {folder} does not exist (run `stepwise extract` first)")
    if not storage.exists(storage.join(folder, MANIFEST)):
        raise FileNotFoundError(f"{folder} is not an extraction folder: no {MANIFEST} (run `stepwise extract` first)")
    return list(iter_records(folder))
