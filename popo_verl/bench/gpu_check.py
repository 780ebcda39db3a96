"""The Python half of scripts/gpu_check.sh: the device check, the GPU overrides of its tiny-task runs, its report.

    python -m popo_verl.bench.gpu_check device                    # exit 2 with one line where no CUDA GPU is usable
    python -m popo_verl.bench.gpu_check overrides --rollout hf --engine fsdp2   # the GPU overrides of the runs, one per line
    python -m popo_verl.bench.gpu_check report --stage tests=0 --stage popo=0 --stage grpo=1 \\
        --popo POPO_LOG --grpo GRPO_LOG [--header TEXT] [--json FILE]

The report reads verl's console lines `step:N - key:value - ...` (popo_verl.tiny.summary.parse_steps) from each
run's full log: per phase (verl's `timing_s/<phase>`) the median over the steps after the first (warm-up) and the
POPO/GRPO ratio, and the peak of `actor/perf/max_memory_allocated_gb` (the trainer worker's process: actor,
siamese or reference, optimizer). It exits 0 when every stage passed, 1 otherwise.

Nothing here imports torch or verl at module level: `device` imports torch only after nvidia-smi has answered, so
a machine without a GPU is told so in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from popo_verl.bench.phases import PHASES, median, phase_medians, ratio
from popo_verl.tiny.summary import parse_steps

#: exit status of `device` (and of scripts/gpu_check.sh) where there is no usable GPU
NO_GPU_EXIT = 2
#: the phases whose ratio the report's summary line names
KEY_PHASES = ("update_actor", "step")
MEMORY_KEY = "actor/perf/max_memory_allocated_gb"


# ------------------------------------------------------------------------------------------------ device
def device_problem(run=subprocess.run, which=shutil.which) -> Optional[str]:
    """None where a CUDA GPU is usable from this Python; otherwise the one line that says why not."""
    if which("nvidia-smi") is None:
        return "no GPU: nvidia-smi not found (scripts/gpu_check.sh is for a CUDA machine; on the CPU run scripts/run_tiny_cpu.sh)"
    try:
        r = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        listed = [line for line in r.stdout.splitlines() if line.startswith("GPU ")]
    except (OSError, subprocess.SubprocessError) as e:
        return f"no GPU: nvidia-smi failed ({e})"
    if r.returncode != 0 or not listed:
        detail = (r.stderr or r.stdout).strip().splitlines()
        return f"no GPU: nvidia-smi lists none ({detail[-1] if detail else f'rc {r.returncode}'})"
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no GPU usable: torch {torch.__version__} ({build}) sees no CUDA device although nvidia-smi lists {len(listed)}"
    return None


def gpu_names(run=subprocess.run) -> str:
    """`N x NAME` of the GPUs nvidia-smi lists, or "unknown GPU"."""
    try:
        r = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        names = [n.strip() for n in r.stdout.splitlines() if n.strip()]
    except (OSError, subprocess.SubprocessError):
        names = []
    return f"{len(names)} x {names[0]}" if names else "unknown GPU"


# ------------------------------------------------------------------------------------------------ overrides
#: the actor's engines gpu_overrides knows (verl's actor.strategy values)
ENGINES = ("fsdp", "fsdp2", "megatron")


def gpu_overrides(rollout: str, engine: str = "fsdp2") -> list[str]:
    """What a GPU run changes in scripts/run_tiny_cpu.sh's settings: CUDA, bf16 compute for the actor and the
    reference (the script's fp32 is for the CPU; POPO keeps its siamese and predictor in fp32 whatever this says),
    and the rollout (`hf`: popo_verl/rollout/hf_gpu.py on the GPU; `vllm` where vLLM is installed). The environment
    must also say POPO_VERL_CPU=0 (the script defaults it to 1).

    The dtype key is the engine's: FSDP's `fsdp_config.mixed_precision.param_dtype` is no key of verl's config
    (`++`: added, or overriding the script's `+...=fp32`), Megatron's is `megatron.dtype` (verl's engine/megatron.yaml;
    the Megatron actor has no fsdp_config)."""
    if rollout not in ("hf", "vllm"):
        raise ValueError(f"rollout must be hf or vllm, got {rollout!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "megatron":
        dtype = ["actor_rollout_ref.actor.megatron.dtype=bfloat16", "actor_rollout_ref.ref.megatron.dtype=bfloat16"]
    else:
        dtype = ["++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16",
                 "++actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=bf16"]
    return ["trainer.device=cuda", *dtype, f"actor_rollout_ref.rollout.name={rollout}"]


# ------------------------------------------------------------------------------------------------ report
def peak(steps: list[tuple[int, dict]], key: str = MEMORY_KEY) -> float:
    vals = [m[key] for _, m in steps if key in m]
    return max(vals) if vals else float("nan")


def compare(popo_steps, grpo_steps) -> dict:
    """The report's figures from two runs' parsed step lines."""
    p, g = phase_medians(dict(popo_steps)), phase_medians(dict(grpo_steps))
    return {
        "phases": {ph: {"popo_s": p[ph], "grpo_s": g[ph], "ratio": ratio(p[ph], g[ph])} for ph in PHASES},
        "steps": {"popo": len(popo_steps), "grpo": len(grpo_steps)},
        "peak_memory_gb": {"popo": peak(popo_steps), "grpo": peak(grpo_steps)},
        "positive_fraction": median([m["popo/positive_ratio"] for _, m in popo_steps if "popo/positive_ratio" in m]),
    }


def _fmt(x: float, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(stages: list[tuple[str, int]], figures: Optional[dict], header: str = "") -> tuple[str, bool]:
    """(report text, every stage passed)."""
    ok = all(rc == 0 for _, rc in stages)
    lines = [f"gpu_check: {header}"] if header else []
    width = max([len(n) for n, _ in stages] + [5])
    lines += [f"  {name:<{width}}  {'pass' if rc == 0 else f'FAIL (rc {rc})'}" for name, rc in stages]
    if figures:
        lines += ["", f"  {'phase':<14} {'POPO s':>9} {'GRPO s':>9} {'POPO/GRPO':>10}   (median over steps 2..N)"]
        for ph, row in figures["phases"].items():
            if math.isnan(row["popo_s"]) and math.isnan(row["grpo_s"]):
                continue
            lines.append(f"  {ph:<14} {_fmt(row['popo_s']):>9} {_fmt(row['grpo_s']):>9} {_fmt(row['ratio'], '.3f'):>10}")
        mem = figures["peak_memory_gb"]
        lines.append(f"  peak {MEMORY_KEY}: POPO {_fmt(mem['popo'], '.2f')} GB, GRPO {_fmt(mem['grpo'], '.2f')} GB")
        key = ", ".join(f"{ph} POPO/GRPO = {_fmt(figures['phases'][ph]['ratio'], '.3f')}" for ph in KEY_PHASES)
        lines.append(f"  {key} at positive fraction {_fmt(figures['positive_fraction'], '.3f')}")
    lines.append(f"gpu_check: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok


def _stage(text: str) -> tuple[str, int]:
    name, sep, rc = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a stage is NAME=RC, got {text!r}")
    try:
        return name, int(rc)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a stage's RC must be an integer, got {text!r}") from None


def _steps_of(path: Optional[str]) -> list:
    if not path:
        return []
    try:
        return parse_steps(Path(path).read_text(errors="replace"))
    except OSError:
        return []


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.bench.gpu_check", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("device", help=f"exit {NO_GPU_EXIT} with one line where no CUDA GPU is usable; else print the GPUs")
    o = sub.add_parser("overrides", help="the GPU overrides of the tiny-task runs, one per line")
    o.add_argument("--rollout", choices=("hf", "vllm"), default="hf")
    o.add_argument("--engine", choices=ENGINES, default="fsdp2")
    r = sub.add_parser("report", help="the compact report; exit 0 when every stage passed")
    r.add_argument("--stage", type=_stage, action="append", default=[], metavar="NAME=RC")
    r.add_argument("--popo", help="the POPO run's full log")
    r.add_argument("--grpo", help="the GRPO run's full log")
    r.add_argument("--header", default="")
    r.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    if args.cmd == "device":
        problem = device_problem()
        if problem:
            print(f"gpu_check: {problem}", file=sys.stderr)
            return NO_GPU_EXIT
        print(gpu_names())
        return 0
    if args.cmd == "overrides":
        print("\n".join(gpu_overrides(args.rollout, args.engine)))
        return 0
    popo, grpo = _steps_of(args.popo), _steps_of(args.grpo)
    figures = compare(popo, grpo) if popo or grpo else None
    text, ok = render(args.stage, figures, args.header)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": dict(args.stage), "passed": ok, **(figures or {})}, indent=2,
                                              default=float) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
