"""Learning on the tiny task: POPO vs GRPO and POPO's ablations, same warm start, steps and seeds.

Every variant trains through `scripts/run_tiny_cpu.sh` (verl on the CPU backend) from the same warm-started
tiny model for the same number of steps, for each seed, with held-out validation every `--test-freq`
steps (greedy pass@1 = verl's val-core/tiny_arith/acc/mean@1). It writes benchmarks/results/learning.md
(final pass@1, mean ± std over seeds), learning.json (every curve) and learning.png (curves).

    python benchmarks/learning.py --quick                # 2 seeds x 6 steps, POPO and GRPO only
    python benchmarks/learning.py --seeds 1 2 3 --steps 30
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
sys.path.insert(0, str(ROOT))

from popo_verl.cpu.summary import parse_steps  # noqa: E402

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "popo": ("popo", []),
    "grpo": ("grpo", []),
    "popo_uniform_weights": ("popo", ["algorithm.popo.weight_mode=uniform"]),
    "popo_alpha0": ("popo", ["algorithm.popo.alpha=0"]),
    "popo_frozen_siamese": ("popo", ["algorithm.popo.tau=1.0"]),
    "popo_entropy_all": ("popo", ["algorithm.popo.entropy_on=all", "algorithm.popo.positives_only_update=false"]),
    "popo_keep_negatives": ("popo", ["algorithm.popo.positives_only_update=false"]),
}
VAL_KEY = "val-core/tiny_arith/acc/mean@1"


def run_variant(name: str, seed: int, steps: int, test_freq: int, workdir: Path, extra: list[str]) -> dict:
    algo, overrides = VARIANTS[name]
    log = workdir / f"{name}_s{seed}.log"
    env = dict(os.environ, ALGO=algo, TOTAL_STEPS=str(steps), TEST_FREQ=str(test_freq), SAVE_FREQ="-1", SEED=str(seed),
               LOG_FILE=str(log), CKPT_DIR=str(workdir / f"ckpt_{name}_{seed}_{time.time_ns()}"))
    cmd = ["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), "trainer.val_before_train=true",
           "trainer.resume_mode=disable", f"actor_rollout_ref.rollout.seed={seed}", *overrides, *extra]
    r = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{out[-4000:]}")
    curve = {step: m[VAL_KEY] for step, m in parse_steps(out) if VAL_KEY in m}
    return {"variant": name, "seed": seed, "curve": curve}


def summarise(results: list[dict], out_dir: Path) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    lines = ["| variant | final held-out pass@1 (mean ± std) | seeds | start |", "|---|---|---|---|"]
    for name, runs in by_variant.items():
        finals = [r["curve"][max(r["curve"])] for r in runs if r["curve"]]
        starts = [r["curve"][min(r["curve"])] for r in runs if r["curve"]]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(finals):.3f} ± {sd:.3f} | {len(finals)} | {statistics.mean(starts):.3f} |")
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning.md").write_text(text + "\n")
    (out_dir / "learning.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in by_variant.items():
        steps = sorted(set().union(*[r["curve"].keys() for r in runs]))
        mean = [statistics.mean(r["curve"][s] for r in runs if s in r["curve"]) for s in steps]
        ax.plot(steps, mean, marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out greedy pass@1")
    ax.set_title("Tiny task on CPU, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "learning.png", dpi=120)
    plt.close(fig)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--test-freq", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.quick:
        args.variants, args.seeds, args.steps, args.test_freq = ["popo", "grpo"], [1, 2], 6, 3
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    from tqdm import tqdm

    from popo_verl.tiny import ensure_built

    ensure_built()
    workdir = Path("/tmp") / f"popo_learning_{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    results = []
    for v, s in tqdm(jobs, desc="runs"):
        results.append(run_variant(v, s, args.steps, args.test_freq, workdir, args.overrides))
    print(summarise(results, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
