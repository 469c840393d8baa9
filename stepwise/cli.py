"""`stepwise <stage> ...`: one command; each stage's options come from its typed function signature.

Standard library only at import time. A stage runs in the environment it belongs to: when called from
another interpreter (the system `python3`, or the other venv), the command re-executes itself there,
creating the environment on first use. `stepwise demo` and `stepwise bench <name>` run the checkout's
benchmarks/ folder (not installed) the same way.
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, get_args, get_origin

from stepwise import artifacts, envs, progress, storage

# stage -> (module, function, environment). Only stages that exist are listed.
STAGES: dict[str, tuple[str, str, str]] = {
    "data": ("stepwise.data_report", "main", "student"),
    "demo": ("benchmarks.demo", "main", "student"),
    "export": ("stepwise.export.run", "main", "student"),
    "serve": ("stepwise.serving.run", "main", "student"),
    "cascade": ("stepwise.serving.cascade", "main", "student"),
    "extract": ("stepwise.extraction.run", "main", "teacher"),
    "train": ("stepwise.training.train", "main", "student"),
    "experiment": ("stepwise.training.experiment", "main", "student"),
}
# `stepwise bench <name>` -> (module, environment); it runs the module's `main`. benchmarks/ (the benchmarks and the
# demo) is not installed: these need a source checkout.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "export": ("benchmarks.export", "student"),
    "label-memory": ("benchmarks.label_memory", "student"),
    "storage": ("benchmarks.storage", "student"),
    "cluster": ("benchmarks.cluster", "student"),
    "serving": ("benchmarks.serving", "student"),
    "extraction": ("benchmarks.extraction", "teacher"),
    "training-grid": ("benchmarks.training_grid", "student"),
    "training-scale": ("benchmarks.training_scale", "student"),
    "training-memory": ("benchmarks.training_memory", "student"),
    "fallback": ("benchmarks.fallback", "student"),
    "gpu-train-check": ("benchmarks.gpu_train_check", "student"),
    "gpu": ("benchmarks.gpu", "student"),
}
CHECKOUT_PACKAGE = "benchmarks"


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _doc_args(fn: Callable) -> dict[str, str]:
    """Per-parameter help from a Google-style `Args:` section."""
    helps: dict[str, str] = {}
    in_args, current = False, None
    for line in (inspect.getdoc(fn) or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if in_args:
            if not stripped:
                break
            if line.startswith("    ") and not line.startswith("        ") and ":" in stripped:
                current, text = stripped.split(":", 1)
                helps[current.strip()] = text.strip()
            elif current:
                helps[current] += " " + stripped
    return helps


class Option(NamedTuple):
    name: str  # the keyword (and, with dashes, the flag)
    hint: Any
    default: Any  # inspect.Parameter.empty when required
    help: str
    group: str | None  # the dataclass parameter this option fills, if any


def options_of(fn: Callable) -> list[Option]:
    """Every option of `fn`: one per plain parameter, and one per field of a dataclass parameter (an
    argument group: several related options that validate themselves together)."""
    helps = _doc_args(fn)
    hints = typing.get_type_hints(fn)
    found = []
    for name, param in inspect.signature(fn).parameters.items():
        hint = _unwrap_optional(hints.get(name, str))
        if dataclasses.is_dataclass(hint):
            field_helps, field_hints = _doc_args(hint), typing.get_type_hints(hint)
            for field in dataclasses.fields(hint):
                default = (
                    field.default
                    if field.default is not dataclasses.MISSING
                    else (
                        field.default_factory()
                        if field.default_factory is not dataclasses.MISSING
                        else inspect.Parameter.empty
                    )
                )
                found.append(
                    Option(
                        field.name,
                        _unwrap_optional(field_hints[field.name]),
                        default,
                        field_helps.get(field.name, " "),
                        name,
                    )
                )
        else:
            found.append(Option(name, hint, param.default, helps.get(name, " "), None))
    return found


def _is_location(hint: Any) -> bool:
    """`str | Path` in a signature: a local folder or an object-store URI (`stepwise.storage`)."""
    return get_origin(hint) in (typing.Union, types.UnionType) and set(get_args(hint)) - {type(None)} == {str, Path}


def parser_for(fn: Callable, prog: str) -> argparse.ArgumentParser:
    """An argparse parser whose options mirror `fn`'s keyword parameters and type hints (dataclass
    parameters become argument groups)."""
    doc = inspect.getdoc(fn) or ""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # `--conf FILE` would be taken for --config by argparse alone, and ignored
    )
    hints = typing.get_type_hints(fn)
    groups: dict[str, Any] = {}
    for option in options_of(fn):
        if option.group is None:
            where = parser
        else:
            if option.group not in groups:
                group_doc = inspect.getdoc(_unwrap_optional(hints[option.group])) or ""
                groups[option.group] = parser.add_argument_group(option.group, group_doc.split("\n\n")[0])
            where = groups[option.group]
        kwargs: dict[str, Any] = {"dest": option.name, "help": option.help}
        if option.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = option.default
        hint = option.hint
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is Literal:
            kwargs["choices"] = list(get_args(hint))
            kwargs["type"] = type(get_args(hint)[0])
        elif get_origin(hint) in (list, tuple, collections.abc.Sequence):
            # `--x a b` and `--x a --x b` both collect; the default is filled in after parsing, since
            # "extend" would append to a default list instead of replacing it.
            kwargs.update(nargs="+", action="extend", type=get_args(hint)[0] if get_args(hint) else str)
            kwargs.pop("default", None)
        elif _is_location(hint):
            kwargs["type"] = storage.as_location
        else:
            kwargs["type"] = hint
        where.add_argument("--" + option.name.replace("_", "-"), **kwargs)
    parser.add_argument(
        "--config", type=Path, default=None, help="JSON or TOML file whose keys override the defaults above"
    )
    parser.add_argument(
        "--progress",
        choices=progress.MODES,
        default=None,
        help="progress output: a live bar on a terminal, a line every 30 s in a pipe (auto), or always bar/plain/off",
    )
    return parser


def renamed_key(key: str, where: str) -> str:
    """A settings key in today's spelling, with a warning where it is an old one."""
    if key in RENAMED_KEYS:
        print(f"{where}: {key} is deprecated and goes in the next release: use {RENAMED_KEYS[key]}", file=sys.stderr)
        return RENAMED_KEYS[key]
    return key


