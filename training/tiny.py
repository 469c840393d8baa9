"""A small T5 student built locally: a SentencePiece tokenizer trained on the task's own text and a
randomly initialised T5 (v1.1 layout). For CPU runs and tests, where no checkpoint can be downloaded;
real runs pass a checkpoint name or folder to `from_pretrained` instead."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import sentencepiece as spm
import torch
from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

# d_model, d_ff, layers, heads: "tiny" trains in minutes on 2 cores; "small" has t5-small's shape.
SHAPES = {
    "tiny": dict(d_model=128, d_ff=256, num_layers=2, num_heads=4, d_kv=32),
    "small": dict(d_model=512, d_ff=1024, num_layers=6, num_heads=8, d_kv=64),
}
StudentSize = Literal["tiny", "small"]


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 2000) -> T5TokenizerFast:
    """SentencePiece unigram with T5's special ids (pad 0, eos 1, unk 2), saved in HF format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,  # small corpora may not support the full size
        character_coverage=1.0,
        minloglevel=2,
    )
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    # from_pretrained converts the SentencePiece model the same way in transformers 4.x and 5.x (5.x's
    # constructor no longer reads a vocab_file).
    tokenizer = T5TokenizerFast.from_pretrained(out_dir, extra_ids=0, legacy=False)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def student_config(tokenizer: T5TokenizerFast, size: StudentSize = "tiny") -> T5Config:
    """The T5 (v1.1 layout) of `size` for `tokenizer`. Untied embeddings: a random tied T5 decodes only its
    start token, which would make every parity check pass vacuously."""
    return T5Config(
        vocab_size=len(tokenizer),
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        dropout_rate=0.0,
        **SHAPES[size],
    )


def build_student(tokenizer: T5TokenizerFast, size: StudentSize = "tiny", seed: int = 0) -> T5ForConditionalGeneration:
    """A randomly initialised T5 of `size` for `tokenizer`, its weights fixed by `seed`."""
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(student_config(tokenizer, size))


def build_student_folder(
    out: Path, size: StudentSize = "tiny", task_name: str = "esnli", vocab_size: int = 2000
) -> Path:
    """A random untied T5 of `size` with a tokenizer trained on the task's text, saved like a trained student
    (for tests and benchmarks). An existing folder is reused."""
    from stepwise import tasks

    if (out / "model.safetensors").exists():
        return out
    task = tasks.get_task(task_name)
    train = tasks.load_split(task, "train")[:2000]
    texts = [tasks.label_input(e) for e in train] + [tasks.rationale_input(e) for e in train] + [e.label for e in train]
    tokenizer = train_tokenizer(texts, out, vocab_size=vocab_size)
    build_student(tokenizer, size).save_pretrained(out)
    tasks.save_task(task, out)
    return out


# Four categories of eight words: a words-task input is three words of its category and one of another, shuffled.
WORD_CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "animal": ["horse", "tiger", "zebra", "camel", "otter", "eagle", "whale", "mouse"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "silver", "black"],
    "tool": ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "ladder"],
}


def write_words_task(folder: Path, filler_words: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """A learnable custom task for tests and checks: the label is the category most of an input's four words
    belong to (chance: 25%), the rationale names them. Writes <folder>/words.jsonl (480 train, 64 valid, 64 test
    rows) and <folder>/rationales (an extraction folder); returns both paths. `filler_words` pads every input
    and rationale with that many neutral words (long sequences for memory checks)."""
    import json
    import random

    from stepwise import artifacts, tasks

    rng = random.Random(seed)
    filler = " ".join(["and"] * filler_words)
    rows, records = [], []
    for split, count in (("train", 480), ("valid", 64), ("test", 64)):
        for i in range(count):
            label = rng.choice(list(WORD_CATEGORIES))
            other = rng.choice([c for c in WORD_CATEGORIES if c != label])
            words = rng.sample(WORD_CATEGORIES[label], 3) + [rng.choice(WORD_CATEGORIES[other])]
            rng.shuffle(words)
            row = {
                "id": f"words-{split}-{i:04d}",
                "split": split,
                "input": " ".join(words + ([filler] if filler else [])),
                "label": label,
            }
            rows.append(row)
            rationale = (
                f"{', '.join(w for w in words if w in WORD_CATEGORIES[label])} are {label} words. {filler}".strip()
            )
            records.append(
                {
                    "id": row["id"],
                    "input": row["input"],
                    "label": label,
                    "choices": None,
                    "status": "ok",
                    "reason": "",
                    "rationale": rationale,
                    "teacher_label": label,
                }
            )
    task_path = Path(folder) / "words.jsonl"
    artifacts.write_atomic(task_path, "".join(json.dumps(r) + "\n" for r in rows))
    rationales = Path(folder) / "rationales"
    artifacts.write_atomic(
        rationales / "shard-words.jsonl", "".join(json.dumps(r) + "\n" for r in records if "-train-" in r["id"])
    )
    written = sum("-train-" in r["id"] for r in records)
    artifacts.write_json(rationales / artifacts.MANIFEST, artifacts.whole_manifest(written, {"task": "words"}))
    tasks.save_task(tasks.get_task(str(task_path)), rationales)
    return task_path, rationales
