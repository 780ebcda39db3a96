"""POPO's exploration claim on the tiny task (issue #36): held-out pass@k up to k = 64 at the start and the end of
training, the policy's entropy per step, and the positive-only and negative-only baselines, against verl's GRPO.

Every run trains through benchmarks/learning.py's `run_variant` (scripts/run_tiny_cpu.sh, verl on the CPU backend,
the script's settings; `--steps` sets the horizon) and saves its last policy. The held-out pass@k curve, k = 1, 2, 4,
..., 64, is the unbiased estimator 1 - C(n-c, k) / C(n, k) over n = 64 samples per test prompt at temperature 1
(popo_verl.evaluate, the tiny preset's 32 new tokens). It is measured on the seed's warm start, the reference the
claims are about, and on each run's last policy, with the same sampling seed. The entropy per step is verl's
`actor/entropy`: the old-log-prob pass over all of a step's rollouts, the same pass for every method (POPO's update
sees only the positives; this pass sees them all).

Methods (learning.VARIANTS): POPO; verl's GRPO; PSR (positive-only NLL, uniform weights, no anchor: RAFT-like), NSR
and W-REINFORCE (Zhu et al. 2025, arXiv 2506.01347; popo_verl/algos.py); GRPO with verl's clip_cov policy loss
(Cui et al. 2025, an entropy-preserving mode).

Each finished run is added to OUT/exploration.json at once (`--resume` skips the runs already there). The report,
OUT/exploration.{md,png}: pass@k curves per method (start and end, mean over seeds), entropy per step, pass@1, pass@8
and pass@64 gains with paired 95 % t-intervals against GRPO, pass@8 and pass@64 against the warm start, and training
seconds per +0.1 pass@1.

    python benchmarks/exploration.py --resume      # 6 methods x 3 seeds x 200 steps, into benchmarks/results/
    python benchmarks/exploration.py --report      # the tables and plot from exploration.json; runs nothing
    python benchmarks/exploration.py --quick       # POPO and GRPO, seed 0, 10 steps, n = 8: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # benchmarks/learning.py: the runs and the statistics

sys.path.insert(0, str(learning.ROOT))
from popo_verl import evaluate
from popo_verl.tiny import default_dir
from popo_verl.tiny.summary import latest_policy

ROOT = learning.ROOT
METHODS = ("popo", "grpo", "psr", "nsr", "w_reinforce", "grpo_clip_cov")
BASELINE = "grpo"
N_SAMPLES = 64
STEPS = 200
SEEDS = (0, 1, 2)
TEST_FREQ = 50  # verl's own held-out pass@1 (8 samples) along the way; the pass@k curves come from popo_verl.evaluate
QUICK = {"methods": ("popo", "grpo"), "seeds": (0,), "steps": 10, "n": 8}


def _tiny_dir(seed: int) -> Path:
    return Path(default_dir(seed))


def pass_at_k_curve(model_dir: str | Path, test_file: str | Path, n: int, seed: int = 0,
                    limit: int | None = None) -> dict[int, float]:
    """Held-out pass@k for k = 1, 2, 4, ..., n: n samples per prompt at temperature 1, 32 new tokens (the protocol
    run_tiny_cpu.sh validates with), the unbiased estimator."""
    result = evaluate.evaluate(str(model_dir), [str(test_file)], n=n, temperature=1.0, top_p=1.0, max_new_tokens=32,
                               batch_size=max(1, 512 // n), seed=seed, limit=limit, show_progress=False,
                               verifier="last-boxed")
    row = result["benchmarks"][learning.DATA_SOURCE]
    return {int(k.split("@")[1]): v for k, v in row.items() if k.startswith("pass@")}


def run_method(method: str, seed: int, args, workdir: Path, start_curve: dict[int, float]) -> dict:
    """One training run, then the pass@k curve of its last policy (its checkpoint is deleted after)."""
    run = learning.run_variant(method, seed, args, workdir, save_final=True)
    policy = latest_policy(run.pop("ckpt"))
    if policy is None:
        raise RuntimeError(f"{method} seed {seed}: no saved policy")
    step, path = policy
    end = pass_at_k_curve(path, _tiny_dir(seed) / "data" / "test.parquet", args.n, seed=seed)
    shutil.rmtree(Path(path).parents[2], ignore_errors=True)  # global_step_N: the runs are many, the disk is not
    steps = run["curves"].get("step_s", {})
    run.update({"n": args.n, "final_step": step, "train_s": round(sum(steps.values()), 1),
                "pass_at_k": {"start": {str(k): v for k, v in start_curve.items()},
                              "end": {str(k): v for k, v in end.items()}}})
    return run


# ------------------------------------------------------------------------------------------ the report
def _pk(run: dict, when: str) -> dict[int, float]:
    return {int(k): v for k, v in run["pass_at_k"][when].items()}


def pk_gain(run: dict, k: int) -> float:
    return _pk(run, "end")[k] - _pk(run, "start")[k]


def _by_method(runs: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    return {m: by[m] for m in [*METHODS, *sorted(set(by) - set(METHODS))] if m in by}


def report_ks(kmax: int) -> list[int]:
    """The k the report reads: 1, a middle one (kmax / 8, below the warm start's ceiling on the tiny task), kmax."""
    return sorted({1, max(2, kmax // 8), kmax})


def paired_pk(runs: list[dict], baseline: list[dict], k: int) -> list[float]:
    """pass@k gain of a method minus the baseline's, on the (seed, warm start) pairs both have."""
    base = {learning._key(r): r for r in baseline}
    return [pk_gain(r, k) - pk_gain(base[learning._key(r)], k) for r in sorted(runs, key=learning._key)
            if learning._key(r) in base]


def _entropy(run: dict) -> dict[int, float]:
    return {int(s): v for s, v in run["curves"].get("entropy", {}).items()}


def _edge_mean(curve: dict[int, float], first: bool, width: int = 10) -> float:
    steps = sorted(curve)[:width] if first else sorted(curve)[-width:]
    return statistics.mean(curve[s] for s in steps) if steps else math.nan


def summarise(runs: list[dict], out_dir: Path) -> str:
    """exploration.md and exploration.png; returns the markdown."""
    by = _by_method(runs)
    kmax = min(max(_pk(r, "end")) for r in runs)
    n = runs[0]["n"]
    lines = [f"## Held-out pass@k (n = {n} samples per prompt, temperature 1), warm start -> end of training", "",
             "| method | seeds | steps | pass@1 start -> end | pass@1 gain | "
             f"pass@{kmax} start -> end | pass@{kmax} gain | entropy, first -> last 10 steps | train s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        s1 = statistics.mean(_pk(r, "start")[1] for r in rs)
        e1 = statistics.mean(_pk(r, "end")[1] for r in rs)
        sk = statistics.mean(_pk(r, "start")[kmax] for r in rs)
        ek = statistics.mean(_pk(r, "end")[kmax] for r in rs)
        ent0 = statistics.mean(_edge_mean(_entropy(r), True) for r in rs)
        ent1 = statistics.mean(_edge_mean(_entropy(r), False) for r in rs)
        lines.append(f"| {m} | {len(rs)} | {rs[0]['final_step']} | {s1:.3f} -> {e1:.3f} | "
                     f"{learning._mean_sd([pk_gain(r, 1) for r in rs])} | {sk:.3f} -> {ek:.3f} | "
                     f"{learning._mean_sd([pk_gain(r, kmax) for r in rs])} | {ent0:.3f} -> {ent1:.3f} | "
                     f"{statistics.mean(r['train_s'] for r in rs):.0f} |")
    lines += ["", "Gains are each run's end minus its seed's warm start, with the same samples' protocol; "
              "± is the standard deviation over seeds. Entropy: verl's `actor/entropy` over all of a step's rollouts.", ""]

    base = by.get(BASELINE, [])
    ks = report_ks(kmax)
    lines += [f"## Against {BASELINE.upper()}, paired by seed (mean [95 % t-interval])", "",
              "| method | " + " | ".join(f"pass@{k} gain - {BASELINE}'s" for k in ks) + " |",
              "|---|" + "---|" * len(ks)]
    for m, rs in by.items():
        if m != BASELINE:
            lines.append(f"| {m} | " + " | ".join(learning.interval(paired_pk(rs, base, k)) for k in ks) + " |")
    lines.append("")
    if base:
        learns = all(pk_gain(r, 1) > 0 for r in base)
        lines.append(f"Baseline check: {BASELINE.upper()} " + (
            f"gains held-out pass@1 on every seed ({len(base)}): the comparison stands." if learns else
            "does NOT gain held-out pass@1 on every seed: the comparison against it means nothing."))
    lines.append("")
    for k in ks[1:]:
        lines += [f"## pass@{k} against the warm start (the claim: positive-only training lowers it, POPO does not)",
                  ""]
        for m, rs in by.items():
            d = [pk_gain(r, k) for r in rs]
            if len(d) < learning.MIN_VERDICT_SEEDS:
                verdict = "too few seeds for a reading"
            else:
                _, lo, hi = learning.mean_ci(d)
                verdict = ("above the warm start" if lo > 0 else "below the warm start" if hi < 0
                           else "not distinguishable from the warm start")
            start = statistics.mean(_pk(r, "start")[k] for r in rs)
            lines.append(f"- {m}: {learning.interval(d)} (warm start {start:.3f}): {verdict}")
        lines.append("")
    lines += ["## Cost: training seconds per +0.1 held-out pass@1", "",
              "Training seconds: the sum of verl's `timing_s/step` (rollout, log-probs, update; no validation), one run "
              "at a time on the machine's cores.", "",
              "| method | train s / run | train s per +0.1 pass@1 (mean gain) |", "|---|---|---|"]
    for m, rs in by.items():
        g = statistics.mean(pk_gain(r, 1) for r in rs)
        t = statistics.mean(r["train_s"] for r in rs)
        lines.append(f"| {m} | {t:.0f} | " + (f"{t * 0.1 / g:.0f}" if g > 0 else "no gain") + " |")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "exploration.md").write_text(text)
    _plot(by, out_dir / "exploration.png")
    return text


def _plot(by: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    first = next(iter(by.values()))
    ks = sorted(_pk(first[0], "start"))
    a.plot(ks, [statistics.mean(_pk(r, "start")[k] for r in first) for k in ks], "k--", label="warm start")
    for m, rs in by.items():
        a.plot(ks, [statistics.mean(_pk(r, "end")[k] for r in rs) for k in ks], marker="o", ms=3, label=m)
        steps = sorted(set.intersection(*(set(_entropy(r)) for r in rs)))
        if steps:
            b.plot(steps, [statistics.mean(_entropy(r)[s] for r in rs) for s in steps], label=m)
    a.set_xscale("log", base=2)
    a.set_xlabel("k")
    a.set_ylabel("held-out pass@k")
    a.set_title(f"pass@k at the end (n = {first[0]['n']}), mean over seeds")
    b.set_xlabel("training step")
    b.set_ylabel("actor/entropy (all rollouts)")
    b.set_title("policy entropy per step, mean over seeds")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per run (default: %(default)s)")
    ap.add_argument("--n", type=int, default=N_SAMPLES, help="samples per held-out prompt for pass@k (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="POPO and GRPO, seed 0, 10 steps, n = 8, into results/exploration_quick/")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in exploration.json with the same settings")
    ap.add_argument("--report", action="store_true", help="run nothing: the tables and plot from exploration.json")
    ap.add_argument("--out", default=None, help="default benchmarks/results (--quick: benchmarks/results/exploration_quick)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides passed to every run")
    args = ap.parse_args(argv)
    if args.quick:
        args.methods, args.seeds, args.steps, args.n = list(QUICK["methods"]), list(QUICK["seeds"]), QUICK["steps"], QUICK["n"]
    unknown = set(args.methods) - set(learning.VARIANTS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {sorted(learning.VARIANTS)}")
    if args.n < 1 or args.n & (args.n - 1):
        ap.error(f"--n must be a power of 2 (k = 1, 2, 4, ..., n), got {args.n}")
    out_dir = Path(args.out or ROOT / "benchmarks" / "results" / ("exploration_quick" if args.quick else ""))
    store = out_dir / "exploration.json"
    stored = learning.load_runs(store)
    if args.report:
        runs = learning.runs_of(stored, args.methods, args.seeds)
        if not runs:
            ap.error(f"--report: no run of {args.methods} on seeds {args.seeds} in {store}")
        print(summarise(runs, out_dir))
        return 0
    from tqdm import tqdm

    args.test_freq = min(TEST_FREQ, args.steps)
    out_dir.mkdir(parents=True, exist_ok=True)

    builds = {s: learning.warm_start_id(s) for s in args.seeds}  # hashes the seed's weights: once per seed

    def same(r: dict, m: str, s: int) -> bool:
        return ((r["variant"], r["seed"], r["final_step"], r["n"]) == (m, s, args.steps, args.n)
                and r["overrides"] == learning.VARIANTS[m][1] + list(args.overrides) and r["warm_start"] == builds[s])

    kept = [r for r in stored if args.resume and any(same(r, m, s) for m in args.methods for s in args.seeds)]
    others = [r for r in stored if r not in kept and not (r["variant"] in args.methods and r["seed"] in args.seeds)]
    jobs = [(m, s) for s in args.seeds for m in args.methods if not any(same(r, m, s) for r in kept)]
    workdir = Path("/tmp") / f"popo_exploration_{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    starts: dict[int, dict[int, float]] = {}
    runs = list(kept)
    t0 = time.time()
    for m, s in (bar := tqdm(jobs, desc="exploration runs", file=sys.stdout)):
        bar.set_postfix_str(f"{m} seed {s}")
        if s not in starts:  # the warm start's curve, once per seed: the same model and sampling seed for all
            starts[s] = pass_at_k_curve(_tiny_dir(s) / "model", _tiny_dir(s) / "data" / "test.parquet", args.n, seed=s)
        run = run_method(m, s, args, workdir, starts[s])
        runs.append(run)
        store.write_text(json.dumps(others + runs, indent=1))  # nothing lost if a later run fails
        bar.write(f"{m} seed {s}: pass@1 {starts[s][1]:.3f} -> {_pk(run, 'end')[1]:.3f}, pass@{args.n} "
                  f"{starts[s][args.n]:.3f} -> {_pk(run, 'end')[args.n]:.3f} ({run['wall_s']:.0f} s)")
    print(summarise(runs, out_dir))
    print(f"results: {out_dir / 'exploration.md'}, {store}, {out_dir / 'exploration.png'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
