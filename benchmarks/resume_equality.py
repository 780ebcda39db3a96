"""Does a resumed POPO run go on exactly as the uninterrupted one? (issue #35, item 2: the figures behind the CI test)

Run A trains 3 steps of the tiny task through scripts/run_tiny_cpu.sh (1 FSDP2 rank, 8 prompts x 8 rollouts, tau 0.9,
a checkpoint after every step). Run B starts from a copy of A's step-2 checkpoint, which is what a run killed during
step 3 leaves behind (tests/test_e2e_cpu.py kills one), and trains step 3 with the same command. Reported: step 3's
logged metrics side by side, and the largest absolute difference at step 3 over the actor's and the head's weights
and over the siamese.

    python benchmarks/resume_equality.py       # about 3 min on 2 cores, into benchmarks/results/resume/
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_verl import checkpoint
from popo_verl.tiny.summary import parse_steps

#: as tests/test_e2e_cpu.py's runs: a fast EMA, so that three steps move the siamese measurably
OVERRIDES = ["trainer.val_before_train=false", "algorithm.popo.tau=0.9", "algorithm.popo.kl_monitor_interval=1",
             "actor_rollout_ref.model.use_remove_padding=true"]
METRICS = ("critic/score/mean", "popo/positive_ratio", "popo/rows_updated", "popo/ema_steps", "actor/pg_loss",
           "popo/nll_loss", "popo/sim_loss", "popo/drift", "actor/grad_norm")


def run(work: Path, ckpt: Path, name: str) -> dict[str, float]:
    """Train to step 3 (from whatever ckpt holds); step 3's metrics from the run's full log."""
    log = work / f"{name}.log"
    env = dict(os.environ, ALGO="popo", TOTAL_STEPS="3", SAVE_FREQ="1", TEST_FREQ="-1", TRAIN_BATCH="8", VAL_N="1",
               LR="1e-3", CKPT_DIR=str(ckpt), LOG_FILE=str(log), RAY_ADDRESS="local")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), *OVERRIDES], cwd=str(work), env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"run {name} failed (log {log}):\n{(r.stdout + r.stderr)[-4000:]}")
    steps = dict(parse_steps(log.read_text(errors="replace")))
    return steps[3]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> int:
    out = ROOT / "benchmarks" / "results" / "resume"
    work = Path(tempfile.mkdtemp(prefix="popo_resume_"))
    a_ckpt, b_ckpt = work / "a", work / "b"
    print("run A: 3 steps, a checkpoint after each", flush=True)
    a = run(work, a_ckpt, "a")
    b_ckpt.mkdir()
    shutil.copytree(a_ckpt / "global_step_2", b_ckpt / "global_step_2")
    (b_ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    print("run B: resumed from A's step-2 checkpoint, trains step 3", flush=True)
    b = run(work, b_ckpt, "b")
    a_dir, b_dir = a_ckpt / "global_step_3" / "actor", b_ckpt / "global_step_3" / "actor"
    weights = max_diff(checkpoint.full_model_state(a_dir), checkpoint.full_model_state(b_dir))
    siamese = max_diff(checkpoint.full_siamese_state(a_dir)[0], checkpoint.full_siamese_state(b_dir)[0])
    result = {"metrics": {k: {"uninterrupted": a[k], "resumed": b[k]} for k in METRICS if k in a},
              "max_abs_diff": {"actor_and_head": weights, "siamese": siamese}}
    lines = ["## Step 3 of the tiny task, uninterrupted vs resumed from the step-2 checkpoint", "",
             "| metric | uninterrupted | resumed | difference |", "|---|---|---|---|"]
    for k, v in result["metrics"].items():
        lines.append(f"| `{k}` | {v['uninterrupted']:.8g} | {v['resumed']:.8g} | {v['resumed'] - v['uninterrupted']:.2g} |")
    lines += ["", f"Largest absolute difference at step 3: actor and head weights {weights:.2g}, siamese {siamese:.2g} "
              "(tests/test_e2e_cpu.py asserts 1e-6 on both, and 1e-4 relative on the losses).", "",
              "1 FSDP2 rank on the CPU, the hf rollout seeded: the same rollouts, data position and feature noise after "
              "the resume."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "equality.json").write_text(json.dumps(result, indent=1))
    (out / "equality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
