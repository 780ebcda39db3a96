"""The tiny verifiable task (v2): a character-level Qwen3 that half-knows addition, and its data.

`python -m popo_verl.tiny build [--seed S] [--out DIR]` writes, deterministically from the seed, with no
download, in 30-70 s on 2 cores (cached: a second call with the same spec returns at once):
  DIR/model/              HF model + tokenizer (char-level, ChatML template, "\\n" is one token)
  DIR/data/train.parquet  verl RL parquet: chat prompts asking for the answer in \\boxed{}
  DIR/data/test.parquet   held-out prompts: never seen by the warm start nor by RL training
  DIR/manifest.json       build parameters and the warm start's held-out pass@1 / pass@8 at temperature 1

Why it is built this way: RLVR on real LLMs mostly *sharpens* (it moves pass@1 toward pass@k), so the
warm start must already hold the right answer for most problems, but with only part of its probability.
The problems are sums of a number below 100 and a digit (`37+5`, `4+8`); the warm start is a supervised
run on labels that are right only `label_accuracy` (30 %) of the time and otherwise off by one
(`\\boxed{41}` or `\\boxed{43}` for 37+5). Off-by-one errors are chosen over random wrong digits because
they share the computation of the right answer: the model learns the sum itself quickly (a random wrong
digit dilutes that signal and the model never learns the units digit), and ends as a calibrated mixture
in which the right answer carries about 30 % of the mass. Held out at temperature 1: pass@1 about 0.3,
pass@8 about 0.9 (seeds 0-2: 0.28-0.30 and 0.88-0.93) -- the regime where rewarding correct samples
has something to sharpen, on problems it has never seen. `--seed` draws another split of the problems and another initialisation and label
noise, so a task built with another seed is a fresh held-out check.

Deterministic on one machine, not across machines: the warm start is 800 chaotic Adam steps, so a
different float kernel anywhere (AVX-512 against AVX2 paths, MKL's per-CPU code branches, the thread count)
gives another model. The build runs in a child process with the kernels pinned (`PORTABLE_KERNELS`: ATen's
AVX2 kernels, MKL's AVX2 conditional-numerical-reproducibility branch, 2 threads), so the caller's own
settings (threads, ISA overrides) never change the model. That was meant to make every AVX2 machine agree;
measured, it does not: seed 0's weights hash to 74900010c89f9970 on the machine of 2026-12-01 and to
f126a6850b9676ae on an AMD EPYC (2026-12-02); seeds 0-3 start at held-out pass@1 0.318/0.323/0.334/0.290
on the first and 0.317/0.261/0.307/0.280 on the second, all in the band. Where AVX2 is missing
(aarch64) it builds with the native kernels and the manifest says so. benchmarks/learning.py pairs runs only
within one build (a hash of the weights).
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

BUILD_VERSION = "3"  # 3: kernels pinned: the caller's thread and ISA settings no longer change the model
DATA_SOURCE = "tiny_arith"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: the warm start's held-out pass@1 at temperature 1 must fall here, and its pass@8 reach PASS_AT_8_MIN
PASS_BAND = (0.15, 0.45)
PASS_AT_8_MIN = 0.75
#: the float kernels the warm start runs with, read by torch/MKL at start-up, hence a child process
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
BUILD_THREADS = 2  # a reduction split over another number of threads sums in another order
#: the warm start says where it is at least this often (seconds), with when its next stopping check comes
PROGRESS_EVERY_S = 30


def default_dir(seed: int = 0, heads: int = 4, kv_heads: int = 2) -> str:
    """POPO_TINY_DIR, else ~/.cache/popo_verl/tiny; a task built with seed S != 0 lives in its `seed_S` folder.
    Another attention layout (`--heads 2 --kv-heads 1`: head_dim 32, which vLLM's CPU attention needs) is another
    model: it lives beside the default, in `tiny_h2kv1` (a rebuild of the seed-0 folder never touches it)."""
    root = os.environ.get("POPO_TINY_DIR", os.path.join(os.path.expanduser("~"), ".cache", "popo_verl", "tiny"))
    if (heads, kv_heads) != (TinySpec.heads, TinySpec.kv_heads):
        root = f"{root}_h{heads}kv{kv_heads}"
    return root if seed == 0 else os.path.join(root, f"seed_{seed}")


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    n_test: int = 128
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    max_positions: int = 128
    label_accuracy: float = 0.3  # share of warm-start labels that are right; the rest are off by one
    min_sft_steps: int = 400
    max_sft_steps: int = 1500
    sft_batch: int = 64
    sft_lr: float = 3e-3
    target_pass: float = 0.28  # stop the warm start once the dev pass@1 (temperature 1) reaches this
    eval_samples: int = 8  # samples per held-out prompt for the manifest's pass@1 / pass@8
    # False: keep a warm start that misses the pass@k band (a short build that checks the build itself, not the task)
    check_band: bool = True

    def digest(self) -> str:
        fields = asdict(self)
        if fields["check_band"]:
            del fields["check_band"]  # the default: the same digest as before the field existed, so caches stay valid
        return hashlib.sha256(json.dumps({**fields, "v": BUILD_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- data
LEVELS = {
    1: "one-digit sum",
    2: "two-digit plus one-digit sum (either order)",
}


def all_problems() -> list[tuple[str, str, int]]:
    """Every problem of the task, in a fixed order: (expression, answer, level)."""
    out = {}
    for a in range(100):
        for b in range(10):
            level = 1 if a < 10 else 2
            out[f"{a}+{b}"] = (str(a + b), level)
            out[f"{b}+{a}"] = (str(a + b), level)
    return [(e, ans, lvl) for e, (ans, lvl) in sorted(out.items())]


def split_problems(seed: int, n_test: int) -> tuple[list, list]:
    """(train, test): a seeded shuffle of all problems; the first n_test are held out from everything."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    return problems[n_test:], problems[:n_test]


def question(expr: str) -> str:
    return f"{expr}=? Put the answer in \\boxed{{}}."


def noisy_label(rng: random.Random, answer: str, accuracy: float) -> str:
    """The warm start's label: the answer with probability `accuracy`, otherwise the answer +- 1."""
    if rng.random() < accuracy:
        return answer
    value = int(answer)
    return str(value + 1 if value == 0 else value + rng.choice((-1, 1)))


def make_rows(problems: list[tuple[str, str, int]], split: str) -> list[dict]:
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": question(expr)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": i, "level": level, "expression": expr},
        }
        for i, (expr, answer, level) in enumerate(problems)
    ]


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
def _left_padded(prompts: list[list[int]], pad: int):
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def pass_at_k(model, tok, rows: list[dict], n: int = 8, temperature: float = 1.0, seed: int = 0,
              max_new_tokens: int = 16) -> tuple[float, float]:
    """(pass@1, pass@n) of `rows`: n samples per prompt at `temperature` (0 = greedy, n = 1), scored with
    popo_verl.reward. pass@1 is the mean correctness over the samples, pass@n the share of prompts with one right."""
    import torch

    from popo_verl.reward import compute_score

    greedy = temperature == 0
    n = 1 if greedy else n
    eos, pad = tok.eos_token_id, tok.pad_token_id
    was_training = model.training
    model.eval()
    right = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            ids, mask = _left_padded([chat_ids(tok, r["prompt"][0]["content"]) for r in chunk for _ in range(n)], pad)
            sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, **sampling)
            texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, r in enumerate(chunk):
                truth = r["reward_model"]["ground_truth"]
                right.append([compute_score(r["data_source"], t, truth) >= 1.0 for t in texts[i * n : (i + 1) * n]])
    model.train(was_training)
    if not right:
        return 0.0, 0.0
    return sum(map(sum, right)) / (n * len(right)), sum(map(any, right)) / len(right)


