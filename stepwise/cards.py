"""Cards as the Hugging Face Hub reads them: a dataset card (README.md) in every extraction folder, a model card
(README.md) in every training run and export folder, each YAML front matter and a short page. They are written from
the artifacts beside them (manifest.json; task.json, train_config.json, metrics.json; export_config.json,
parity.json), so a folder pushed with `huggingface_hub.upload_folder` (the user's own step) describes itself. The
licence is left for the user to set. Standard library only, so it imports in both environments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stepwise import artifacts, storage

CARD = "README.md"
# A task's answer style -> the Hub's task category of what the data teaches.
TASK_CATEGORIES = {"label": "text-classification", "choice": "multiple-choice", "equation": "text2text-generation"}
TAGS = ["stepwise", "distilling-step-by-step", "rationales", "chain-of-thought"]


def _front_matter(data: dict[str, Any]) -> str:
    """YAML front matter; JSON is YAML, so every value is written as JSON (no YAML writer needed)."""
    lines = [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in data.items()]
    return "---\n" + "\n".join(lines) + "\n---\n"


def _size_category(records: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if records < bound:
            return name
    return "n>1M"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# ---------------------------------------------------------------- extraction folders


def dataset_card(manifest: artifacts.Manifest, shard_format: str) -> str:
    """The dataset card of an extraction folder, from its manifest."""
    config, counts = manifest["config"], manifest["counts"]
    task, teacher = config["task"], {k: config[k] for k in ("backend", "model", "sampling", "structured")}
    data = {
        "license": "unknown",  # the user's to set: the data's and the teacher's terms decide it
        "language": ["en"],
        "pretty_name": f"{task['name']} {config['split']}: teacher rationales and labels",
        "task_categories": [TASK_CATEGORIES.get(task["answer_style"], "text2text-generation")],
        "size_categories": [_size_category(counts["records"])],
        "tags": TAGS,
        "configs": [
            {"config_name": "default", "data_files": [{"split": config["split"], "path": f"shard-*.{shard_format}"}]}
        ],
        "stepwise": {
            "task": task["name"],
            "labels": task["labels"],
            "split": config["split"],
            "records": counts["records"],
            "complete": manifest["complete"],
            "teacher": teacher,
            "prompt_hash": config["prompt_hash"],
            "parse_rate": counts["parse_rate"],
            "teacher_accuracy": counts["teacher_accuracy"],
        },
    }
    labels = ", ".join(task["labels"]) or "open (generated)"
    state = "complete" if manifest["complete"] else "incomplete"
    builder = "json" if shard_format == "jsonl" else "parquet"
    body = f"""
# {data["pretty_name"]}

Chain-of-thought rationales and labels a teacher wrote for the {task["name"]} {config["split"]} split, made with
`stepwise extract` for distilling step by step (Hsieh et al., ACL 2023).

| | |
|---|---|
| records | {counts["records"]} of {manifest["expected_records"]} ({state}) |
| labels | {labels} |
| teacher | {teacher["backend"]}: {teacher["model"]} |
| sampling | {json.dumps(teacher["sampling"]) if teacher["sampling"] else "-"} |
| structured output | {"yes" if teacher["structured"] else "no"} |
| parse rate | {_percent(counts["parse_rate"])} |
| teacher accuracy against gold | {_percent(counts["teacher_accuracy"])} |

