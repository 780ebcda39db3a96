"""Learning on the tiny task: POPO vs verl's GRPO and POPO's ablations, same warm start, budget and seeds.

Every run trains through `scripts/run_tiny_cpu.sh` (verl on the CPU backend) with the script's tuned
defaults (steps, batch, lr, temperature), so all variants share one budget. A seed S is the tiny task
built with `--seed S` (its own problem split, initialisation and label noise) plus the data/rollout seed:
POPO and GRPO on seed S start from the same warm start and the same held-out prompts.
Held-out validation runs before training and every `--test-freq` steps with VAL_N=8 samples per prompt
at temperature 1: pass@1 is verl's `val-core/tiny_arith/acc/mean@8`, pass@8 its `acc/best@8/mean`.
POPO runs log Theorem 3.1's `popo/neg_logprob_delta` and `popo/pos_logprob_delta` every step.

Each finished run is appended to benchmarks/results/learning.json at once (an interrupted benchmark keeps
what it measured; `--resume` skips the runs already there). At the end it writes learning.md (tables: gain
mean ± std, POPO - GRPO paired by seed with a 95 % interval, each ablation against POPO, Theorem 3.1) and
learning.png (curves), and prints the last line `held-out pass@1 gain: POPO=A GRPO=B (N seeds)`.

    python benchmarks/learning.py --quick      # POPO and GRPO, 3 seeds, 20 steps at constant lr (results/quick/)
    python benchmarks/learning.py --resume     # every variant, 5 seeds (about 7 h on 2 cores)
    python benchmarks/learning.py --report     # the tables and plot from learning.json; runs nothing
    python benchmarks/learning.py --compare popo=runs/.../train.log grpo=runs/.../train.log --out my_plots
                                               # your own runs: held-out pass@1 and pass@8, reward, from their logs

`--quick` is a check that both methods learn, not the comparison: 20 steps at the constant lr 1e-3 (a cosine
over 20 steps would spend half of them at low lr; tests/test_learning.py's budget), validation before and
after: 22 min for the 6 runs on a 2-core EPYC (25 steps took 236-274 s a run there, 25+ min in all). At this
budget GRPO gained -0.046..+0.075 (one seed fell), POPO +0.026..+0.092: a check that training moves.
Its results go to benchmarks/results/quick/, never over the full benchmark's. A run without `--resume` redoes
the variants and seeds it is asked for and keeps every other run in learning.json.

A seed's runs all come from one build of its task (the build is deterministic per machine, not across
machines): `--resume` keeps another machine's POPO/GRPO pair of a seed, and pairs runs only within a build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LORA = ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16", "actor_rollout_ref.model.lora.merge=true"]
#: name -> (ALGO of run_tiny_cpu.sh, hydra overrides). The ablations are the paper's.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "popo": ("popo", []),
    "grpo": ("grpo", []),
    "popo_uniform_weights": ("popo", ["algorithm.popo.weight_mode=uniform"]),
    "popo_alpha0": ("popo", ["algorithm.popo.alpha=0"]),
    "popo_frozen_siamese": ("popo", ["algorithm.popo.tau=1.0"]),
    "popo_no_predictor": ("popo", ["algorithm.popo.predictor_layers=0"]),
    "popo_kl_anchor": ("popo", ["algorithm.popo.anchor=kl"]),
    "popo_tau0.9": ("popo", ["algorithm.popo.tau=0.9"]),
    "popo_tau0.99": ("popo", ["algorithm.popo.tau=0.99"]),
    "popo_tau0.999": ("popo", ["algorithm.popo.tau=0.999"]),
    "popo_noise0": ("popo", ["algorithm.popo.feature_noise_std=0"]),
    "popo_nll_sequence": ("popo", ["algorithm.popo.nll_norm=sequence"]),  # the nll_norm option (default token)
    # the exploration study's baselines (Zhu et al. 2025; issue #36)
    "psr": ("psr", []),
    "nsr": ("nsr", []),
    "w_reinforce": ("w_reinforce", []),
    # one of verl's entropy-preserving policy losses (Cui et al. 2025, arXiv 2505.22617), at verl's defaults
    "grpo_clip_cov": ("grpo", ["actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov"]),
    # positive-aware dynamic sampling (issue #35): regenerate the groups without a positive until all 16 of the
    # step's groups (run_tiny_cpu.sh's TRAIN_BATCH) have one, within max_gen_rounds (3) x 16 prompts
    "popo_dynamic": ("popo", ["algorithm.popo.min_groups_with_positive=16"]),
    # LoRA (issue #35): rank-8 adapters on every linear layer, the base frozen; the siamese is the base plus an EMA of
    # the adapters. The hf rollout takes the adapters merged into the base.
    "popo_lora": ("popo", LORA),
    "popo_lora_lr3e-3": ("popo", [*LORA, "actor_rollout_ref.actor.optim.lr=3e-3"]),  # LoRA's usual larger step
}
MAIN = ("popo", "grpo")
QUICK_STEPS = 20
QUICK_OVERRIDES = ["actor_rollout_ref.actor.optim.lr_scheduler_type=constant"]
#: measured on request only (`--variants popo_nll_sequence`, `--variants psr nsr w_reinforce`): not the paper's ablations
EXTRA = ("popo_nll_sequence", "psr", "nsr", "w_reinforce", "grpo_clip_cov", "popo_dynamic", "popo_lora",
         "popo_lora_lr3e-3")
DATA_SOURCE = "tiny_arith"
VAL_N = 8
STEP_METRICS = {"reward": "critic/score/mean", "neg_delta": "popo/neg_logprob_delta", "pos_delta": "popo/pos_logprob_delta",
                "step_s": "timing_s/step", "gen_rounds": "popo/gen_rounds",
                "groups_without_positive": "popo/groups_without_positive",
                "entropy": "actor/entropy"}  # verl's old-log-prob pass over all of a step's rollouts, every method


def parse_steps(text: str) -> list[tuple[int, dict[str, float]]]:
    """verl's console lines `step:N - key:value - ...`, parsed by popo_verl.tiny.summary (stdlib only)."""
    sys.path.insert(0, str(ROOT))
    from popo_verl.tiny.summary import parse_steps as _parse

    return _parse(text)


