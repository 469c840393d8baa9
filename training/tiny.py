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
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
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


def build_student_folder(out: Path, size: StudentSize = "tiny", task_name: str = "esnli", vocab_size: int = 2000) -> Path:
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
