"""avg@n / pass@k / maj@n evaluation of a model on verl RL parquet files.

    python -m popo_verl.evaluate --model PATH --data math500.parquet aime25.parquet --n 16 --out eval/

Samples n responses per problem (vLLM on a GPU machine, HF generate on the CPU), scores each with
`popo_verl.reward.compute_score`, and reports per benchmark (data_source): avg@n (mean accuracy over all
samples), the unbiased pass@k for k = 1, 2, 4, ..., n (Chen et al. 2021), maj@n (majority vote over the
extracted answers) and the mean response length in tokens. Writes OUT/eval.md, OUT/eval.json and
OUT/pass_at_k.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from popo_verl.reward import compute_score, extract_answer, is_equiv, normalize_answer


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


def summarise(records: list[dict], n: int) -> dict[str, dict[str, float]]:
    """records: one per problem with data_source, scores (n floats), responses, ground_truth, lengths."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_source[r["data_source"]].append(r)
    out = {}
    for source, recs in sorted(by_source.items()):
        row = {"problems": len(recs), "avg@n": sum(sum(r["scores"]) / n for r in recs) / len(recs)}
        for k in k_values(n):
            row[f"pass@{k}"] = sum(pass_at_k(n, int(sum(s > 0 for s in r["scores"])), k) for r in recs) / len(recs)
        maj = [majority_answer(r["responses"]) for r in recs]
        row[f"maj@{n}"] = sum(m is not None and is_equiv(m, r["ground_truth"]) for m, r in zip(maj, recs)) / len(recs)
        row["mean_response_tokens"] = sum(sum(r["lengths"]) / n for r in recs) / len(recs)
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


def sample_hf(model_path, rows, n, temperature, top_p, max_new_tokens, batch_size, seed, progress):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    torch.manual_seed(seed)
    greedy = temperature <= 0
    outs = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts = [tok.apply_chat_template(_messages(r["prompt"]), add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        kw.update(do_sample=False) if greedy else kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        with torch.no_grad():
            gen = model.generate(**enc, num_return_sequences=1 if greedy else n, **kw)
        gen = gen[:, enc["input_ids"].shape[1] :]
        per = 1 if greedy else n
        for i in range(len(chunk)):
            seqs = gen[i * per : (i + 1) * per].tolist()
            if greedy:
                seqs = seqs * n  # greedy: n identical samples
            texts_i, lens_i = [], []
            for s in seqs:
                if tok.eos_token_id in s:
                    s = s[: s.index(tok.eos_token_id) + 1]
                s = [t for t in s if t != tok.pad_token_id]
                texts_i.append(tok.decode(s, skip_special_tokens=True))
                lens_i.append(len(s))
            outs.append((texts_i, lens_i))
        progress.update(len(chunk))
    return outs


def sample_vllm(model_path, rows, n, temperature, top_p, max_new_tokens, seed, progress):  # pragma: no cover - GPU
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(_messages(r["prompt"]), add_generation_prompt=True, tokenize=False) for r in rows]
    params = SamplingParams(n=n, temperature=max(temperature, 0.0), top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    results = llm.generate(prompts, params)
    progress.update(len(rows))
    return [([o.text for o in r.outputs], [len(o.token_ids) for o in r.outputs]) for r in results]


def evaluate(model_path: str, data_files: Sequence[str], n: int = 16, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 1024, batch_size: int = 8, backend: str = "auto", limit: int | None = None,
             seed: int = 0, out_dir: str | None = None, show_progress: bool = True) -> dict:
    from tqdm import tqdm

    rows = load_rows(data_files, limit)
    if backend == "auto":
        backend = "hf"
        try:
            import torch

            if torch.cuda.is_available():
                import vllm  # noqa: F401

                backend = "vllm"
        except ImportError:
            pass
    with tqdm(total=len(rows), desc=f"sampling ({backend})", disable=not show_progress) as bar:
        if backend == "vllm":
            samples = sample_vllm(model_path, rows, n, temperature, top_p, max_new_tokens, seed, bar)
        else:
            samples = sample_hf(model_path, rows, n, temperature, top_p, max_new_tokens, batch_size, seed, bar)
    records = []
    for row, (texts, lens) in zip(rows, samples):
        gt = row["reward_model"]["ground_truth"]
        records.append(
            {
                "data_source": row["data_source"],
                "ground_truth": gt,
                "responses": texts,
                "lengths": lens,
                "scores": [compute_score(row["data_source"], t, gt) for t in texts],
            }
        )
    table = summarise(records, n)
    result = {"model": model_path, "n": n, "temperature": temperature, "backend": backend, "benchmarks": table}
    if out_dir:
        write_outputs(result, Path(out_dir))
    return result


def markdown(result: dict) -> str:
    n = result["n"]
    cols = ["problems", "avg@n"] + [f"pass@{k}" for k in k_values(n)] + [f"maj@{n}", "mean_response_tokens"]
    lines = ["| benchmark | " + " | ".join(c.replace("avg@n", f"avg@{n}") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for source, row in result["benchmarks"].items():
        vals = [f"{row[c]:.0f}" if c == "problems" else f"{row[c]:.1f}" if c == "mean_response_tokens" else f"{100 * row[c]:.2f}" for c in cols]
        lines.append(f"| {source} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.md").write_text(markdown(result) + "\n")
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    ks = k_values(result["n"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for source, row in result["benchmarks"].items():
        ax.plot(ks, [100 * row[f"pass@{k}"] for k in ks], marker="o", label=source)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(os.path.basename(str(result["model"]).rstrip("/")))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval_out")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    missing = [f for f in args.data if not os.path.exists(f)]
    if missing:
        ap.error(f"data files not found: {missing} (make them with: python -m popo_verl.data prepare --out DIR)")
    result = evaluate(args.model, args.data, n=args.n, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, backend=args.backend,
                      limit=args.limit, seed=args.seed, out_dir=args.out)
    print(markdown(result))
    print(f"written: {args.out}/eval.md, eval.json, pass_at_k.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
