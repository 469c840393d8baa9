"""The code's layering, read with `ast` (every import statement, also those inside functions): the base package
(stepwise/*.py) imports no stage, a stage imports another only where the README's layout says, and no modules
import each other, directly or in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

STAGES = ("extraction", "training", "export", "serving")


def module_files() -> dict[str, Path]:
    """Import name -> file, for the installed namespace: stepwise/*.py and the stage folders as stepwise.<stage>."""
    files = {}
    for folder, prefix in [("stepwise", "stepwise")] + [(stage, f"stepwise.{stage}") for stage in STAGES]:
        for path in sorted((ROOT / folder).glob("*.py")):
            files[prefix if path.stem == "__init__" else f"{prefix}.{path.stem}"] = path
    return files


def imports(path: Path, known: set[str]) -> set[str]:
    """The known modules `path` imports (`from stepwise import tasks` counts as stepwise.tasks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports(path, set(files)) - {module} for module, path in files.items()}


def test_the_base_package_imports_no_stage():
    base = {m: deps for m, deps in graph().items() if m.count(".") <= 1 and m.split(".")[-1] not in STAGES}
    offenders = {
        m: sorted(d for d in deps if d.split(".")[1:2] and d.split(".")[1] in STAGES) for m, deps in base.items()
    }
    assert {m: d for m, d in offenders.items() if d} == {}


# What one stage may import of another (the README's layout says why); nothing else crosses a stage's folder.
STAGE_TO_STAGE = {
    "serving": {"stepwise.export.runtime", "stepwise.extraction.teachers"},
}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_a_stage_imports_another_only_where_the_readme_says():
    crossing: dict[str, set[str]] = {}
    for module, deps in graph().items():
        for dependency in deps:
            if stage_of(module) and stage_of(dependency) not in (None, stage_of(module)):
                crossing.setdefault(stage_of(module), set()).add(dependency)
    assert crossing == STAGE_TO_STAGE


def test_no_import_circles():
    edges, circles, state = graph(), [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(edges[module]):
            if state.get(dependency) == "open":
                circles.append(path[path.index(dependency) :] + [dependency])
            elif dependency not in state:
                visit(dependency, path + [dependency])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_graph_sees_real_imports():
    edges = graph()
    assert "stepwise.tasks" in edges["stepwise.export.runtime"] and "stepwise.artifacts" in edges["stepwise.tasks"]
    assert "stepwise.serving.app" in edges["stepwise.serving.lifecycle"]  # an import inside a function counts


def test_a_stage_module_names_its_own_file_from_a_checkout():
    """The namespace mapping is plain to a reader and to tools: `stepwise.training.data` is training/data.py."""
    script = "import stepwise.training.data as m, stepwise.extraction.run as e; print(m.__file__); print(e.__file__)"
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.split() == [str(ROOT / "training" / "data.py"), str(ROOT / "extraction" / "run.py")]


def test_the_task_layer_has_one_entry_point_for_every_name_the_code_uses():
    """`from stepwise import tasks; tasks.X` keeps working for each X in use, whichever part of the task layer
    (task_model, task_data, prompts, scoring) holds it."""
    from stepwise import tasks

    used = set()
    for path in [*ROOT.glob("*/*.py"), *ROOT.glob("tests/*/*.py")]:
        tree = ast.parse(path.read_text())
        if any(
            isinstance(node, ast.ImportFrom) and node.module == "stepwise" and "tasks" in [a.name for a in node.names]
            for node in ast.walk(tree)
        ):
            used |= {
                node.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tasks"
            } - {"__all__"}  # this test's own
    assert len(used) > 20 and sorted(used - set(tasks.__all__)) == []
    assert [name for name in tasks.__all__ if not hasattr(tasks, name)] == []
