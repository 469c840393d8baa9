"""The docs cannot rot: every `python3 -m stepwise ...` command in the README and the stage pages names a command
that exists and options its signature accepts (parsed, groups built, nothing run), every `--config` file they name
exists, and every relative link or image points at a file in the repository."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from stepwise import cli

from helpers import ROOT

PAGES = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md")), *sorted(ROOT.glob("stepwise/*/README.md"))]


def commands(page: Path) -> list[str]:
    """The stepwise commands of a page: in bash blocks (backslash-continued lines joined, comments dropped) and in
    inline code."""
    text = page.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if "python3 -m stepwise" in line:
                found.append(line[line.index("python3 -m stepwise") :])
    found += re.findall(r"`(python3 -m stepwise [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return found


ALL = [(page, command) for page in PAGES for command in commands(page)]


def test_the_pages_have_commands():
    assert len(ALL) > 30 and {page.parent.name for page, _ in ALL} >= {"extraction", "training", "export", "serving"}


@pytest.mark.parametrize(
    "page,command", ALL, ids=[f"{page.relative_to(ROOT)}: {command[20:70]}" for page, command in ALL]
)
def test_a_documented_command_parses(page, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config paths are written relative to the checkout
    argv = shlex.split(command)[3:]
    name, rest = argv[0], argv[1:]
    if name in ("setup", "test") or "<" in command:  # <placeholders> describe the syntax
        return
    if name == "bench":
        if not rest:  # the list of benchmarks
            return
        assert rest[0] in cli.BENCHMARKS, f"{command}: no benchmark {rest[:1]}"
        module, _ = cli.BENCHMARKS[rest[0]]
        function = importlib.import_module(module).main
        rest = rest[1:]
    else:
        assert name in cli.STAGES, f"{command}: no command {name!r}"
        module, function_name, _ = cli.STAGES[name]
        function = getattr(importlib.import_module(module), function_name)
    if "--help" in rest:
        return
    cli.arguments(function, rest)  # raises (or exits) on an unknown option, a bad value or a missing --config file


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_at_files(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert missing == []
