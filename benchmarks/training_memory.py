"""GPU memory per worker for the t5-v1_1 students under DDP and FSDP, on paper, from parameter counts.

Each model is laid out on PyTorch's meta device, so nothing is downloaded or allocated, for the way
`stepwise train` wraps them (FSDP: one unit per T5 block, the root unit holding the embeddings and lm_head).

Model states per GPU, bf16 compute with fp32 master weights and fp32 AdamW moments:
  DDP   16 B/param (weights 4, gradients 4 living in the all-reduce buckets, AdamW moments 8)
        + 2 B/param of bf16 weight copies autocast keeps through a forward pass;
  FSDP  16 B/param / N (weights, gradients and moments sharded over N GPUs)
        + ~8 B/param of the largest unit while it is gathered (bf16 weights, bf16 gradients, fp32 reduce buffer).
Activations come on top: they grow with the batch per GPU and the sequence lengths (`stepwise bench gpu-train-check`
measures them on a GPU), as do the CUDA context (~0.5 GB) and allocator slack.

    python3 -m stepwise bench training-memory   # -> benchmarks/results/training_memory.{json,md}
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import RESULTS
from stepwise import artifacts

GiB = 2**30
# google/t5-v1_1-* config.json: d_model, d_ff, layers (encoder = decoder), heads, d_kv; vocabulary 32128,
# gated-GELU, untied lm_head.
T5_V1_1 = {
    "base": (768, 2048, 12, 12, 64),
    "large": (1024, 2816, 24, 16, 64),
    "xl": (2048, 5120, 24, 32, 64),
    "xxl": (4096, 10240, 24, 64, 64),
}
GPUS = 8
GPU_MEMORY_GIB = 80  # an A100/H100 80 GB


def counts(size: str) -> dict[str, int]:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    d_model, d_ff, layers, heads, d_kv = T5_V1_1[size]
    config = T5Config(
        vocab_size=32128,
        d_model=d_model,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        d_kv=d_kv,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    blocks = [block for stack in (model.encoder, model.decoder) for block in stack.block]
    largest_block = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    root = total - sum(sum(p.numel() for p in block.parameters()) for block in blocks)
    return {"params": total, "largest_block": largest_block, "root_unit": root}


def command(size: str, strategy: str, accum: int) -> str:
    return (
        "python3 -m stepwise train --task esnli --rationales runs/esnli-teacher "
        f"--student google/t5-v1_1-{size} --mode step-by-step "
        f"--workers {GPUS} --use-gpu --strategy {strategy} --batch-size 64"
        f"{f' --grad-accum {accum}' if accum > 1 else ''} --learning-rate 5e-5 "
        "--max-steps 10000 --max-input-tokens 1024 --max-target-tokens 256 --eval-every 250 "
        f"--out runs/esnli-t5-{size}-{strategy}"
    )


def main(out: Path = RESULTS / "training_memory") -> Path:
    """GPU memory per worker for the t5-v1_1 students under DDP and FSDP, on paper, from parameter counts.

    Args:
        out: result files (.json, .md) without suffix
    """
    rows = []
    for size in T5_V1_1:
        c = counts(size)
        ddp = (16 + 2) * c["params"] / GiB
        fsdp = (16 * c["params"] / GPUS + 8 * max(c["largest_block"], c["root_unit"])) / GiB
        strategy = "ddp" if ddp < GPU_MEMORY_GIB / 2 else "fsdp"  # leave at least half the card to activations
        rows.append(
            {
                "student": f"t5-v1_1-{size}",
                **c,
                "ddp_gib": round(ddp, 1),
                "fsdp_gib_per_gpu": round(fsdp, 1),
                "gpus": GPUS,
                "suggested": strategy,
                "command": command(size, strategy, accum=1 if size in ("base", "large") else 2),
            }
        )
    lines = [
        f"| student | parameters | DDP, per GPU | FSDP over {GPUS} GPUs, per GPU | suggested |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['student']} | {r['params'] / 1e6:,.0f}M | {r['ddp_gib']:.1f} GiB | "
        f"{r['fsdp_gib_per_gpu']:.1f} GiB | {r['suggested']} |"
        for r in rows
    ]
    table = (
        "\n".join(lines)
        + "\n\nModel states only (weights, gradients, AdamW moments, gathered FSDP units); activations come on top.\n\n"
    )
    table += "\n".join(f"- {r['student']}: `{r['command']}`" for r in rows) + "\n"
    out = Path(out)
    report = {"gpus": GPUS, "bytes_per_param": {"ddp": 18, "fsdp": "16/N + 8 x largest unit"}, "rows": rows}
    artifacts.write_json(out.with_suffix(".json"), report)
    artifacts.write_atomic(out.with_suffix(".md"), table)
    print(table)
    return out.with_suffix(".json")
