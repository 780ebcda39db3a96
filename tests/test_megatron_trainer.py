"""POPO through verl's real trainer on its Megatron engine: `ENGINE=megatron bash scripts/run_tiny_cpu.sh` on the CPU.

Runs where megatron-core and mbridge are installed (`pip install -e ".[megatron-cpu]"`; CI runs this file in the
venv of `.ci/run`'s Megatron step, the plain suite skips it with that reason). Ray starts the trainer and the
actor/rollout/ref worker, whose engines are verl's Megatron ones on megatron-core with popo_verl/engines/mcore_cpu.py
standing in for the GPU and Transformer Engine (the worker installs it: popo_verl/workers.py), bf16 weights as
verl requires, the hf rollout fed by the engine's weight export. One run of two steps saves a checkpoint; a second
process resumes it for a third step. Once on one rank (TP = PP = 1), once on two with context parallelism (CP = 2).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed: pip install -e '.[megatron-cpu]' (README, engine support)")
pytest.importorskip("mbridge", reason="mbridge not installed: pip install -e '.[megatron-cpu]' (README, engine support)")

from popo_verl.protocol import is_predictor_param  # noqa: E402
from test_e2e_cpu import run_tiny  # noqa: E402


def train_and_resume(tmp, tiny_dir, ranks=1, **env_extra):
    """Two steps that save a checkpoint, then a new process that resumes it for a third."""
    # the script's `python` must be this interpreter (CI runs this file from the megatron venv's python)
    env = {"ENGINE": "megatron", "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}", **env_extra}
    first = run_tiny(tmp, tiny_dir, "popo", ranks=ranks, steps=2, save_freq=2, env_extra=env)
    # its own log, which the summary reads for the resume
    second = run_tiny(tmp, tiny_dir, "popo", ranks=ranks, steps=3, save_freq=2,
                      env_extra={**env, "LOG_FILE": str(tmp / "resumed.log")})
    return first, second, tmp / "ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    return train_and_resume(tmp_path_factory.mktemp("megatron_trainer"), tiny_dir)


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory, tiny_dir):
    """Context parallelism: 2 ranks, CP = 2 (each sequence split zigzag over both)."""
    return train_and_resume(tmp_path_factory.mktemp("megatron_trainer_cp2"), tiny_dir, ranks=2, MEGATRON_CP="2")


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


def test_model_merger_exports_the_checkpoint_without_the_head(runs, tmp_path):
    """`python -m popo_verl.model_merger merge --backend megatron` on the trainer's checkpoint: verl's default (bridge)
    checkpoint keeps the model as HF weights, which the merger writes out through verl's HF saving, unchanged."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from popo_verl.model_merger import main

    _, _, ckpt = runs
    actor = ckpt / "global_step_2" / "actor"
    main(["merge", "--backend", "megatron", "--local_dir", str(actor), "--target_dir", str(tmp_path / "hf")])
    exported = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    saved = {k: v for f in (actor / "model" / "huggingface").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert exported.keys() == saved.keys() and not any(is_predictor_param(k) for k in exported)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))


def test_a_new_process_resumes_the_run(runs):
    first, second, _ = runs
    assert "resumed at step 2, trained 1 steps in this run" in second["stdout"]
    assert sorted(second["steps"]) == [3]
    s3 = second["steps"][3]
    assert s3["popo/ema_steps"] == 3  # the EMA state came back
    # the predictor head came back trained (a fresh head starts near 0, as at step 1)
    assert s3["popo/cos_sim"] > first["steps"][1]["popo/cos_sim"] + 0.2, s3["popo/cos_sim"]


def test_popo_trains_and_resumes_with_context_parallelism(cp_runs):
    """CP = 2 through the trainer: verl splits each micro-batch's sequences over the two ranks and gathers the
    log-probs, the engine gathers the final-norm states for the pooled state; the head and the siamese are
    replicated over the two ranks, and the resumed run starts from the trained head on both."""
    first, second, ckpt = cp_runs
    s1, s2 = first["steps"][1], first["steps"][2]
    assert s2["popo/cos_sim"] > s1["popo/cos_sim"] + 0.2, (s1["popo/cos_sim"], s2["popo/cos_sim"])
    assert s2["training/rollout_actor_probs_pearson_corr"] > 0.999  # gathered log-probs are the rollout's
    siamese = ckpt / "global_step_2" / "actor" / "popo_siamese"
    assert sorted(f.name for f in siamese.glob("manifest_*")) == ["manifest_rank_0_of_2.json", "manifest_rank_1_of_2.json"]
    assert "resumed at step 2, trained 1 steps in this run" in second["stdout"]
    s3 = second["steps"][3]
    assert s3["popo/ema_steps"] == 3 and s3["popo/cos_sim"] > s1["popo/cos_sim"] + 0.2, s3["popo/cos_sim"]