def val_keys(n: int = VAL_N) -> tuple[str, str]:
    """verl's keys for sampled pass@1 (mean over n samples) and pass@n (bootstrap best-of-n)."""
    return f"val-core/{DATA_SOURCE}/acc/mean@{n}", f"val-core/{DATA_SOURCE}/acc/best@{n}/mean"


def curves_from_log(text: str, val_n: int = VAL_N) -> dict[str, dict[int, float]]:
    k1, kn = val_keys(val_n)
    out: dict[str, dict[int, float]] = {"pass@1": {}, f"pass@{val_n}": {}, **{name: {} for name in STEP_METRICS}}
    for step, metrics in parse_steps(text):
        if k1 in metrics:
            out["pass@1"][step] = metrics[k1]
        if kn in metrics:
            out[f"pass@{val_n}"][step] = metrics[kn]
        for name, key in STEP_METRICS.items():
            if key in metrics and not math.isnan(metrics[key]):
                out[name][step] = metrics[key]
    return out


def warm_start_id(seed: int) -> str:
    """A hash of the seed's warm-start weights (the task is built first if needed, as the run script would).

    The build is deterministic on one machine, not across machines (float kernels differ by CPU), so runs stored
    from another build start elsewhere and must not be paired with, or stand in for, runs of this one."""
    import hashlib

    sys.path.insert(0, str(ROOT))
    from popo_verl.tiny import TinySpec, default_dir, ensure_built

    paths = ensure_built(default_dir(seed), TinySpec(seed=seed), log=lambda *a: None)
    weights = Path(paths["model"]) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def run_variant(name: str, seed: int, args, workdir: Path, save_final: bool = False) -> dict:
    """One run through run_tiny_cpu.sh. save_final: keep its last policy (the run's `ckpt` folder is returned; the
    caller deletes it)."""
    algo, overrides = VARIANTS[name]
    log = workdir / f"{name}_s{seed}.log"
    # RAY_ADDRESS=local: every run starts its own Ray instance, never joins another run's or a user's cluster
    env = dict(os.environ, RAY_ADDRESS="local", ALGO=algo, TINY_SEED=str(seed), SEED=str(seed), TEST_FREQ=str(args.test_freq),
               VAL_N=str(VAL_N), SAVE_FREQ="-1", LOG_FILE=str(log),
               CKPT_DIR=str(workdir / f"ckpt_{name}_{seed}_{time.time_ns()}"))
    if save_final:
        env.pop("SAVE_FREQ")  # the script's default: one checkpoint, at the last step
    if args.steps:
        env["TOTAL_STEPS"] = str(args.steps)
    extra = ["trainer.resume_mode=disable", f"actor_rollout_ref.rollout.seed={seed}"]
    if algo == "popo":
        extra.append("algorithm.popo.implicit_negative_interval=1")
    cmd = ["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), *extra, *overrides, *args.overrides]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (log {log}):\n{out[-4000:]}")
    curves = curves_from_log(log.read_text(errors="replace"))  # verl's whole step lines (the console shows them short)
    if len(curves["pass@1"]) < 2:
        raise RuntimeError(f"{name} seed {seed}: fewer than two held-out measurements in the log {log}")
    run = {"variant": name, "seed": seed, "steps": max(curves["pass@1"]), "wall_s": round(time.time() - t0, 1),
           "overrides": overrides + list(args.overrides), "warm_start": warm_start_id(seed),
           "curves": {m: {str(s): v for s, v in c.items()} for m, c in curves.items()}}
    return {**run, "ckpt": env["CKPT_DIR"]} if save_final else run