def greedy_pass_at_1(model, tok, rows: list[dict], max_new_tokens: int = 16) -> float:
    """Greedy decoding of every prompt, scored with popo_verl.reward."""
    return pass_at_k(model, tok, rows, temperature=0.0, max_new_tokens=max_new_tokens)[0]


def warm_start(model, tok, spec: TinySpec, train_problems: list, dev_rows: list[dict], log=print) -> tuple[float, int]:
    """Supervised steps on noisy "\\boxed{label}" answers (see the module docstring) until the dev pass@1 at
    temperature 1 reaches `target_pass` (checked every 100 steps from `min_sft_steps`). Returns (dev pass@1, steps)."""
    import torch

    rng = random.Random(spec.seed + 7)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids = {e: chat_ids(tok, question(e)) for e, _, _ in train_problems}
    model.train()
    dev = 0.0
    started = last_note = time.time()
    for step in range(1, spec.max_sft_steps + 1):
        seqs, labels = [], []
        for expr, answer, _ in rng.choices(train_problems, k=spec.sft_batch):
            p = prompt_ids[expr]
            a = tok(f"\\boxed{{{noisy_label(rng, answer, spec.label_accuracy)}}}", add_special_tokens=False)["input_ids"] + [eos]
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
        sched.step()
        now = time.time()
        if now - last_note >= PROGRESS_EVERY_S:  # a line at least every 30 s, with when the next stopping check comes
            last_note = now
            per_step = (now - started) / step
            check = max(-(-spec.min_sft_steps // 100) * 100, (step // 100 + 1) * 100)  # checks: x100, from min_sft_steps
            last = f"at most {per_step * (spec.max_sft_steps - step):.0f} s to go"
            when = (f"next stopping check at step {check}, in about {per_step * (check - step):.0f} s ({last})"
                    if check <= spec.max_sft_steps else f"ends at step {spec.max_sft_steps}, {last}")
            log(f"  warm start step {step} (of at most {spec.max_sft_steps}): loss {loss.item():.3f}, "
                f"{now - started:.0f} s so far; {when}")
        if step >= spec.min_sft_steps and step % 100 == 0:
            dev, dev_k = pass_at_k(model, tok, dev_rows, n=4, seed=spec.seed + step)
            log(f"  warm start step {step}: loss {loss.item():.3f}, dev pass@1 {dev:.3f}, pass@4 {dev_k:.3f} (temperature 1)")
            if dev >= spec.target_pass:
                return dev, step
    return dev, spec.max_sft_steps


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
        log(f"tiny task (seed {spec.seed}) already built in {p['root']} (cached)")
        return p
    if _can_pin_kernels() and not _kernels_pinned():
        return _build_in_pinned_child(out_dir, spec, log)
    t0, cpu0 = time.time(), time.process_time()
    torch.set_num_threads(BUILD_THREADS)
    tmp = Path(str(p["root"]) + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    train_problems, test_problems = split_problems(spec.seed, spec.n_test)
    train_rows, test_rows = make_rows(train_problems, "train"), make_rows(test_problems, "test")
    random.Random(spec.seed + 1).shuffle(train_rows)
    dev_rows = train_rows[:64]  # a monitor for the warm start's stopping rule; the test split stays unseen
    pd.DataFrame(train_rows).to_parquet(tmp / "data" / "train.parquet", index=False)
    pd.DataFrame(test_rows).to_parquet(tmp / "data" / "test.parquet", index=False)

    tok = build_tokenizer()
    model = build_model(spec, tok)
    log(f"tiny task (seed {spec.seed}): warm-starting a {sum(x.numel() for x in model.parameters()):,}-parameter Qwen3 "
        f"on labels right {spec.label_accuracy:.0%} of the time ...")
    dev_acc, steps = warm_start(model, tok, spec, train_problems, dev_rows, log=log)
    test_p1, test_pk = pass_at_k(model, tok, test_rows, n=spec.eval_samples, seed=spec.seed)
    greedy = greedy_pass_at_1(model, tok, test_rows)
    lo, hi = PASS_BAND
    if spec.check_band and not (lo <= test_p1 <= hi and test_pk >= PASS_AT_8_MIN):
        raise RuntimeError(
            f"tiny warm start (seed {spec.seed}) missed its band: held-out pass@1 {test_p1:.3f} (want [{lo}, {hi}]), "
            f"pass@{spec.eval_samples} {test_pk:.3f} (want >= {PASS_AT_8_MIN})"
        )
    save_tokenizer(tok, tmp / "model")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one shard of 400 kB: a progress bar is noise
    model.save_pretrained(tmp / "model")
    manifest = {
        "digest": spec.digest(),
        "version": BUILD_VERSION,
        "spec": asdict(spec),
        "warm_start_steps": steps,
        "dev_pass_at_1": dev_acc,
        "test_pass_at_1": test_p1,  # temperature 1, mean over eval_samples samples per prompt
        f"test_pass_at_{spec.eval_samples}": test_pk,
        "test_greedy_pass_at_1": greedy,
        "n_train": len(train_rows),
        "n_test": len(test_rows),
        "n_params": sum(x.numel() for x in model.parameters()),
        "build_seconds": round(time.time() - t0, 1),
        "build_cpu_seconds": round(time.process_time() - cpu0, 1),  # all of the build's threads
        "kernels": _kernels_description(),
        "levels": LEVELS,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    root = Path(p["root"])
    if root.is_dir():  # the seed-0 folder holds the other seeds' tasks (seed_S/): they move, never get deleted
        for other in root.iterdir():
            if other.name.startswith("seed_"):
                os.replace(other, tmp / other.name)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)  # a half-built task is never left where a run would pick it up
    log(f"tiny task (seed {spec.seed}) built in {p['root']}: held-out pass@1 {test_p1:.3f}, pass@{spec.eval_samples} "
        f"{test_pk:.3f} at temperature 1 (greedy {greedy:.3f}), {manifest['build_seconds']} s "
        f"({manifest['build_cpu_seconds']} s of CPU time)")
    return p


def _can_pin_kernels() -> bool:
    """An x86-64 CPU with AVX2 and FMA, where the pinned kernels run."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags)


def _kernels_pinned() -> bool:
    """This process runs the pinned kernels (set before torch started, as in the build's child process)."""
    import torch

    return (all(os.environ.get(k) == v for k, v in PORTABLE_KERNELS.items())
            and torch.backends.cpu.get_cpu_capability() == "AVX2")


def _kernels_description() -> str:
    import platform

    import torch

    pinned = _can_pin_kernels() and _kernels_pinned()
    return (f"pinned: ATen {torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ.get('MKL_CBWR')}, "
            f"{BUILD_THREADS} threads, torch {torch.__version__}" if pinned else
            f"native: {platform.machine()} ATen {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__} "
            "(not comparable with builds on other machines)")


def _build_in_pinned_child(out_dir, spec: TinySpec, log) -> dict[str, str]:
    """Run the build in a child process whose torch starts with PORTABLE_KERNELS, streaming its progress."""
    import subprocess

    cmd = [sys.executable, "-u", "-m", "popo_verl.tiny", "build", "--out", str(out_dir), "--force",
           "--spec", json.dumps(asdict(spec))]
    env = dict(os.environ, **PORTABLE_KERNELS)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        log(line)
    if proc.wait() != 0:
        raise RuntimeError(f"tiny task build (seed {spec.seed}) failed in its child process:\n" + "\n".join(tail))
    if not is_built(out_dir, spec):
        raise RuntimeError(f"tiny task build (seed {spec.seed}) ended without a complete task in {out_dir}")
    return paths(out_dir)


def ensure_built(out_dir: str | None = None, spec: TinySpec = TinySpec(), log=print) -> dict[str, str]:
    out_dir = out_dir or default_dir(spec.seed, spec.heads, spec.kv_heads)
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
    b.add_argument("--seed", type=int, default=0, help="problem split, initialisation and label noise (default 0)")
    b.add_argument("--heads", type=int, default=TinySpec.heads,
                   help=f"attention heads (default {TinySpec.heads}: head_dim 16); 2 gives head_dim 32, as vLLM's CPU "
                        "attention needs (ROLLOUT=vllm)")
    b.add_argument("--kv-heads", type=int, default=TinySpec.kv_heads, help=f"key/value heads (default {TinySpec.kv_heads})")
    b.add_argument("--out", default=None, help="default: POPO_TINY_DIR or ~/.cache/popo_verl/tiny (seed_S for seed S != 0; "
                                               "tiny_hHkvK for another attention layout)")
    b.add_argument("--force", action="store_true")
    b.add_argument("--spec", default=None, help=argparse.SUPPRESS)  # the whole TinySpec as JSON (the build's child)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        if args.spec:
            spec = TinySpec(**json.loads(args.spec))
        else:
            if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads or TinySpec.hidden_size % args.heads:
                parser.error(f"--heads {args.heads} --kv-heads {args.kv_heads}: heads must divide the hidden size "
                             f"({TinySpec.hidden_size}) and be a multiple of kv-heads")
            spec = TinySpec(seed=args.seed, heads=args.heads, kv_heads=args.kv_heads)
        out = args.out or default_dir(spec.seed, spec.heads, spec.kv_heads)
        # progress on stderr as it happens
        log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
        if args.force:
            build(out, spec, force=True, log=log)
        else:
            ensure_built(out, spec, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
