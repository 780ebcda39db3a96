"""Cost of a training step, POPO vs GRPO, measured side by side through verl.

Both run through `scripts/run_tiny_cpu.sh` (verl's real trainer on the CPU backend, tiny task; `--gpu`
passes vLLM / GPU settings instead) on the same prompts and seed, alternating POPO, GRPO, POPO, ...
Per phase (verl's timing_s/*: gen, old_log_prob, ref = siamese forward for POPO, adv, update_actor,
update_weights, and POPO's EMA update) it prints the median over the measured steps (the first step of
each run is warm-up and dropped), the per-step totals, the POPO/GRPO ratios, each process's peak memory
and the EMA update's share of the step. It ends with the line
    update_actor POPO/GRPO = R at positive fraction P
(P = POPO's mean positive fraction over the measured steps).

    python benchmarks/cost.py --quick          # < 15 min on 2 cores
    python benchmarks/cost.py --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_verl.tiny.summary import parse_steps  # noqa: E402

PHASES = ["gen", "old_log_prob", "ref", "adv", "update_actor", "ema_update", "update_weights", "step"]


class MemorySampler:
    """Peak RSS per process kind (Ray actor name or command) of a process tree, sampled every 0.5 s."""

    def __init__(self, root_pid: int):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.peak: dict[str, float] = defaultdict(float)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _kind(self, p) -> str:
        try:
            cmd = " ".join(p.cmdline())
        except Exception:
            return "?"
        if cmd.startswith("ray::"):
            return cmd.split()[0]
        if "main_ppo" in cmd:
            return "driver"
        if "raylet" in cmd or "gcs_server" in cmd:
            return "ray-system"
        return os.path.basename(p.name())

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except self.psutil.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**30
                except self.psutil.Error:
                    continue
                kind = self._kind(p)
                self.peak[kind] = max(self.peak[kind], rss)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def run_once(algo: str, steps: int, workdir: Path, seed: int, gpu: bool, extra: list[str]) -> dict:
    log = workdir / f"{algo}_{int(time.time())}.log"
    env = dict(os.environ, ALGO=algo, TOTAL_STEPS=str(steps), TEST_FREQ="-1", SAVE_FREQ="-1", SEED=str(seed),
               LOG_FILE=str(log), CKPT_DIR=str(workdir / f"ckpt_{algo}_{time.time_ns()}"))
    cmd = ["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), "trainer.val_before_train=false", "trainer.resume_mode=disable"]
    if gpu:
        env["POPO_VERL_CPU"] = "0"
        cmd += ["actor_rollout_ref.rollout.name=vllm", "trainer.device=cuda"]
    cmd += extra
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with MemorySampler(proc.pid) as mem:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{algo} run failed (rc {proc.returncode}):\n{out[-4000:]}")
    return {"algo": algo, "steps": dict(parse_steps(out)), "wall_s": time.time() - t0, "peak_rss_gb": dict(mem.peak)}


def phase_table(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """algo -> phase -> per-step seconds over the measured steps (warm-up step 1 of each run dropped)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for step, m in sorted(r["steps"].items()):
            if step == 1:
                continue
            for ph in PHASES:
                key = f"timing_s/{ph}"
                if key in m:
                    out[r["algo"]][ph].append(m[key])
            if "popo/positive_ratio" in m:
                out[r["algo"]]["_positive_ratio"].append(m["popo/positive_ratio"])
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def report(runs: list[dict], out_dir: Path) -> dict:
    table = phase_table(runs)
    popo, grpo = table["popo"], table["grpo"]
    rows = []
    for ph in PHASES:
        p, g = median(popo.get(ph, [])), median(grpo.get(ph, []))
        ratio = p / g if g and g == g and p == p and g > 0 else float("nan")
        rows.append({"phase": ph, "popo_s": p, "grpo_s": g, "ratio": ratio})
    pos = statistics.mean(popo["_positive_ratio"]) if popo.get("_positive_ratio") else float("nan")
    ema_share = median([e / s for e, s in zip(popo.get("ema_update", []), popo.get("step", [])) if s > 0])
    mem: dict[str, dict[str, float]] = defaultdict(dict)
    for r in runs:
        for kind, gb in r["peak_rss_gb"].items():
            mem[r["algo"]][kind] = max(mem[r["algo"]].get(kind, 0.0), gb)
    update_ratio = next(r["ratio"] for r in rows if r["phase"] == "update_actor")
    result = {
        "phases": rows,
        "positive_fraction": pos,
        "ema_share_of_step": ema_share,
        "update_actor_ratio": update_ratio,
        "measured_steps": {a: len(t.get("step", [])) for a, t in table.items()},
        "peak_rss_gb": mem,
        "runs": [{"algo": r["algo"], "wall_s": r["wall_s"]} for r in runs],
    }
    lines = ["| phase | POPO median s | GRPO median s | POPO/GRPO |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['popo_s']:.4f} | {r['grpo_s']:.4f} | {r['ratio']:.3f} |")
    lines += ["", "| process | POPO peak RSS GB | GRPO peak RSS GB |", "|---|---|---|"]
    for kind in sorted(set(mem["popo"]) | set(mem["grpo"])):
        if kind.startswith("ray::") or kind == "driver":
            lines.append(f"| {kind} | {mem['popo'].get(kind, 0):.2f} | {mem['grpo'].get(kind, 0):.2f} |")
    lines += ["", f"POPO positive fraction: {pos:.3f}; EMA update share of the POPO step: {100 * ema_share:.2f} %"]
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cost.md").write_text(text + "\n")
    (out_dir / "cost.json").write_text(json.dumps(result, indent=2, default=float))
    plot(rows, out_dir / "cost.png", pos)
    print(text)
    print(f"update_actor POPO/GRPO = {update_ratio:.3f} at positive fraction {pos:.3f}")
    return result


def plot(rows, path: Path, pos: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["phase"] != "step" and (r["popo_s"] == r["popo_s"] or r["grpo_s"] == r["grpo_s"])]
    x = range(len(shown))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["grpo_s"] if r["grpo_s"] == r["grpo_s"] else 0 for r in shown], 0.4, label="GRPO")
    ax.bar([i + 0.2 for i in x], [r["popo_s"] if r["popo_s"] == r["popo_s"] else 0 for r in shown], 0.4, label="POPO")
    ax.set_xticks(list(x), [r["phase"] for r in shown], rotation=20)
    ax.set_ylabel("median seconds per step")
    ax.set_title(f"Step phases, tiny task on CPU (POPO positive fraction {pos:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds x 4 steps (< 15 min on 2 cores)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="vLLM rollout on a GPU machine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("overrides", nargs="*", help="hydra overrides for both algorithms")
    args = ap.parse_args(argv)
    rounds, steps = (2, 4) if args.quick else (args.rounds, args.steps)
    workdir = Path(args.workdir or os.path.join("/tmp", f"popo_cost_{os.getpid()}"))
    workdir.mkdir(parents=True, exist_ok=True)
    from popo_verl.tiny import ensure_built

    ensure_built()
    runs = []
    order = [a for _ in range(rounds) for a in ("popo", "grpo")]
    for i, algo in enumerate(order, 1):
        print(f"[{i}/{len(order)}] {algo}: {steps} steps ...", flush=True)
        r = run_once(algo, steps, workdir, args.seed, args.gpu, args.overrides)
        print(f"[{i}/{len(order)}] {algo}: done in {r['wall_s']:.0f} s", flush=True)
        runs.append(r)
    report(runs, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
