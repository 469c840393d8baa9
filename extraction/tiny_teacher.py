"""A tiny causal LM for tests and benchmarks: no model can be downloaded here, so one is built locally.

Llama-shaped (hidden 128, 2 layers, random weights) with a byte-level BPE tokenizer trained with
`tokenizers` on the task's own text and a chat template, saved as an ordinary Hugging Face folder that
vLLM and transformers load with `from_pretrained(path)`. Its outputs are noise; it exercises the real
engine, tokenizer, stop strings and parser, not the quality of a teacher.
"""

from __future__ import annotations

from pathlib import Path

from stepwise import tasks

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>", "<|end|>"]


def training_text(task_names: tuple[str, ...]) -> list[str]:
    """Task inputs, shipped completions and the few-shot prefixes: what the tokenizer will see."""
    lines: list[str] = []
    for name in task_names:
        task = tasks.get_task(name)
        train = tasks.load_split(task, "train")[:2000]
        lines += tasks.exemplars(task, train)
        lines += [e.input for e in train] + [e.teacher_completion for e in train if e.teacher_completion]
    return lines


def build_tiny_teacher(
    out_dir: Path,
    task_names: tuple[str, ...] = ("svamp", "cqa", "esnli"),
    vocab_size: int = 2048,
    hidden_size: int = 128,
    layers: int = 2,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama-shaped model + locally trained tokenizer to `out_dir`; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(training_text(task_names), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_teacher(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-teacher")))