Each record: `id`, `input`, `label` (gold), `teacher_label`, `rationale`, `completions` (the teacher's raw text),
`status` (ok, malformed, error), `correct`, token counts, the teacher's settings and an input `fingerprint`.

```python
import datasets
records = datasets.load_dataset("path/to/this/folder")  # the shards, as this card's `configs` names them
# or, naming the files:
records = datasets.load_dataset("{builder}", data_files="path/to/this/folder/shard-*.{shard_format}")
```

(`data_dir=` alone would also read manifest.json and task.json as data.) Set `license` above before sharing it.
"""
    return _front_matter(data) + body


# ---------------------------------------------------------------- training runs and exports


def _metric(split: str, value: float) -> dict[str, Any]:
    return {"type": "accuracy", "value": value, "name": f"{split} accuracy", "verified": False}


def read_if_there(path: Path) -> dict[str, Any]:
    return artifacts.read_json(path, "a stepwise artifact") if path.exists() else {}


def model_card(folder: Path, name: str = "") -> str:
    """The model card of a training run folder, or of an export folder (it has export_config.json and parity.json
    too): the task and labels, the recipe, the metrics the run measured, the export's parity report."""
    folder = Path(folder)
    task = artifacts.read_json(folder / artifacts.TASK, "a stepwise artifact folder")
    recipe = artifacts.current_settings(
        read_if_there(folder / artifacts.TRAIN_CONFIG)
    )  # absent when a checkpoint from elsewhere was exported
    metrics = (
        artifacts.read_json(folder / artifacts.METRICS, "a finished run")
        if (folder / artifacts.METRICS).exists()
        else None
    )
    exported = (folder / artifacts.EXPORT_CONFIG).exists()
    export = artifacts.read_export_config(folder) if exported else None
    # a skipped gate writes only why it was skipped: its report has no measurements to read as a ParityReport
    parity_raw = read_if_there(folder / artifacts.PARITY) if exported else {}
    skipped = bool(parity_raw.get("skipped"))
    parity = None if not exported or skipped else artifacts.read_parity(folder)

    results = []
    for split in ("valid", "test"):
        if metrics and metrics.get(split):
            results.append(
                {
                    "task": {"type": "text2text-generation", "name": f"{task['name']} label"},
                    "dataset": {"name": task["name"], "type": task["name"], "split": split},
                    "metrics": [_metric(split, metrics[split]["accuracy"])],
                }
            )
    if parity:  # the export's own measurement, on the parity gate's validation examples
        results.append(
            {
                "task": {"type": "text2text-generation", "name": f"{task['name']} label (ONNX, parity set)"},
                "dataset": {"name": task["name"], "type": task["name"], "split": "valid"},
                "metrics": [_metric(f"valid ({parity['examples']}, ONNX)", parity["accuracy_onnx"])],
            }
        )
    name = name or folder.name
    data: dict[str, Any] = {
        "license": "unknown",
        "language": ["en"],
        "library_name": "onnx" if exported else "transformers",
        "pipeline_tag": "text2text-generation",
        "tags": ["t5", *TAGS, *(["onnx", export["precision"]] if export else [])],
    }
    if "/" in str(recipe.get("student", "")) and not Path(recipe["student"]).exists():
        data["base_model"] = recipe["student"]  # a Hub id the student started from
    if results:
        data["model-index"] = [{"name": name, "results": results}]
    data["stepwise"] = {
        "task": task["name"],
        "labels": task["labels"],
        "mode": recipe.get("mode"),
        "alpha": recipe.get("alpha"),
        "student": recipe.get("student"),
        **({"export": {k: export[k] for k in ("target", "precision", "decoder_layout", "version")}} if export else {}),
    }
    labels = ", ".join(task["labels"]) or "open (generated)"
    lines = [
        f"# {name}",
        "",
        f"A T5 student for {task['name']} trained with `stepwise train` ({recipe.get('mode')}: the label task and, in",
        "step-by-step mode, the rationale task on the same input, told apart by task prefixes; loss = alpha x label +",
        "(1 - alpha) x rationale)"
        + (f", exported to ONNX ({export['precision']}, {export['target']})." if export else "."),
        "",
        "| | |",
        "|---|---|",
        f"| labels | {labels} |",
        f"| student | {recipe.get('student')} |",
        f"| recipe | alpha {recipe.get('alpha')}, lr {recipe.get('learning_rate')}, batch {recipe.get('batch_size')} x "
        f"{recipe.get('grad_accum')}, {metrics['steps'] if metrics else '?'} steps, input/target tokens "
        f"{recipe.get('max_input_tokens')}/{recipe.get('max_target_tokens')} |",
        f"| rationales | {recipe.get('rationales') or '-'} |",
    ]
    for split in ("valid", "test"):
        if metrics and metrics.get(split):
            lines.append(f"| {split} accuracy | {metrics[split]['accuracy']:.4f} on {metrics[split]['examples']} |")
    if parity:
        agreement = parity["fast_path_agreement"]
        agreement = parity["greedy_agreement"] if agreement is None else agreement
        lines.append(
            f"| parity gate | {'passed' if parity['passed'] else 'failed'}: labels equal to PyTorch for "
            f"{agreement:.1%} of {parity['examples']} validation examples, accuracy "
            f"{parity['accuracy_pytorch']:.3f} (PyTorch) -> {parity['accuracy_onnx']:.3f} (ONNX) |"
        )
    elif skipped:
        lines.append(f"| parity gate | skipped ({parity_raw.get('reason')}): unverified against PyTorch |")
    lines += [
        "",
        "Serve it label-only with `python3 -m stepwise serve --model <this folder>`; set `license` above before",
        "sharing it (`huggingface_hub.upload_folder(repo_id=..., folder_path=...)` is your own step).",
        "",
    ]
    return _front_matter(data) + "\n" + "\n".join(lines)


def write_dataset_card(folder: str | Path, manifest: artifacts.Manifest, shard_format: str) -> str | Path:
    return artifacts.write_atomic(storage.join(folder, CARD), dataset_card(manifest, shard_format))


def write_model_card(folder: Path, name: str = "") -> Path:
    """`name`: what the card calls the model (default: the folder's name; a staging folder passes its final one)."""
    return artifacts.write_atomic(Path(folder) / CARD, model_card(folder, name))
