"""The paper's run scripts: POPO and its GRPO baseline differ only in algorithm keys; the recipe entry."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_PREFIXES = (
    "algorithm.",
    "actor_rollout_ref.actor.policy_loss.",
    "actor_rollout_ref.actor.use_kl_loss",
    "actor_rollout_ref.actor.kl_loss",
    "actor_rollout_ref.actor.entropy_coeff",
    "actor_rollout_ref.ref.",
    "trainer.v1.trainer_mode",
    "trainer.experiment_name",
    "trainer.default_local_dir",
)


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _compose(script: str, env_extra=None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), "--cfg", "job"], capture_output=True, text=True,
                       env=env, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return _flat(OmegaConf.to_container(OmegaConf.create(r.stdout), resolve=False))


@pytest.mark.parametrize("size", ["7b", "1.5b"])
def test_popo_and_grpo_differ_only_in_algorithm_keys(size):
    popo, grpo = _compose(f"run_popo_qwen{size}.sh"), _compose(f"run_grpo_qwen{size}.sh")
    differing = {k for k in set(popo) | set(grpo) if popo.get(k) != grpo.get(k)}
    assert differing, "the two scripts must differ somewhere"
    stray = sorted(k for k in differing if not k.startswith(ALLOWED_PREFIXES))
    assert not stray, stray
    assert popo["algorithm.adv_estimator"] == "popo" and grpo["algorithm.adv_estimator"] == "grpo"
    assert grpo["actor_rollout_ref.actor.use_kl_loss"] is True and grpo["actor_rollout_ref.actor.kl_loss_type"] == "low_var_kl"
    assert popo["actor_rollout_ref.model.path"] == f"Qwen/Qwen2.5-Math-{size.upper().replace('B', 'B')}"
    assert popo["actor_rollout_ref.rollout.n"] == grpo["actor_rollout_ref.rollout.n"] == 8
    assert popo["data.max_prompt_length"] == 512 and popo["data.max_response_length"] == 1024


def test_7b_reference_settings():
    c = _compose("run_popo_qwen7b.sh")
    assert c["algorithm.popo.tau"] == 0.999 and c["algorithm.popo.feature_noise_std"] == 0.01
    assert c["algorithm.popo.predictor_hidden_dim"] == 4096 and c["actor_rollout_ref.actor.optim.lr"] == 1e-7
    assert c["actor_rollout_ref.actor.optim.lr_scheduler_type"] == "cosine"
    assert c["actor_rollout_ref.actor.optim.lr_warmup_steps_ratio"] == 0.1
    assert c["actor_rollout_ref.rollout.name"] == "vllm"


def test_env_defaults_and_passthrough():
    c = _compose("run_popo_qwen7b.sh", {"MODEL_PATH": "/models/m", "N_GPUS_PER_NODE": "4", "EXPERIMENT_NAME": "x"})
    assert c["actor_rollout_ref.model.path"] == "/models/m" and c["trainer.n_gpus_per_node"] == 4
    assert c["trainer.experiment_name"] == "x"


def test_missing_data_is_reported_with_the_fix(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_popo_qwen7b.sh")], capture_output=True, text=True,
                       env=dict(os.environ, DATA_DIR=str(tmp_path)), timeout=120)
    assert r.returncode != 0
    assert "python -m popo_verl.data prepare --out" in r.stderr


def test_recipe_entry_composes_like_main_ppo():
    def job(*args):
        r = subprocess.run([sys.executable, "-m", *args, "--cfg", "job"], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    assert job("recipe.popo.main_popo") == job("verl.trainer.main_ppo", "algorithm=popo")
