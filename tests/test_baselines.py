"""The exploration study's baselines (issue #36): Zhu et al.'s PSR, NSR and W-REINFORCE as verl advantage
estimators (popo_verl/algos.py over core.sample_reinforcement_advantages), called the way verl's trainer calls them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import verl  # noqa: F401  (loads the `verl.plugins` entry points, ours included)
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage

import popo_verl.algos as algos
from popo_verl import core

ROOT = Path(__file__).resolve().parents[1]


def test_sample_reinforcement_advantages_split_reinforce_by_sign():
    positive = torch.tensor([True, False, True, False, False])
    psr = core.sample_reinforcement_advantages(positive, "psr")
    nsr = core.sample_reinforcement_advantages(positive, "nsr")
    wr = core.sample_reinforcement_advantages(positive, "w_reinforce", positive_weight=0.25)
    assert psr.tolist() == [1, 0, 1, 0, 0]
    assert nsr.tolist() == [0, -1, 0, -1, -1]
    assert wr.tolist() == [0.25, -1, 0.25, -1, -1]
    # REINFORCE with rewards +-1 and no baseline is PSR + NSR; W-REINFORCE weights the positive half by lambda
    full = core.sample_reinforcement_advantages(positive, "w_reinforce", positive_weight=1.0)
    assert torch.equal(full, psr + nsr)
    with pytest.raises(ValueError, match="unknown mode 'raft'"):
        core.sample_reinforcement_advantages(positive, "raft")


def _batch(rewards: list[float], width: int = 5) -> DataProto:
    """Outcome rewards on each response's last token, responses of different lengths."""
    n = len(rewards)
    lengths = torch.arange(n) % (width - 1) + 2
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    token_rewards = torch.zeros(n, width)
    token_rewards[torch.arange(n), lengths - 1] = torch.tensor(rewards)
    uid = np.array([f"p{i // 2}" for i in range(n)], dtype=object)
    return DataProto.from_dict(tensors={"token_level_rewards": token_rewards, "response_mask": mask},
                               non_tensors={"uid": uid})


@pytest.mark.parametrize("mode,lam,on_positive,on_negative",
                         [("psr", None, 1.0, 0.0), ("nsr", None, 0.0, -1.0), ("w_reinforce", None, 0.1, -1.0),
                          ("w_reinforce", 0.3, 0.3, -1.0)])
def test_estimators_through_verls_compute_advantage(mode, lam, on_positive, on_negative):
    assert core_algos.get_adv_estimator_fn(mode) is algos.SAMPLE_REINFORCEMENT_ESTIMATORS[mode]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    data = _batch(rewards)
    config = {"adv_estimator": mode, "gamma": 1.0, "lam": 1.0}
    if lam is not None:
        config["w_reinforce_lambda"] = lam  # +algorithm.w_reinforce_lambda=...
    out = compute_advantage(data, adv_estimator=mode, config=OmegaConf.create(config))
    mask = data.batch["response_mask"]
    expected = torch.tensor([on_positive if r == 1.0 else on_negative for r in rewards])[:, None] * mask
    assert torch.equal(out.batch["advantages"], expected)
    assert torch.equal(out.batch["returns"], expected)


def test_estimators_refuse_partial_credit():
    """The decomposition needs a verifier's right/wrong (rewards +-1 in the paper, 0/1 here), as POPO's binary mode."""
    data = _batch([1.0, 0.5, 0.0, 1.0])
    with pytest.raises(core.NonBinaryRewardError):
        compute_advantage(data, adv_estimator="nsr", config=OmegaConf.create({"adv_estimator": "nsr"}))


def test_the_tiny_script_names_the_algorithms_it_takes():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh")], env={**os.environ, "ALGO": "raft"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "error: ALGO must be popo, grpo, psr, nsr or w_reinforce, got 'raft'" in r.stderr


@pytest.mark.e2e
def test_w_reinforce_trains_through_verls_trainer(tmp_path, tiny_dir):
    """One step of `ALGO=w_reinforce bash scripts/run_tiny_cpu.sh` through verl's own trainer: lambda reaches verl's
    PPO loss on the correct rows and -1 on the wrong ones, and the actor's weights move."""
    from test_e2e_cpu import initial_state, model_state, run_tiny

    out = run_tiny(tmp_path, tiny_dir, "w_reinforce", "+algorithm.w_reinforce_lambda=0.2", steps=1, save_freq=1)
    m = out["steps"][1]
    assert 0 < m["critic/score/mean"] < 1, "correct and wrong rows in the step"
    assert m["critic/advantages/max"] == pytest.approx(0.2) and m["critic/advantages/min"] == pytest.approx(-1.0)
    assert "actor/pg_loss" in m and not any(k.startswith("popo/") for k in m), "verl's own loss, not POPO's"
    before, after = initial_state(tiny_dir), model_state(out["ckpt"] / "global_step_1")
    assert any(not torch.allclose(before[k], after[k], atol=1e-7) for k in before)