def read_config(path: Path, fn: Callable) -> dict[str, Any]:
    """Option values from a JSON or TOML file: option names as keys, or a table per argument group holding that
    group's options only (a key under the wrong table is an error naming both)."""
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as problem:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(
            f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {problem}"
        ) from problem
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of options, not {type(data).__name__}")
    return placed_keys(data, {o.name: o.group for o in options_of(fn)}, f"config file {path}")


def placed_keys(data: dict[str, Any], owners: dict[str, str | None], where: str) -> dict[str, Any]:
    """Option name -> value from a table of settings (a config file; a Serve config's `args:`): option names at the
    top level, or a table per argument group holding that group's options only; dashes or underscores. `owners`
    maps each option to its group (None: the top level). An unknown key, or one under another group's table, is an
    error naming `where` and the key."""
    groups = {group for group in owners.values() if group}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = renamed_key(key.replace("-", "_"), where)
        if key in groups and isinstance(value, dict):
            for inner, inner_value in value.items():
                inner = renamed_key(inner.replace("-", "_"), where)
                if inner in owners and owners[inner] != key:
                    home = f"[{owners[inner]}]" if owners[inner] else "the top level"
                    raise ValueError(f"{where}: {inner} is not an option of [{key}]; it belongs at {home}")
                flat[inner] = inner_value
        else:
            flat[key] = value
    unknown = set(flat) - set(owners)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {', '.join(sorted(unknown))}")
    return flat


