"""avg@n / pass@k / maj@n evaluation of a model on verl RL parquet files.

    python -m popo_verl.evaluate --model PATH --data aime24.parquet aime25.parquet math500.parquet --out eval/

Samples n responses per problem (vLLM on a GPU machine, HF generate on the CPU), scores each with
`popo_verl.reward.compute_score`, and reports per benchmark (data_source): avg@n (mean accuracy over all
samples), the unbiased pass@k for k = 1, 2, 4, ..., n (Chen et al. 2021), maj@n (majority vote over the
extracted answers) and the mean response length in tokens, and how many responses the verifier failed on
(an exception or a timeout: scored 0, but not a wrong answer). Writes OUT/eval.md, OUT/eval.json and
OUT/pass_at_k.png. `--preset` picks the sampling protocol: the paper's, greedy, or the one verl validates with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from popo_verl.reward import VERIFIERS, extract_answer, is_equiv, normalize_answer, score_response
from popo_verl.templates import LAYOUTS, chat_template


# ------------------------------------------------------------------------------------------ protocols
@dataclass(frozen=True)
class Preset:
    n: int  # samples per problem
    n_aime: int  # samples per AIME problem (30 problems: an average needs many samples)
    temperature: float  # 0 = greedy decoding
    top_p: float
    max_new_tokens: int
    verifier: str


PRESETS = {
    # REF = the POPO authors' reference code (github.com/momo1443/colm2026-POPO, scripts/evaluate.py and its README)
    "paper": Preset(
        n=10,  # REF scripts/evaluate.py --n_samples default
        n_aime=128,  # REF README's AIME 2025 command (--n_samples 128)
        temperature=0.7,  # REF README (--temperature 0.7)
        top_p=0.95,  # REF src/evaluation/evaluator.py
        max_new_tokens=4096,  # REF scripts/evaluate.py --max_tokens default
        verifier="whole",  # REF src/reward/math_verify_reward.py: math-verify over the whole completion
    ),
    "greedy": Preset(n=1, n_aime=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, verifier="whole"),  # REF --eval_greedy
    # what the run scripts validate with (PRESET=verl): avg@16 at temperature 0.6, DeepScaleR's protocol
    "verl": Preset(n=16, n_aime=16, temperature=0.6, top_p=0.95, max_new_tokens=1024, verifier="last-boxed"),
    # what scripts/run_tiny_cpu.sh validates with (VAL_N 8 at temperature 1, 32 new tokens): its summary's pass@1
    "tiny": Preset(n=8, n_aime=8, temperature=1.0, top_p=1.0, max_new_tokens=32, verifier="last-boxed"),
}


def is_aime(data_source: str) -> bool:
    return str(data_source).lower().startswith("aime")


# ------------------------------------------------------------------------------------------ the metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_answer(responses: Sequence[str]) -> str | None:
    """The most frequent extracted answer (normalised); ties go to the earliest; None if nothing extracts."""
    answers = [normalize_answer(a) for a in (extract_answer(r) for r in responses) if a is not None]
    answers = [a for a in answers if a]
    if not answers:
        return None
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def summarise(records: list[dict]) -> dict[str, dict[str, float]]:
    """records: one per problem with data_source, scores (n floats), responses, ground_truth, lengths, and
    optionally verifier_errors / verifier_timeouts (how many of its scores the verifier failed on).
    Each benchmark has its own n (its records' number of samples)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_source[r["data_source"]].append(r)
    out = {}
    for source, recs in sorted(by_source.items()):
        n = len(recs[0]["scores"])
        if any(len(r["scores"]) != n for r in recs):
            raise ValueError(f"{source}: every problem of a benchmark needs the same number of samples")
        row = {"problems": len(recs), "n": n, "avg@n": sum(sum(r["scores"]) / n for r in recs) / len(recs)}
        for k in k_values(n):
            row[f"pass@{k}"] = sum(pass_at_k(n, int(sum(s > 0 for s in r["scores"])), k) for r in recs) / len(recs)
        maj = [majority_answer(r["responses"]) for r in recs]
        row["maj@n"] = sum(m is not None and is_equiv(m, r["ground_truth"]) for m, r in zip(maj, recs)) / len(recs)
        row["mean_response_tokens"] = sum(sum(r["lengths"]) / n for r in recs) / len(recs)
        for key in ("verifier_errors", "verifier_timeouts"):
            row[key] = sum(r.get(key, 0) for r in recs)
        out[source] = row
    return out


# ---------------------------------------------------------------------------------------------- sampling
def load_rows(files: Sequence[str], limit: int | None) -> list[dict]:
    import pandas as pd

    rows = []
    for f in files:
        df = pd.read_parquet(f)
        recs = df.to_dict("records")
        rows += recs[:limit] if limit else recs
    return rows


def _messages(prompt: Any) -> list[dict]:
    return [dict(m) for m in prompt] if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]


