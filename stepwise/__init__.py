"""stepwise: distilling step-by-step, from teacher rationales to a served student.

The stages import as `stepwise.extraction`, `stepwise.training`, `stepwise.export` and `stepwise.serving`.
An installed wheel holds them inside this package (pyproject's package-dir mapping); in a source checkout
they are the top-level folders beside it, so the checkout's root joins this package's search path.
"""

from pathlib import Path

STAGES = ("extraction", "training", "export", "serving")
# The folder this package sits in: in a source checkout, its root (benchmarks/, tests/, .venv/, pyproject.toml).
ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "export").is_dir() and all(
    (ROOT / stage / "__init__.py").is_file() for stage in STAGES
):
    __path__.append(str(ROOT))