def call_with_argv(fn: Callable, argv: list[str], prog: str) -> Any:
    return fn(**arguments(fn, argv, prog))


def arguments(fn: Callable, argv: list[str], prog: str = "stepwise") -> dict[str, Any]:
    """`fn`'s keyword arguments from command-line options and an optional --config file, argument groups built
    (and so checked)."""
    parser = parser_for(fn, prog)
    overrides: dict[str, Any] = {}
    # A config file sets defaults; explicit flags still win. The same parser reads where it is (`--config=F` too).
    config_only = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    config_only.add_argument("--config", type=Path, default=None)
    config = config_only.parse_known_args(argv)[0].config
    if config is not None:
        overrides = read_config(config, fn)
        parser.set_defaults(**{k: v for k, v in overrides.items() if not isinstance(v, list)})  # lists: below
        for action in parser._actions:
            if action.dest in overrides:
                action.required = False
    args = vars(parser.parse_args(argv))
    args.pop("config")
    chosen_progress = args.pop("progress")
    if chosen_progress:  # read where the bars are made, in this process and in the workers it starts
        os.environ["STEPWISE_PROGRESS"] = chosen_progress
    kwargs: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for option in options_of(fn):
        value = args[option.name]
        if value is None and (option.name in overrides or option.default is not inspect.Parameter.empty):
            value = overrides.get(option.name, option.default)
        if option.group is None:
            kwargs[option.name] = value
        else:
            grouped.setdefault(option.group, {})[option.name] = value
    hints = typing.get_type_hints(fn)
    for group, values in grouped.items():
        kwargs[group] = _unwrap_optional(hints[group])(**values)  # the group validates itself (ValueError)
    return kwargs


def run_tests(pytest_args: list[str]) -> int:
    """The whole suite: student-side tests in the student env, extraction tests in the teacher env, and the
    shared task layer under both (it must import in either). `--fast` leaves out the tests marked slow (the
    end-to-end runs of real stages); other arguments go to pytest."""
    if "--fast" in pytest_args:
        pytest_args = [a for a in pytest_args if a != "--fast"] + ["-m", "not slow"]
    suites = [
        ("student", ["tests", "--ignore=tests/extraction"]),
        ("teacher", ["tests/extraction", "tests/stepwise"]),
    ]
    env = envs.quiet_runtime_env()
    env["PYTHONPATH"] = str(envs.ROOT)
    failed = 0
    # Both environments first: student-side tests start servers from the teacher's (a vLLM teacher for the cascade).
    pythons = {name: envs.ensure_env(name) for name in envs.ENV_NAMES}
    for name, paths in suites:
        python = pythons[name]
        print(f"[stepwise] running tests in the {name} environment: {' '.join(paths)}", flush=True)
        code = subprocess.run([str(python), "-m", "pytest", *paths, *pytest_args], cwd=envs.ROOT, env=env).returncode
        if code not in (0, 5):  # 5: nothing collected in this half
            failed = failed or code
    return failed


def usage() -> str:
    lines = ["usage: stepwise <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} ({env} environment)" for name, (_, _, env) in STAGES.items()]
    lines += ["  bench       a benchmark (`stepwise bench` lists them; checkout only)"]
    lines += [
        "  setup       create both environments (student, teacher)",
        "  test        run the whole test suite in both environments (--fast: without the slow end-to-end tests)",
    ]
    return "\n".join(lines)


def bench_usage() -> str:
    """One line per benchmark: the first line of its module's docstring, read without importing it."""
    lines = ["usage: stepwise bench <name> [options]   (stepwise bench <name> --help: its options)", "", "benchmarks:"]
    for name, (module_name, env) in BENCHMARKS.items():
        path = envs.ROOT / (module_name.replace(".", "/") + ".py")
        summary = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n")[0]
        lines.append(f"  {name:<16} ({env}) {summary}")
    return "\n".join(lines)


