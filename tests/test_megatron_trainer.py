"""POPO through verl's real trainer on its Megatron engine: `ENGINE=megatron bash scripts/run_tiny_cpu.sh` on the CPU.

Runs where megatron-core and mbridge are installed (`pip install -e ".[megatron-cpu]"`; CI runs this file in the
venv of `.ci/run`'s Megatron step, the plain suite skips it with that reason). Ray starts the trainer and the
actor/rollout/ref worker, whose engines are verl's Megatron ones on megatron-core with popo_verl/engines/mcore_cpu.py
standing in for the GPU and Transformer Engine (the worker installs it: popo_verl/workers.py), bf16 weights as
verl requires, the hf rollout fed by the engine's weight export. One run of two steps saves a checkpoint; a second
process resumes it for a third step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core not installed: pip install -e '.[megatron-cpu]' (README, engine support)")
pytest.importorskip("mbridge", reason="mbridge not installed: pip install -e '.[megatron-cpu]' (README, engine support)")

from popo_verl.engines.fsdp import is_predictor_param  # noqa: E402
from popo_verl.tiny.summary import parse_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_tiny_cpu.sh"


def run(tmp: Path, tiny_dir: str, steps: int, name: str) -> dict:
    # the script's `python` must be this interpreter (CI runs this file from the megatron venv's python)
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, ENGINE="megatron", TINY_DIR=tiny_dir, TOTAL_STEPS=str(steps), SAVE_FREQ="2", TEST_FREQ="-1",
               TRAIN_BATCH="8", CKPT_DIR=str(tmp / "ckpt"), RUN_DIR=str(tmp / name), LOG_FILE=str(tmp / f"{name}.log"))
    r = subprocess.run(["bash", str(SCRIPT), "trainer.val_before_train=false"], cwd=str(tmp), env=env,
                       capture_output=True, text=True, timeout=900)
    log = (tmp / f"{name}.log").read_text() if (tmp / f"{name}.log").exists() else ""
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return {"stdout": r.stdout, "steps": dict(parse_steps(log))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from popo_verl.tiny import default_dir, ensure_built

    tiny_dir = ensure_built(default_dir())["root"]
    tmp = tmp_path_factory.mktemp("megatron_trainer")
    first = run(tmp, tiny_dir, steps=2, name="first")
    second = run(tmp, tiny_dir, steps=3, name="resumed")
    return first, second, tmp / "ckpt"


def test_popo_trains_on_the_megatron_engine(runs):
    first, _, _ = runs
    s1, s2 = first["steps"][1], first["steps"][2]
    for s in (s1, s2):
        assert s["popo/rows_updated"] > 0 and s["popo/skipped_step"] == 0
        assert s["actor/grad_norm"] > 0 and s["popo/predictor_grad_norm"] > 0
    # the predictor learns to predict the siamese's pooled state (cosine from ~0 at its random start)
    assert s2["popo/cos_sim"] > s1["popo/cos_sim"] + 0.2, (s1["popo/cos_sim"], s2["popo/cos_sim"])
    assert (s1["popo/ema_steps"], s2["popo/ema_steps"]) == (1, 2)  # the siamese follows every optimizer step
    assert s2["popo/drift"] > s1["popo/drift"] > 0
    # the rollout samples from the updated policy: its log-probs stay those of the actor (bf16 vs fp32 rounding)
    assert s2["training/rollout_actor_probs_pearson_corr"] > 0.999


def test_checkpoint_holds_the_siamese_and_exports_no_head(runs):
    from safetensors import safe_open

    _, _, ckpt = runs
    actor = ckpt / "global_step_2" / "actor"
    assert (actor / "popo_siamese" / "manifest_rank_0_of_1.json").is_file()
    assert (actor / "optimizer" / "dist_ckpt").is_dir()
    hf = actor / "model" / "huggingface"
    keys = [k for f in hf.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert "model.norm.weight" in keys and not any(is_predictor_param(k) for k in keys)


def test_a_new_process_resumes_the_run(runs):
    first, second, _ = runs
    assert "resumed at step 2, trained 1 steps in this run" in second["stdout"]
    assert sorted(second["steps"]) == [3]
    s3 = second["steps"][3]
    assert s3["popo/ema_steps"] == 3  # the EMA state came back
    # the predictor head came back trained (a fresh head starts near 0, as at step 1)
    assert s3["popo/cos_sim"] > first["steps"][1]["popo/cos_sim"] + 0.2, s3["popo/cos_sim"]
