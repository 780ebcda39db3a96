"""Learning on the tiny task: POPO vs GRPO and POPO's ablations, same warm start, steps and seeds.

Every variant trains through `scripts/run_tiny_cpu.sh` (verl on the CPU backend) from the same warm-started
tiny model for the same number of steps, for each seed. Held-out validation runs before training and every
`--test-freq` steps, sampling `--val-n` responses per test prompt at temperature 1: pass@1 is verl's
`val-core/tiny_arith/acc/mean@N` (the mean over the N samples) and pass@N is verl's `best@N/mean`.
Each finished run is appended to benchmarks/results/learning.json at once, so an interrupted benchmark
keeps what it measured and `--resume` skips the runs already there. At the end it writes learning.md
(final pass@1 and pass@N, mean ± std over seeds) and learning.png (curves).

    python benchmarks/learning.py --quick                # POPO and GRPO, 2 seeds x 6 steps
    python benchmarks/learning.py --resume               # all variants, 3 seeds x 20 steps, lr 3e-4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "popo": ("popo", []),
    "grpo": ("grpo", []),
    "popo_uniform_weights": ("popo", ["algorithm.popo.weight_mode=uniform"]),
    "popo_alpha0": ("popo", ["algorithm.popo.alpha=0"]),
    "popo_frozen_siamese": ("popo", ["algorithm.popo.tau=1.0"]),
    "popo_entropy_all": ("popo", ["algorithm.popo.entropy_on=all", "algorithm.popo.positives_only_update=false"]),
    "popo_keep_negatives": ("popo", ["algorithm.popo.positives_only_update=false"]),
}
DATA_SOURCE = "tiny_arith"


def val_keys(n: int) -> tuple[str, str]:
    """verl's keys for sampled pass@1 (mean over n samples) and pass@n (bootstrap best-of-n)."""
    return f"val-core/{DATA_SOURCE}/acc/mean@{n}", f"val-core/{DATA_SOURCE}/acc/best@{n}/mean"


def parse_steps(text: str):
    # popo_verl.cpu.summary imports verl (through popo_verl/__init__); this parser is all we need of it
    sys.path.insert(0, str(ROOT))
    from popo_verl.cpu.summary import parse_steps as _parse

    return _parse(text)


def curves_from_log(text: str, val_n: int) -> dict[str, dict[int, float]]:
    k1, kn = val_keys(val_n)
    out: dict[str, dict[int, float]] = {"pass@1": {}, f"pass@{val_n}": {}}
    for step, metrics in parse_steps(text):
        if k1 in metrics:
            out["pass@1"][step] = metrics[k1]
        if kn in metrics:
            out[f"pass@{val_n}"][step] = metrics[kn]
    return out


def run_variant(name: str, seed: int, args, workdir: Path) -> dict:
    algo, overrides = VARIANTS[name]
    log = workdir / f"{name}_s{seed}.log"
    env = dict(os.environ, ALGO=algo, TOTAL_STEPS=str(args.steps), TEST_FREQ=str(args.test_freq), SAVE_FREQ="-1",
               SEED=str(seed), LR=str(args.lr), LOG_FILE=str(log), CKPT_DIR=str(workdir / f"ckpt_{name}_{seed}_{time.time_ns()}"))
    cmd = ["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), "trainer.val_before_train=true",
           "trainer.resume_mode=disable", f"actor_rollout_ref.rollout.seed={seed}",
           f"actor_rollout_ref.rollout.val_kwargs.n={args.val_n}", "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
           "actor_rollout_ref.rollout.val_kwargs.temperature=1.0", *overrides, *args.overrides]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (log {log}):\n{out[-4000:]}")
    curves = curves_from_log(out, args.val_n)
    if not curves["pass@1"]:
        raise RuntimeError(f"{name} seed {seed}: no held-out metric in the log {log}")
    return {"variant": name, "seed": seed, "steps": args.steps, "val_n": args.val_n, "lr": args.lr, "wall_s": round(time.time() - t0, 1),
            "overrides": overrides + list(args.overrides), "curves": {m: {str(s): v for s, v in c.items()} for m, c in curves.items()}}