def import_function(module_name: str, fn_name: str) -> Callable:
    """A command's function; the checkout's benchmarks/ (the demo, the benchmarks) joins the path first."""
    if module_name.split(".")[0] == CHECKOUT_PACKAGE:
        if not (envs.ROOT / CHECKOUT_PACKAGE).is_dir():
            raise SystemExit(
                f"stepwise: {module_name} needs a source checkout of stepwise (benchmarks/ is not "
                "installed): run it from a clone"
            )
        if str(envs.ROOT) not in sys.path:
            sys.path.insert(0, str(envs.ROOT))
    return getattr(importlib.import_module(module_name), fn_name)


# Flags renamed so that every command says one thing one way; the old spelling works for one more release.
RENAMED_FLAGS = {
    "--force": "--overwrite",
    "--timeout": "--timeout-s",
    "--ray": "--on-ray",  # extract: as experiment says it
    **{"--" + old.replace("_", "-"): "--" + new.replace("_", "-") for old, new in artifacts.RENAMED_SETTINGS.items()},
}
RENAMED_KEYS = {old[2:].replace("-", "_"): new[2:].replace("-", "_") for old, new in RENAMED_FLAGS.items()} | {
    "cascade": "fallback",  # stepwise serve's settings table of the --fallback-* options (a Serve config's args too)
}


def renamed_flags(argv: list[str], prog: str) -> list[str]:
    """`argv` with renamed flags in their new spelling, and a warning on stderr for each old one."""
    new = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if flag in RENAMED_FLAGS:
            print(
                f"{prog}: {flag} is deprecated and goes in the next release: use {RENAMED_FLAGS[flag]}", file=sys.stderr
            )
            arg = RENAMED_FLAGS[flag] + equals + value
        new.append(arg)
    return new


def run_command(fn: Callable, argv: list[str], prog: str) -> None:
    """`fn` called with the options in `argv`. Library code raises; here, and only here, an error becomes a
    one-line message and an exit code (a traceback would bury what the message names; STEPWISE_DEBUG=1 keeps it)."""
    try:
        result = call_with_argv(fn, renamed_flags(argv, prog), prog=prog)
    except (ValueError, OSError, ImportError, RuntimeError, artifacts.ParityFailed) as problem:
        if os.environ.get("STEPWISE_DEBUG") == "1":
            raise
        raise SystemExit(f"{prog}: error: {problem}") from None
    if isinstance(result, Path):
        print(f"[{prog}] output: {result}", flush=True)


def run_in_env(env_name: str, module_name: str, fn_name: str, command: list[str], argv: list[str]) -> None:
    """`stepwise COMMAND... ARGV...`: `module_name.fn_name` with the options in `argv`, in environment `env_name`
    (this command re-executes itself there when another interpreter runs it)."""
    if envs.current_env() != env_name and os.environ.get("STEPWISE_INPROCESS") != "1":
        envs.exec_in_env(env_name, command + argv)
    run_command(import_function(module_name, fn_name), argv, prog=" ".join(["stepwise", *command]))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command == "setup":
        for name in rest or list(envs.ENV_NAMES):
            envs.ensure_env(name)
        return
    if command == "test":
        raise SystemExit(run_tests(rest))
    if command == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(bench_usage())
            return
        if rest[0] not in BENCHMARKS:
            raise SystemExit(f"stepwise bench: unknown benchmark {rest[0]!r}\n\n{bench_usage()}")
        module_name, env_name = BENCHMARKS[rest[0]]
        run_in_env(env_name, module_name, "main", ["bench", rest[0]], rest[1:])
        return
    if command not in STAGES:
        raise SystemExit(f"stepwise: unknown command {command!r}\n\n{usage()}")
    module_name, fn_name, env_name = STAGES[command]
    run_in_env(env_name, module_name, fn_name, [command], rest)
