"""The tiny verifiable task: a character-level Qwen3 model that half-knows arithmetic, and its data.

`python -m popo_verl.tiny build --out DIR` writes, deterministically from a seed and with no download:
  DIR/model/              HF model + tokenizer (char-level, ChatML template, "\\n" is one token)
  DIR/data/train.parquet  verl RL parquet: chat prompts asking for the answer in \\boxed{}
  DIR/data/test.parquet
  DIR/manifest.json       build parameters and the warm start's greedy pass@1 on the test split
A short supervised warm start puts the model's greedy pass@1 inside [0.10, 0.60]: a random model gives
no positive rollout, a perfect one nothing to learn. A build with the same parameters is cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BUILD_VERSION = "1"
DATA_SOURCE = "tiny_arith"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PASS_BAND = (0.10, 0.60)


def default_dir() -> str:
    return os.environ.get("POPO_TINY_DIR", os.path.join(os.path.expanduser("~"), ".cache", "popo_verl", "tiny"))


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    n_train: int = 2000
    n_test: int = 128
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    max_positions: int = 128
    target_pass: float = 0.30
    max_sft_steps: int = 3000
    sft_batch: int = 64
    sft_lr: float = 3e-3

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "v": BUILD_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- data
LEVELS = {
    1: "one-digit sum",
    2: "two-digit plus one-digit sum",
    3: "two-digit sum",
    4: "two-digit difference",
}


def make_problem(rng: random.Random, level: int) -> tuple[str, str]:
    if level == 1:
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), "+"
    elif level == 2:
        a, b, op = rng.randint(10, 99), rng.randint(0, 9), "+"
    elif level == 3:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), "+"
    else:
        a, b, op = rng.randint(10, 99), rng.randint(0, 99), "-"
    answer = a + b if op == "+" else a - b
    return f"{a}{op}{b}", str(answer)


def question(expr: str) -> str:
    return f"{expr}=? Put the answer in \\boxed{{}}."


def make_rows(rng: random.Random, n: int, split: str) -> list[dict]:
    rows = []
    for i in range(n):
        level = rng.randint(1, 4)
        expr, answer = make_problem(rng, level)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": question(expr)}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": split, "index": i, "level": level, "expression": expr},
            }
        )
    return rows


# ------------------------------------------------------------------------------------ tokenizer, model
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok, path: Path) -> None:
    tok.save_pretrained(path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 would force Qwen2Tokenizer for qwen types
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2))


def build_model(spec: TinySpec, tok):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden_size // spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=pad,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=pad)
    return model


def chat_ids(tok, content: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


# ------------------------------------------------------------------------------------------ warm start
def greedy_pass_at_1(model, tok, rows: list[dict], max_new_tokens: int = 16) -> float:
    """Greedy decoding of every prompt, scored with popo_verl.reward."""
    import torch

    from popo_verl.reward import compute_score

    eos, pad = tok.eos_token_id, tok.pad_token_id
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            prompts = [chat_ids(tok, r["prompt"][0]["content"]) for r in chunk]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=eos, pad_token_id=pad,
            )
            for r, seq in zip(chunk, out[:, width:].tolist()):
                text = tok.decode(seq, skip_special_tokens=True)
                correct += compute_score(r["data_source"], text, r["reward_model"]["ground_truth"]) > 0
    model.train()
    return correct / max(len(rows), 1)


def warm_start(model, tok, spec: TinySpec, dev_rows: list[dict], log=print) -> tuple[float, int]:
    """Supervised steps on "\\boxed{answer}" until greedy pass@1 on a dev split reaches the target."""
    import torch

    rng = random.Random(spec.seed + 7)
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model.train()
    best = 0.0
    for step in range(1, spec.max_sft_steps + 1):
        seqs, labels = [], []
        for _ in range(spec.sft_batch):
            # mostly easy problems: the model learns some of the task, not all of it
            level = rng.choices([1, 2, 3, 4], weights=[6, 3, 1, 1])[0]
            expr, answer = make_problem(rng, level)
            p = chat_ids(tok, question(expr))
            a = tok(f"\\boxed{{{answer}}}", add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad)
        lab = torch.full((len(seqs), width), -100)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
            att[i, : len(s)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            acc = greedy_pass_at_1(model, tok, dev_rows)
            best = max(best, acc)
            log(f"  warm start step {step}: loss {loss.item():.3f}, dev greedy pass@1 {acc:.3f}")
            if acc >= spec.target_pass:
                return acc, step
    del g
    return best, spec.max_sft_steps


# ------------------------------------------------------------------------------------------------ build
def paths(out_dir: str | os.PathLike) -> dict[str, str]:
    out = Path(out_dir)
    return {
        "root": str(out),
        "model": str(out / "model"),
        "train": str(out / "data" / "train.parquet"),
        "test": str(out / "data" / "test.parquet"),
        "manifest": str(out / "manifest.json"),
    }


def is_built(out_dir, spec: TinySpec = TinySpec()) -> bool:
    p = paths(out_dir)
    try:
        manifest = json.loads(Path(p["manifest"]).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("digest") == spec.digest() and all(os.path.exists(p[k]) for k in ("model", "train", "test"))


def build(out_dir, spec: TinySpec = TinySpec(), force: bool = False, log=print) -> dict[str, str]:
    import pandas as pd
    import torch

    p = paths(out_dir)
    if not force and is_built(out_dir, spec):
        log(f"tiny task already built in {p['root']} (cached)")
        return p
    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = Path(str(p["root"]) + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    rng = random.Random(spec.seed)
    train_rows = make_rows(rng, spec.n_train, "train")
    test_rows = make_rows(rng, spec.n_test, "test")
    dev_rows = make_rows(random.Random(spec.seed + 1), 128, "dev")
    pd.DataFrame(train_rows).to_parquet(tmp / "data" / "train.parquet", index=False)
    pd.DataFrame(test_rows).to_parquet(tmp / "data" / "test.parquet", index=False)

    tok = build_tokenizer()
    model = build_model(spec, tok)
    log(f"tiny task: warm-starting a {sum(x.numel() for x in model.parameters()):,}-parameter Qwen3 on CPU ...")
    dev_acc, steps = warm_start(model, tok, spec, dev_rows, log=log)
    test_acc = greedy_pass_at_1(model, tok, test_rows)
    lo, hi = PASS_BAND
    if not lo <= test_acc <= hi:
        raise RuntimeError(f"tiny warm start missed its band: test pass@1 {test_acc:.3f} not in [{lo}, {hi}]")
    save_tokenizer(tok, tmp / "model")
    model.save_pretrained(tmp / "model")
    manifest = {
        "digest": spec.digest(),
        "spec": asdict(spec),
        "warm_start_steps": steps,
        "dev_pass_at_1": dev_acc,
        "test_pass_at_1": test_acc,
        "n_params": sum(x.numel() for x in model.parameters()),
        "build_seconds": round(time.time() - t0, 1),
        "levels": LEVELS,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(p["root"], ignore_errors=True)
    os.replace(tmp, p["root"])  # a half-built task is never left where a run would pick it up
    log(f"tiny task built in {p['root']}: greedy pass@1 on test {test_acc:.3f} ({manifest['build_seconds']} s)")
    return p


def ensure_built(out_dir: str | None = None, spec: TinySpec = TinySpec(), log=print) -> dict[str, str]:
    out_dir = out_dir or default_dir()
    lock = Path(str(out_dir) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(lock, "w") as fh:  # concurrent test workers build once
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            return build(out_dir, spec, log=log)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popo_verl.tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the tiny task")
    b.add_argument("--out", default=default_dir())
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true")
    b.add_argument("--print-reward-file", action="store_true", help="end with the path of popo_verl/reward.py")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        spec = TinySpec(seed=args.seed)
        if args.force:
            build(args.out, spec, force=True)
        else:
            ensure_built(args.out, spec)
        if args.print_reward_file:
            import popo_verl.reward as reward

            print(reward.__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
