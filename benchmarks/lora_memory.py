"""The siamese's memory with and without LoRA, counted on the real model shapes (issue #35 item 3).

Full fine-tuning: the siamese is a second copy of the policy in fp32 (verl's ref engine, engines/fsdp.py
`FsdpSiamese`). LoRA: the frozen base is shared with the actor, and the siamese adds an fp32 EMA of the adapters
plus, during its forward, an fp32 copy of the live adapters (`LoraSiamese`). The models are built on the meta device
from their published shapes (nothing is downloaded) and wrapped by PEFT with verl's default LoRA settings
(target_modules=all-linear), so the adapter count is PEFT's own.

    python benchmarks/lora_memory.py [--out benchmarks/results/lora]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: published shapes (config.json of each model on the Hub)
MODELS = {
    "Qwen2.5-Math-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
RANKS = (8, 32, 64)
FP32 = 4


def counts(shape: dict, rank: int) -> tuple[int, int]:
    """(model parameters, LoRA adapter parameters) of a Qwen2 model of this shape under PEFT's all-linear LoRA."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape))
    n_model = sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=2 * rank,
                                            target_modules="all-linear", bias="none"))
    n_adapters = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    return n_model, n_adapters


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lora"))
    args = ap.parse_args(argv)
    rows, lines = [], ["| model | LoRA rank | parameters | adapters | siamese, full fine-tuning (fp32 copy) | "
                       "siamese, LoRA (fp32 EMA + forward copy) | ratio |", "|---|---|---|---|---|---|---|"]
    for name, shape in MODELS.items():
        for rank in RANKS:
            n_model, n_adapters = counts(shape, rank)
            full, lora = n_model * FP32, 2 * n_adapters * FP32
            rows.append({"model": name, "rank": rank, "parameters": n_model, "adapters": n_adapters,
                         "siamese_full_bytes": full, "siamese_lora_bytes": lora})
            lines.append(f"| {name} | {rank} | {n_model / 1e9:.2f} B | {n_adapters / 1e6:.1f} M | {gib(full)} | "
                         f"{gib(lora)} | {full / lora:.0f}x |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "memory.md").write_text(
        "# The siamese's memory: full fine-tuning against LoRA\n\n"
        "Counted by `python benchmarks/lora_memory.py` on meta-device models of the published shapes, PEFT's "
        "all-linear LoRA (verl's default target_modules). Full fine-tuning keeps a second fp32 model; LoRA keeps the "
        "adapters' fp32 EMA and, during the siamese forward only, an fp32 copy of the live adapters. Per model, "
        "before sharding: FSDP divides both by the number of ranks.\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