# ------------------------------------------------------------------------------------------ statistics
def _t95(df: int) -> float:
    """Two-sided 95 % critical value of Student's t with df degrees of freedom."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    if df in table:
        return table[df]
    below = [d for d in table if d < df]
    return table[max(below)] if below and df < 30 else 1.96


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95 % t-interval (an infinite one for a single value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, -math.inf, math.inf
    half = _t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def _curve(run: dict, metric: str) -> dict[int, float]:
    return {int(s): v for s, v in run["curves"].get(metric, {}).items()}


def start_end(run: dict, metric: str = "pass@1") -> tuple[float, float]:
    c = _curve(run, metric)
    return c[min(c)], c[max(c)]


def gain(run: dict, metric: str = "pass@1") -> float:
    s, e = start_end(run, metric)
    return e - s


def paired(results_a: list[dict], results_b: list[dict]) -> list[float]:
    """Gain of a minus gain of b on the (seed, warm start) pairs both have, in seed order."""
    by_key = {_key(r): r for r in results_b}
    return [gain(r) - gain(by_key[_key(r)]) for r in sorted(results_a, key=_key) if _key(r) in by_key]


def _key(run: dict) -> tuple[int, str]:
    """Runs pair when they share the seed *and* the warm start: one seed built on two machines is two tasks."""
    return run["seed"], run.get("warm_start", "")


#: fewer paired seeds than this give an ablation no reading (with two, the t interval can be of zero width)
MIN_VERDICT_SEEDS = 3


def _direction(lo: float, hi: float) -> str:
    if lo > 0:
        return "helps (interval above 0)"
    if hi < 0:
        return "hurts (interval below 0)"
    return "no clear effect (interval spans 0)"


def interval(d: list[float]) -> str:
    """'mean [low, high], n seeds' of paired differences (exploration.py's too)."""
    if not d:
        return "no paired run"
    m, lo, hi = mean_ci(d)
    return f"{m:+.3f} " + (f"[{lo:+.3f}, {hi:+.3f}]" if len(d) > 1 else "(no interval)") + f", {_seeds(len(d))}"


def _vs(runs: list[dict], baseline: list[dict]) -> str:
    """The gain of runs minus the gain of baseline, paired by seed."""
    return interval(paired(runs, baseline))


def load_runs(store: Path) -> list[dict]:
    """The runs a benchmark stored (learning.json, exploration.json), none before its first."""
    return json.loads(store.read_text()) if store.exists() else []


def runs_of(runs: list[dict], variants, seeds) -> list[dict]:
    return [r for r in runs if r["variant"] in variants and r["seed"] in seeds]


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def summarise(results: list[dict], out_dir: Path) -> str:
    """learning.md (tables and verdicts) and learning.png; returns the markdown."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    order = [v for v in VARIANTS if v in by] + [v for v in by if v not in VARIANTS]
    kn = f"pass@{VAL_N}"
    lines = ["## Held-out pass@1 and pass@8 (temperature 1), start -> end of training", "",
             f"| variant | seeds | steps | start pass@1 | final pass@1 | gain (mean ± std) | min gain | final {kn} | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in order:
        runs = by[v]
        gains = [gain(r) for r in runs]
        lines.append(
            f"| {v} | {len(runs)} | {runs[0]['steps']} | {_mean_sd([start_end(r)[0] for r in runs])} | "
            f"{_mean_sd([start_end(r)[1] for r in runs])} | {_mean_sd(gains)} | {min(gains):+.3f} | "
            f"{_mean_sd([start_end(r, kn)[1] for r in runs if _curve(r, kn)] or [float('nan')])} | "
            f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
    lines.append("")
    lines += ["Each seed is one build of the tiny task, named by a hash of its warm-start weights (the build is "
              "deterministic on one machine, not across machines); runs pair only within one build.", ""]
    for key in sorted({_key(r) for r in results}):
        names = [r["variant"] for r in results if _key(r) == key]
        lines.append(f"- seed {key[0]}, warm start `{key[1]}`: {', '.join(names)}")
    lines.append("")
    if "grpo" in by:
        g = [gain(r) for r in by["grpo"]]
        works = all(x > 0 for x in g)
        lines += ["## Is the baseline learning?", "",
                  f"verl's GRPO gains {_mean_sd(g)} held-out pass@1 (min {min(g):+.3f}) over {_seeds(len(g))}: "
                  + ("it learns on every seed, so the comparisons below mean something." if works else
                     "it does NOT improve on every seed, so the comparisons below mean little."), ""]
    else:
        lines += ["## Is the baseline learning?", "",
                  "verl's GRPO was not run in this set: nothing here compares POPO with GRPO; the tables below "
                  "compare POPO's own variants, from the same warm starts.", ""]
    if "popo" in by and "grpo" in by:
        d = paired(by["popo"], by["grpo"])
        m, lo, hi = mean_ci(d)
        lines += ["## POPO - GRPO, paired by seed", "",
                  f"gain difference {m:+.3f}, 95 % interval [{lo:+.3f}, {hi:+.3f}] over {len(d)} seeds; "
                  f"target POPO >= GRPO - 0.02: {'met' if m >= -0.02 else 'missed'} on the mean"
                  + (", and the interval lies above -0.02" if lo >= -0.02 else "") + ".", ""]
    # popo_dynamic adds to POPO rather than removing a part: its own section below reads it
    ablations = [v for v in order if v not in MAIN and v != "popo_dynamic" and "popo" in by]
    if ablations:
        lines += ["## Each ablation against POPO (gain of the ablation - gain of POPO, paired by seed)", "",
                  "The last column pairs the ablation with GRPO instead: where POPO trails GRPO, it shows which "
                  "component's removal closes the gap.", "",
                  "| variant | seeds | difference | 95 % interval | reading | minus GRPO's gain (95 % interval, seeds) |",
                  "|---|---|---|---|---|---|"]
        for v in ablations:
            d = paired(by[v], by["popo"])
            if not d:
                continue
            m, lo, hi = mean_ci(d)
            # a component helps when removing it lowers the gain
            reading = {"helps (interval above 0)": "the ablation learns more: the component does not help here",
                       "hurts (interval below 0)": "the ablation learns less: the component helps here"}.get(
                _direction(lo, hi), "no clear effect on this task")
            interval = f"[{lo:+.3f}, {hi:+.3f}]" if len(d) > 1 else "none (one seed)"
            if len(d) < MIN_VERDICT_SEEDS:  # two equal differences give a zero-width interval, not evidence
                reading = (f"{'one seed' if len(d) == 1 else f'{len(d)} seeds'}: no verdict (the sampling noise of "
                           "pass@1 alone is about 0.015)")
            lines.append(f"| {v} | {len(d)} | {m:+.3f} | {interval} | {reading} | {_vs(by[v], by.get('grpo', []))} |")
        lines.append("")
    if "popo" in by and any(_curve(r, "neg_delta") for r in by["popo"]):
        neg = [x for r in by["popo"] for x in _curve(r, "neg_delta").values()]
        pos = [x for r in by["popo"] for x in _curve(r, "pos_delta").values()]
        lines += ["## Theorem 3.1: negatives pushed down without being trained on (POPO runs)", "",
                  f"popo/neg_logprob_delta mean {statistics.mean(neg):+.5f} per step ({sum(x < 0 for x in neg)}/{len(neg)} "
                  f"steps below 0), popo/pos_logprob_delta mean {statistics.mean(pos):+.5f} "
                  f"({sum(x > 0 for x in pos)}/{len(pos)} steps above 0); the negatives were never in the update. "
                  f"Target neg_logprob_delta < 0 on average: {'met' if statistics.mean(neg) < 0 else 'missed'}.", ""]
    if "popo" in by and "popo_dynamic" in by:
        lines += dynamic_sampling_section(by["popo_dynamic"], by["popo"], out_dir / "dynamic_sampling.png")
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning.md").write_text(text + "\n")
    _plot(by, order, out_dir / "learning.png")
    return text


def _seconds_at(run: dict) -> dict[int, float]:
    """Training seconds spent up to each step (the sum of verl's timing_s/step; validation not counted)."""
    step_s, total, out = _curve(run, "step_s"), 0.0, {0: 0.0}
    for s in sorted(step_s):
        total += step_s[s]
        out[s] = total
    return out


def dynamic_sampling_section(dynamic: list[dict], popo: list[dict], png: Path) -> list[str]:
    """Positive-aware dynamic sampling against POPO without it: held-out pass@1 per step and per training second,
    paired by seed, and the plot of both curves against steps and against seconds."""
    base = {_key(r): r for r in popo}
    pairs = [(r, base[_key(r)]) for r in sorted(dynamic, key=_key) if _key(r) in base]
    if not pairs:
        return []
    lines = ["## Positive-aware dynamic sampling (popo_dynamic) against POPO without it, paired by seed", "",
             "popo_dynamic: `algorithm.popo.min_groups_with_positive=16` (every group of the step's batch with a "
             "positive, at most max_gen_rounds = 3 rounds of 16 prompts). Training seconds: the sum of verl's "
             "`timing_s/step` (generation, reward, forwards and update; validation excluded), measured side by side "
             "in one benchmark run, one run at a time.", "",
             "| seed | variant | gen rounds / step | groups without a positive / step | pass@1 start -> end | gain | "
             "training s | gain per 1000 training s |", "|---|---|---|---|---|---|---|---|"]
    per_s: dict[str, list[float]] = {"popo_dynamic": [], "popo": []}
    total_s = {id(run): max(_seconds_at(run).values()) for pair in pairs for run in pair}
    for r, b in pairs:
        for run in (r, b):
            secs = total_s[id(run)]
            rounds = _curve(run, "gen_rounds")
            without = _curve(run, "groups_without_positive")
            per_s[run["variant"]].append(1000 * gain(run) / secs if secs else float("nan"))
            lines.append(
                f"| {run['seed']} | {run['variant']} | {statistics.mean(rounds.values()) if rounds else 1.0:.3f} | "
                f"{statistics.mean(without.values()) if without else float('nan'):.2f} | "
                "{:.3f} -> {:.3f} | ".format(*start_end(run)) + f"{gain(run):+.3f} | {secs:.0f} | {per_s[run['variant']][-1]:+.3f} |")
    base_gains = [gain(b) for _, b in pairs]
    lines += ["", f"The baseline, POPO without dynamic sampling, gains {_mean_sd(base_gains)} (min {min(base_gains):+.3f}): "
              + ("it learns on every seed, so the comparison means something." if min(base_gains) > 0 else
                 "it does NOT improve on every seed, so the comparison means little.")]
    d = [gain(r) - gain(b) for r, b in pairs]
    m, lo, hi = mean_ci(d)
    ratio = [total_s[id(r)] / total_s[id(b)] for r, b in pairs]
    dps = [x - y for x, y in zip(per_s["popo_dynamic"], per_s["popo"])]
    mp, lop, hip = mean_ci(dps)
    lines += ["", f"Per step: gain difference (dynamic - POPO) {m:+.3f}, 95 % interval [{lo:+.3f}, {hi:+.3f}] over "
              f"{_seeds(len(d))}: {_direction(lo, hi)}.",
              f"Per training second: dynamic sampling's runs took {statistics.mean(ratio):.2f}x POPO's training time "
              f"(per seed {', '.join(f'{x:.2f}' for x in ratio)}); gain per 1000 training s, difference {mp:+.3f}, "
              f"95 % interval [{lop:+.3f}, {hip:+.3f}]: {_direction(lop, hip)}.", ""]
    _plot_dynamic([r for r, _ in pairs], [b for _, b in pairs], png)
    lines += [f"Plot: `{png.name}` (held-out pass@1 against the training step and against training seconds).", ""]
    return lines


def _plot_dynamic(dynamic: list[dict], popo: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for runs, colour, name in ((popo, "C0", "POPO"), (dynamic, "C2", "POPO + dynamic sampling")):
        for i, run in enumerate(runs):
            curve, secs = _curve(run, "pass@1"), _seconds_at(run)
            steps = sorted(curve)
            label = name if i == 0 else None
            axes[0].plot(steps, [curve[s] for s in steps], color=colour, marker="o", markersize=3, alpha=0.8, label=label)
            timed = [s for s in steps if s in secs]
            axes[1].plot([secs[s] for s in timed], [curve[s] for s in timed], color=colour, marker="o", markersize=3,
                         alpha=0.8, label=label)
    for ax, xlabel in zip(axes, ("training step", "training seconds (sum of timing_s/step)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out pass@1 (T=1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("per step (one line per seed)")
    axes[1].set_title("per training second")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(runs: list[dict], metric: str) -> tuple[list[int], list[float]]:
    steps = sorted({s for r in runs for s in _curve(r, metric)})
    ys = [statistics.mean(c[s] for r in runs if s in (c := _curve(r, metric))) for s in steps]
    return steps, ys


def _plot(by: dict[str, list[dict]], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [("pass@1", "held-out pass@1 (T=1)"), (f"pass@{VAL_N}", f"held-out pass@{VAL_N}"),
              ("reward", "training reward (mean of the step's rollouts)")]
    for ax, (metric, label) in zip(axes.flat, panels):
        for v in order:
            steps, ys = _mean_curve(by[v], metric)
            if metric == "reward" and len(ys) > 5:  # a 5-step running mean: one step's 128 rollouts are noisy
                ys = [statistics.mean(ys[max(0, i - 4) : i + 1]) for i in range(len(ys))]
            if steps:
                n = len(by[v])
                ax.plot(steps, ys, marker="o" if metric != "reward" else None, markersize=3,
                        label=f"{v} ({n} seed{'s' if n > 1 else ''})",
                        linewidth=2.5 if v in MAIN else 1, color={"popo": "C0", "grpo": "C3"}.get(v))
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(f"{label}, mean over seeds")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[1][1]
    for metric, colour, label in (("neg_delta", "C3", "negatives (never in the update)"), ("pos_delta", "C2", "positives")):
        steps, ys = _mean_curve(by.get("popo", []), metric)
        if steps:
            ax.plot(steps, ys, color=colour, label=f"POPO: {label}")
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("change of length-normalised log-prob")
    ax.set_title("Theorem 3.1: log-prob change across each update")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_logs(named_logs: list[str], out_dir: Path) -> str:
    """The curves of any runs of scripts/run_tiny_cpu.sh (NAME=LOG, the full log its first line names): a table of
    held-out pass@1 and pass@8 at the first and last validation, and OUT/compare.png (the benchmark's panels)."""
    by, rows = {}, ["| run | log | steps | held-out pass@1 | held-out pass@8 |", "|---|---|---|---|---|"]
    for item in named_logs:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise SystemExit(f"--compare takes NAME=LOG, got {item!r}")
        try:
            curves = curves_from_log(Path(path).read_text(errors="replace"))
        except OSError as e:
            raise SystemExit(f"--compare: cannot read {path}: {e}") from None
        if not curves["pass@1"]:
            raise SystemExit(f"--compare: {path} has no held-out validation (verl's val-core/.../acc/mean@{VAL_N})")
        run = {"variant": name, "seed": 0, "curves": {m: {str(k): v for k, v in c.items()} for m, c in curves.items()}}
        by[name] = [run]
        cells = ["{:.3f} -> {:.3f}".format(*start_end(run, metric)) if curves[metric] else "-"
                 for metric in ("pass@1", f"pass@{VAL_N}")]
        rows.append(f"| {name} | {path} | {max(curves['pass@1'])} | {cells[0]} | {cells[1]} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(by, list(by), out_dir / "compare.png")
    return "\n".join(rows + ["", f"plot: {out_dir / 'compare.png'}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"POPO and GRPO on seeds 0 1 2, {QUICK_STEPS} steps at constant lr, into results/quick/")
    ap.add_argument("--variants", nargs="*", default=[v for v in VARIANTS if v not in EXTRA])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: run_tiny_cpu.sh's)")
    ap.add_argument("--test-freq", type=int, default=None,
                    help="held-out validation every N steps (default 20; --quick: at the end only; ~16 s each)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in learning.json with the same settings")
    ap.add_argument("--out", default=None, help="default benchmarks/results (--quick: benchmarks/results/quick)")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: tables and plot from the runs of the asked variants and seeds in learning.json")
    ap.add_argument("--compare", nargs="+", metavar="NAME=LOG", default=None,
                    help="run nothing: plot runs of your own from their full logs (runs/<project>/<run>/train.log) "
                         "into OUT/compare.png (OUT: --out, default the current folder)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides passed to every run")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare_logs(args.compare, Path(args.out or ".")))
        return 0
    if args.quick:
        args.variants, args.seeds = list(MAIN), [0, 1, 2]
        args.steps = args.steps or QUICK_STEPS
        args.overrides = QUICK_OVERRIDES + list(args.overrides)
    if args.test_freq is None:
        args.test_freq = args.steps if args.quick else 20
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    from tqdm import tqdm

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "learning.json"
    stored = load_runs(store)
    if args.report:
        results = runs_of(stored, args.variants, args.seeds)
        if not results:
            ap.error(f"--report: no run of {args.variants} on seeds {args.seeds} in {store}")
        print(summarise(results, out_dir))
        _print_gain(results)
        return 0

    starts: dict[int, str] = {}

    def settings_match(r):
        return (r["variant"] in VARIANTS and r["overrides"] == VARIANTS[r["variant"]][1] + list(args.overrides)
                and (not args.steps or r["steps"] == args.steps))

    def asked(r):
        return r["variant"] in args.variants and r["seed"] in args.seeds

    # Each seed's runs come from one build of its task. This machine's build, unless another machine's build
    # already has the whole POPO/GRPO pair of that seed and this one has nothing: then those runs are kept (they
    # pair among themselves) and the seed's other variants, which would need that build, are not run here.
    builds: dict[int, str] = {}
    for s in args.seeds:
        starts[s] = warm_start_id(s)
        kept = [r for r in stored if args.resume and r["seed"] == s and asked(r) and settings_match(r)]
        builds[s] = starts[s]
        if not any(r["warm_start"] == starts[s] for r in kept):
            for w in dict.fromkeys(r["warm_start"] for r in kept):
                if all(any(r["variant"] == m and r["warm_start"] == w for r in kept) for m in MAIN if m in args.variants):
                    builds[s] = w
                    break

    def same(r, v, s):
        return (r["variant"], r["seed"]) == (v, s) and settings_match(r) and r.get("warm_start") == builds[s]

    # with --resume, runs asked for again are kept when measured the same way on the seed's build (else rerun);
    # runs not asked for always stay in learning.json
    results = [r for r in stored if args.resume and asked(r) and same(r, r["variant"], r["seed"])]
    others = [r for r in stored if r["variant"] in VARIANTS and not asked(r)]
    for s in args.seeds:
        if builds[s] != starts[s]:
            print(f"seed {s}: kept the POPO/GRPO runs of another machine's build (warm start {builds[s]}; this "
                  f"machine builds {starts[s]}); its other variants need that build and are not run here")
    workdir = Path("/tmp") / f"popo_learning_{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    # POPO and GRPO on every seed first, then the ablations seed by seed: a cut-short benchmark still
    # answers the main question
    jobs = [(v, s) for s in args.seeds for v in args.variants if v in MAIN]
    jobs += [(v, s) for s in args.seeds for v in args.variants if v not in MAIN]
    jobs = [(v, s) for v, s in jobs if builds[s] == starts[s] and not any(same(r, v, s) for r in results)]
    t0 = time.time()
    # one run at a time: two at once on 2 cores ran 2.4x slower each (measured), no gain
    for v, s in (bar := tqdm(jobs, desc="learning runs", file=sys.stdout)):
        bar.set_postfix_str(f"{v} seed {s}")
        run = run_variant(v, s, args, workdir)
        results.append(run)
        store.write_text(json.dumps(others + results, indent=1))  # nothing lost if a later run fails
        bar.write(f"{v} seed {s}: held-out pass@1 {start_end(run)[0]:.3f} -> {start_end(run)[1]:.3f} "
                  f"({run['steps']} steps, {run['wall_s']:.0f} s)")
    print(summarise(results, out_dir))
    print(f"results: {out_dir / 'learning.md'}, {out_dir / 'learning.json'}, {out_dir / 'learning.png'} "
          f"({time.time() - t0:.0f} s)")
    _print_gain(results)
    return 0


def _print_gain(results: list[dict]) -> None:
    by = {v: [r for r in results if r["variant"] == v] for v in MAIN}
    if by["popo"] and by["grpo"]:
        seeds = {_key(r) for r in by["popo"]} & {_key(r) for r in by["grpo"]}
        p = statistics.mean(gain(r) for r in by["popo"] if _key(r) in seeds)
        g = statistics.mean(gain(r) for r in by["grpo"] if _key(r) in seeds)
        print(f"held-out pass@1 gain: POPO={p:.3f} GRPO={g:.3f} ({_seeds(len(seeds))})")


if __name__ == "__main__":
    raise SystemExit(main())