def _final(run: dict, metric: str) -> float:
    curve = run["curves"][metric]
    return curve[max(curve, key=int)]


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def summarise(results: list[dict], out_dir: Path) -> str:
    """Markdown table (final pass@1 / pass@N mean ± std over seeds), the POPO vs GRPO verdict, and the PNG."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    metrics = [m for m in results[0]["curves"]]
    head = "| variant | seeds | start pass@1 | " + " | ".join(f"final {m} (mean ± std)" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for name, runs in by_variant.items():
        start = statistics.mean(r["curves"]["pass@1"][min(r["curves"]["pass@1"], key=int)] for r in runs)
        cells = [_mean_sd([_final(r, m) for r in runs]) for m in metrics]
        lines.append(f"| {name} | {len(runs)} | {start:.3f} | " + " | ".join(cells) + " |")
    if "popo" in by_variant and "grpo" in by_variant:
        p = statistics.mean(_final(r, "pass@1") for r in by_variant["popo"])
        g = statistics.mean(_final(r, "pass@1") for r in by_variant["grpo"])
        verdict = "meets" if p >= g else "misses"
        lines += ["", f"final held-out pass@1 POPO = {p:.3f}, GRPO = {g:.3f}: {verdict} the target POPO >= GRPO"]
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning.md").write_text(text + "\n")
    _plot(by_variant, metrics, out_dir / "learning.png")
    return text


def _plot(by_variant: dict[str, list[dict]], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, runs in by_variant.items():
            steps = sorted({int(s) for r in runs for s in r["curves"][metric]})
            mean = [statistics.mean(r["curves"][metric][str(s)] for r in runs if str(s) in r["curves"][metric]) for s in steps]
            ax.plot(steps, mean, marker="o", label=name, linewidth=2.5 if name in ("popo", "grpo") else 1)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"held-out {metric}")
        ax.set_title(f"Tiny task on CPU: {metric}, mean over seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="POPO and GRPO, 2 seeds x 6 steps")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--test-freq", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-4, help="actor learning rate, every variant")
    ap.add_argument("--val-n", type=int, default=4, help="samples per held-out prompt (pass@1 and pass@N)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in learning.json with the same settings")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("overrides", nargs="*", help="hydra overrides passed to every run")
    args = ap.parse_args(argv)
    if args.quick:
        args.variants, args.seeds, args.steps, args.test_freq = ["popo", "grpo"], [1, 2], 6, 3
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    from tqdm import tqdm

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "learning.json"
    results: list[dict] = json.loads(store.read_text()) if args.resume and store.exists() else []

    def same(r, v, s):
        return (r["variant"], r["seed"], r["steps"], r["val_n"], r.get("lr")) == (v, s, args.steps, args.val_n, args.lr) \
            and r["overrides"] == VARIANTS[v][1] + list(args.overrides)

    kept = [r for r in results if r["variant"] in VARIANTS and same(r, r["variant"], r["seed"])]
    results = [r for r in kept if r["variant"] in args.variants and r["seed"] in args.seeds]
    others = [r for r in kept if r not in results]  # other variants/seeds measured with these settings
    workdir = Path("/tmp") / f"popo_learning_{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    # POPO and GRPO on every seed first, then the ablations: a cut-short benchmark still answers the main question
    order = sorted(args.variants, key=lambda v: v not in ("popo", "grpo"))
    jobs = [(v, s) for v in order if v in ("popo", "grpo") for s in args.seeds]
    jobs += [(v, s) for s in args.seeds for v in order if v not in ("popo", "grpo")]
    jobs = [(v, s) for v, s in jobs if not any(same(r, v, s) for r in results)]
    for v, s in (bar := tqdm(jobs, desc="learning runs")):
        bar.set_postfix_str(f"{v} seed {s}")
        results.append(run_variant(v, s, args, workdir))
        store.write_text(json.dumps(others + results, indent=1))  # nothing lost if a later run fails
    print(summarise(results, out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