def prompt_ids(tok, rows: Sequence[dict]) -> list[list[int]]:
    """Token ids of each row's prompt under the tokenizer's chat template, as verl builds its rollout prompts."""
    out = []
    for r in rows:
        ids = tok.apply_chat_template(_messages(r["prompt"]), add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def load_tokenizer(model_path: str, template: Optional[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if template:
        tok.chat_template = chat_template(template)
    return tok


def context_cap(model_path: str, rows: Sequence[dict], max_new_tokens: int, template: Optional[str]) -> tuple[int, str | None]:
    """(new tokens to ask for, a warning or None): a response cannot run past the model's context
    (max_position_embeddings), so the longest prompt plus the new tokens must fit in it."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if not context or not rows:
        return max_new_tokens, None
    longest = max(map(len, prompt_ids(load_tokenizer(model_path, template), rows)))
    if longest + max_new_tokens <= context:
        return max_new_tokens, None
    capped = max(1, context - longest)
    return capped, (f"--max-new-tokens {max_new_tokens} capped at {capped}: the model's context is {context} positions "
                    f"and the longest prompt has {longest} tokens")


def sample_hf(model_path, rows, n, temperature, top_p, max_new_tokens, batch_size, seed, progress, template=None):
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_path, template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' loading bar, on top of the sampling bar, says nothing here
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    torch.manual_seed(seed)
    outs = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = prompt_ids(tok, chunk)
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        kw.update(do_sample=False) if temperature <= 0 else kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=attention, num_return_sequences=n, **kw)
        gen = gen[:, width:]
        for i in range(len(chunk)):
            texts_i, lens_i = [], []
            for s in gen[i * n : (i + 1) * n].tolist():
                if tok.eos_token_id in s:
                    s = s[: s.index(tok.eos_token_id) + 1]  # what follows is padding
                texts_i.append(tok.decode(s, skip_special_tokens=True))
                lens_i.append(len(s))
            outs.append((texts_i, lens_i))
        progress.update(len(chunk))
    return outs


def sample_vllm(model_path, rows, n, temperature, top_p, max_new_tokens, seed, progress, template=None):  # pragma: no cover - GPU
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed)
    tok = load_tokenizer(model_path, template)
    # token ids, not text: vLLM would add a BOS of its own to text the template already starts with one
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(tok, rows)]
    params = SamplingParams(n=n, temperature=max(temperature, 0.0), top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    results = llm.generate(prompts, params)
    progress.update(len(rows))
    return [([o.text for o in r.outputs], [len(o.token_ids) for o in r.outputs]) for r in results]


def _sample(backend, model_path, rows, n, temperature, top_p, max_new_tokens, batch_size, seed, bar, template):
    # greedy decoding gives one answer: draw it once and count it n times
    draws = 1 if temperature <= 0 else n
    if backend == "vllm":
        samples = sample_vllm(model_path, rows, draws, temperature, top_p, max_new_tokens, seed, bar, template)
    else:
        samples = sample_hf(model_path, rows, draws, temperature, top_p, max_new_tokens, batch_size, seed, bar, template)
    return [(texts * (n // draws), lens * (n // draws)) for texts, lens in samples]


def _pick_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    try:
        import torch

        if torch.cuda.is_available():
            import vllm  # noqa: F401

            return "vllm"
    except ImportError:
        pass
    return "hf"


def evaluate(model_path: str, data_files: Sequence[str], n: int = 16, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 1024, batch_size: int = 8, backend: str = "auto", limit: int | None = None,
             seed: int = 0, out_dir: str | None = None, show_progress: bool = True, n_aime: int | None = None,
             verifier: str = "last-boxed", template: str | None = None, preset: str | None = None) -> dict:
    """``n`` samples per problem (``n_aime`` for AIME benchmarks, default ``n``); ``template`` names a layout of
    popo_verl.templates to use instead of the tokenizer's chat template (the one the model was trained with)."""
    from tqdm import tqdm

    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    rows = load_rows(data_files, limit)
    asked_new_tokens = max_new_tokens
    max_new_tokens, cap_warning = context_cap(model_path, rows, max_new_tokens, template)
    if cap_warning:
        print(f"warning: {cap_warning}", file=sys.stderr, flush=True)
    backend = _pick_backend(backend)
    n_of = lambda row: n_aime if n_aime is not None and is_aime(row["data_source"]) else n  # noqa: E731
    samples: list = [None] * len(rows)
    with tqdm(total=len(rows), desc=f"sampling ({backend})", disable=not show_progress) as bar:
        for group_n in sorted({n_of(r) for r in rows}):
            idx = [i for i, r in enumerate(rows) if n_of(r) == group_n]
            got = _sample(backend, model_path, [rows[i] for i in idx], group_n, temperature, top_p, max_new_tokens,
                          batch_size, seed, bar, template)  # fmt: skip
            for i, s in zip(idx, got):
                samples[i] = s
    records = []
    first_failure = None
    for row, (texts, lens) in zip(rows, samples):
        gt = row["reward_model"]["ground_truth"]
        scored = [score_response(t, gt, verifier) for t in texts]
        first_failure = first_failure or next((s.error or s.timeout for s in scored if s.error or s.timeout), None)
        records.append(
            {
                "data_source": row["data_source"],
                "ground_truth": gt,
                "responses": texts,
                "lengths": lens,
                "scores": [s.score for s in scored],
                "verifier_errors": sum(bool(s.error) for s in scored),
                "verifier_timeouts": sum(bool(s.timeout) for s in scored),
            }
        )
    benchmarks = summarise(records)
    result = {
        "model": model_path,
        "data": [Path(f).name for f in data_files],
        "preset": preset,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_asked": asked_new_tokens,  # more than the model's context allows: capped (see the warning)
        "verifier": verifier,
        "chat_template": template or "tokenizer",
        "backend": backend,
        "benchmarks": benchmarks,
        # responses scored 0 because the verifier failed (not because they were wrong), over all benchmarks
        "verifier_errors": sum(b["verifier_errors"] for b in benchmarks.values()),
        "verifier_timeouts": sum(b["verifier_timeouts"] for b in benchmarks.values()),
        "verifier_first_failure": first_failure,
    }
    if out_dir:
        write_outputs(result, Path(out_dir))
    return result


# ------------------------------------------------------------------------------------------------ output
def markdown(result: dict) -> str:
    rows = result["benchmarks"]
    ks = sorted({int(c.split("@")[1]) for row in rows.values() for c in row if c.startswith("pass@")})
    cols = ["problems", "n", "avg@n"] + [f"pass@{k}" for k in ks] + ["maj@n", "mean_response_tokens"]
    lines = ["| benchmark | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for source, row in rows.items():
        def cell(c):
            if c not in row:
                return "-"  # k above this benchmark's n
            return f"{row[c]:.0f}" if c in ("problems", "n") else f"{row[c]:.1f}" if c == "mean_response_tokens" else f"{100 * row[c]:.2f}"

        lines.append(f"| {source} | " + " | ".join(cell(c) for c in cols) + " |")
    lines += ["", verifier_line(result)]
    return "\n".join(lines)


def verifier_line(result: dict) -> str:
    """How many responses the verifier failed on (each scored 0, counted as wrong above), and the first failure."""
    errors, timeouts = result.get("verifier_errors", 0), result.get("verifier_timeouts", 0)
    line = f"verifier failures: {errors} errors, {timeouts} timeouts"
    if errors or timeouts:
        line += f" (each scored 0; first: {result.get('verifier_first_failure')})"
    return line


def plot_title(result: dict) -> str:
    """Names the model and the data, and the protocol the numbers depend on."""
    model = os.path.basename(str(result["model"]).rstrip("/")) or str(result["model"])
    data = ", ".join(Path(f).stem for f in result["data"])
    protocol = f"T={result['temperature']:g}, {result['verifier']} verifier"
    if result.get("preset"):
        protocol = f"preset {result['preset']}, {protocol}"
    return f"{model} on {data}\n({protocol})"


def write_outputs(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.md").write_text(markdown(result) + "\n")
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    title = plot_title(result)
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for source, row in result["benchmarks"].items():
        ks = k_values(row["n"])
        ax.plot(ks, [100 * row[f"pass@{k}"] for k in ks], marker="o", label=source)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120, metadata={"Title": title})
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the CLI
def _by_preset(field: str, fmt=str) -> str:
    return ", ".join(f"{name} {fmt(getattr(p, field))}" for name, p in PRESETS.items())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory or hub id (required, no default)")
    ap.add_argument("--data", nargs="+", required=True,
                    help="verl parquet files, from python -m popo_verl.data prepare (required, no default)")
    ap.add_argument("--preset", choices=list(PRESETS), default="paper",
                    help="sampling protocol: paper (the POPO reference's: T 0.7, n 128 for AIME, 4096 new tokens, "
                         "its whole-completion verifier), greedy (one greedy answer per problem), verl (what the run "
                         "scripts validate with: avg@16 at T 0.6), tiny (what scripts/run_tiny_cpu.sh validates with: "
                         "avg@8 at T 1, 32 new tokens; its summary's pass@1); the options below override its values "
                         "(default: %(default)s)")
    ap.add_argument("--n", type=int, default=None,
                    help=f"samples per problem, every benchmark (default: the preset's: {_by_preset('n')}; "
                         f"for AIME {_by_preset('n_aime')})")
    ap.add_argument("--temperature", type=float, default=None,
                    help=f"sampling temperature, 0 = greedy (default: the preset's: {_by_preset('temperature')})")
    ap.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling (default: the preset's: {_by_preset('top_p')})")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"longest response (default: the preset's: {_by_preset('max_new_tokens')})")
    ap.add_argument("--verifier", choices=list(VERIFIERS), default=None,
                    help="last-boxed: the last \\boxed{} (or final-answer line) against the gold, the training "
                         "reward; whole: math-verify over the whole completion, the reference's "
                         f"(default: the preset's: {_by_preset('verifier')})")
    ap.add_argument("--chat-template", choices=["tokenizer", *LAYOUTS], default="tokenizer",
                    help="prompt layout: the tokenizer's chat template, or a hand-written one of popo_verl.templates "
                         "(use the one the model was trained with: the run scripts' CHAT_TEMPLATE) (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per HF generate call (default: %(default)s)")
    ap.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                    help="auto: vLLM where a GPU and vLLM are present, else HF generate (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each file (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    ap.add_argument("--out", default="eval_out",
                    help="output directory for eval.md, eval.json, pass_at_k.png (default: %(default)s)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    if args.n is not None and args.n < 1:
        ap.error("--n must be >= 1")
    missing = [f for f in args.data if not os.path.exists(f)]
    if missing:
        ap.error(f"data files not found: {missing} (make them with: python -m popo_verl.data prepare --out DIR)")
    pick = lambda given, preset_value: preset_value if given is None else given  # noqa: E731
    result = evaluate(args.model, args.data, n=pick(args.n, p.n), n_aime=pick(args.n, p.n_aime),
                      temperature=pick(args.temperature, p.temperature), top_p=pick(args.top_p, p.top_p),
                      max_new_tokens=pick(args.max_new_tokens, p.max_new_tokens), batch_size=args.batch_size,
                      backend=args.backend, limit=args.limit, seed=args.seed, out_dir=args.out,
                      verifier=pick(args.verifier, p.verifier), preset=args.preset,
                      template=None if args.chat_template == "tokenizer" else args.chat_template)  # fmt: skip
    print(markdown(result))
    for source, row in result["benchmarks"].items():  # as the training run's summary says it: a fraction
        print(f"{source}: held-out pass@1 {row['avg@n']:.3f} (avg@{row['n']:.0f}, temperature {result['temperature']})")
    print(f"written: {args.out}/eval.md, eval.json, pass_at_k.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
