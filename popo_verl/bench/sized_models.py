"""Randomly initialised Qwen3 models of a given size with the tiny task's tokenizer, for cost benchmarks.

`benchmarks/cost.py --model-size 0.5b` needs a model large enough that compute, not overhead, dominates a
step, without downloading one. These are Qwen3 architectures (as the tiny task's model) with the tiny task's
character-level tokenizer and chat template (popo_verl.tiny), so they read the tiny task's prompts:

| size | shape | parameters |
|---|---|---|
| tiny | the tiny task's (hidden 64, 2 layers, 4 heads / 2 kv heads, MLP 192) | 105,280 |
| 20m | hidden 384, 12 layers, 6 query / 2 kv heads of 64, MLP 1152 (fp32: the CPU size where compute dominates) | 20.7 M |
| 0.5b | Qwen3-0.6B's widths (hidden 1024, MLP 3072, 16 query / 8 kv heads of 128), 32 layers (Qwen3-0.6B: 28) | 0.503 B |
| 1.5b | Qwen3-1.7B's widths (hidden 2048, MLP 6144, 16 query / 8 kv heads of 128), 30 layers (Qwen3-1.7B: 28) | 1.510 B |

Why more layers than Qwen3: the tiny tokenizer has about 100 tokens where Qwen3 has 151,936, so the tied
embedding that makes 155 M of Qwen3-0.6B and 311 M of Qwen3-1.7B is nearly gone; two more layers bring the
count back to the size named. The compute per token is the transformer stack's, as in Qwen3; only the
vocabulary projection (a large share of a real model's logits cost) is small here.

    python -m popo_verl.bench.sized_models build 0.5b [--out DIR]      # prints the model directory

The weights are random (seeded); 0.5b and 1.5b are written in bf16 (the GPU actor's compute dtype), tiny in
fp32. Cached: a second build with the same spec returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

BUILD_VERSION = "1"


@dataclass(frozen=True)
class SizeSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    target_params: int  # what the name promises; the built count is within a few per cent of it
    dtype: str  # the dtype the weights are written in
    max_positions: int = 4096  # RoPE: costs no parameters; room for long cost-benchmark responses
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "v": BUILD_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


SIZES: dict[str, SizeSpec] = {
    # the tiny task's own architecture (popo_verl.tiny.TinySpec), randomly initialised
    "tiny": SizeSpec(hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, head_dim=16, target_params=105_280,
                     dtype="float32"),
    # the CPU size where compute dominates a step (`cost.py --model-size 20m`): POPO's own work is measured against it
    "20m": SizeSpec(hidden=384, intermediate=1152, layers=12, heads=6, kv_heads=2, head_dim=64, target_params=20_700_000,
                    dtype="float32"),
    "0.5b": SizeSpec(hidden=1024, intermediate=3072, layers=32, heads=16, kv_heads=8, head_dim=128,
                     target_params=500_000_000, dtype="bfloat16"),
    "1.5b": SizeSpec(hidden=2048, intermediate=6144, layers=30, heads=16, kv_heads=8, head_dim=128,
                     target_params=1_500_000_000, dtype="bfloat16"),
}


def default_dir(size: str) -> str:
    root = os.environ.get("POPO_SIZED_MODEL_DIR", os.path.join(os.path.expanduser("~"), ".cache", "popo_verl", "sized"))
    return os.path.join(root, size)


def qwen3_config(spec: SizeSpec, tok):
    from transformers import Qwen3Config

    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Config(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=pad,
    )


def count_params(size: str) -> int:
    """The parameter count of `size`'s model, from a model built on the meta device (no memory, no init)."""
    import torch
    from transformers import Qwen3ForCausalLM

    from popo_verl.tiny import build_tokenizer

    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(SIZES[size], build_tokenizer()))
    return sum(p.numel() for p in model.parameters())


def is_built(out_dir, spec: SizeSpec) -> bool:
    try:
        manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("digest") == spec.digest() and (Path(out_dir) / "config.json").is_file()


def build(size: str, out_dir: str | None = None, log=print) -> str:
    """Write `size`'s model and the tiny tokenizer to `out_dir` (a Hugging Face model directory); returns it."""
    if size not in SIZES:
        raise ValueError(f"model size must be one of {sorted(SIZES)}, got {size!r}")
    spec = SIZES[size]
    out = Path(out_dir or default_dir(size))
    if is_built(out, spec):
        log(f"{size} model already built in {out} (cached)")
        return str(out)
    import fcntl

    lock = Path(str(out) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:  # concurrent builders (two benchmark runs, test workers) build once
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if is_built(out, spec):
                log(f"{size} model already built in {out} (cached)")
                return str(out)
            return _write(size, spec, out, log)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(size: str, spec: SizeSpec, out: Path, log) -> str:
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from popo_verl.tiny import build_tokenizer, save_tokenizer

    tok = build_tokenizer()
    cfg = qwen3_config(spec, tok)
    log(f"building a random {size} Qwen3 ({spec.layers} layers, hidden {spec.hidden}) in {out} ...")
    torch.manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                                               bos_token_id=cfg.bos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = Path(str(out) + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    save_tokenizer(tok, tmp)
    manifest = {"digest": spec.digest(), "size": size, "spec": asdict(spec), "n_params": n_params}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # never a half-written model where a run would pick it up
    log(f"{size} model built in {out}: {n_params:,} parameters ({spec.dtype})")
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popo_verl.bench.sized_models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) a model of the given size; prints its directory")
    b.add_argument("size", choices=sorted(SIZES))
    b.add_argument("--out", default=None, help="default: POPO_SIZED_MODEL_DIR or ~/.cache/popo_verl/sized, /<size>")
    args = parser.parse_args(argv)
    print(build(args.size, args.out, log=lambda *a: print(*a, file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
