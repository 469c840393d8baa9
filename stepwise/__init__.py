"""stepwise: distilling step-by-step, from teacher rationales to a served student.

The stages import as `stepwise.extraction`, `stepwise.training`, `stepwise.export` and `stepwise.serving`.
An installed wheel holds them inside this package (pyproject's package-dir mapping); in a source checkout
they are the top-level folders beside it, so the checkout's root joins this package's search path.
"""

from pathlib import Path

STAGES = ("extraction", "training", "export", "serving")
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "export").is_dir() and all(
    (_checkout / stage / "__init__.py").is_file() for stage in STAGES
):
    __path__.append(str(_checkout))
