"""The verl plugin: registry entries, the registered advantage estimator and policy loss (called the way
verl 0.9.1 calls them), registration inside a Ray worker, and a loud failure when registration breaks."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import reference_loss  # tests/reference_loss.py: POPO.md's loss, the oracle
import torch
import verl  # noqa: F401  (loads the `verl.plugins` entry points, ours included)
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

import popo_verl.algos as algos
import popo_verl.policy_loss as policy_loss

# ----------------------------------------------------------------------------------------------
# registries
# ----------------------------------------------------------------------------------------------


def test_registered_after_import_verl():
    assert "popo" in core_algos.ADV_ESTIMATOR_REGISTRY
    assert "popo" in core_algos.POLICY_LOSS_REGISTRY
    assert core_algos.ADV_ESTIMATOR_REGISTRY["popo"] is algos.compute_popo_advantage
    assert core_algos.POLICY_LOSS_REGISTRY["popo"] is policy_loss.compute_policy_loss_popo
    assert core_algos.get_adv_estimator_fn("popo") is algos.compute_popo_advantage
    assert core_algos.get_policy_loss_fn("popo") is policy_loss.compute_policy_loss_popo


def test_reimport_is_harmless():
    import popo_verl.plugin as plugin

    importlib.reload(plugin)  # runs register_all() again: must not raise "already registered"
    algos.register()
    algos.register()
    assert core_algos.ADV_ESTIMATOR_REGISTRY["popo"] is algos.compute_popo_advantage
    assert core_algos.POLICY_LOSS_REGISTRY["popo"] is policy_loss.compute_policy_loss_popo
    # the other entries are untouched
    assert "grpo" in core_algos.ADV_ESTIMATOR_REGISTRY and "vanilla" in core_algos.POLICY_LOSS_REGISTRY


# ----------------------------------------------------------------------------------------------
# advantage estimator
# ----------------------------------------------------------------------------------------------


def _adv_batch(seed, n_groups=6, group_size=4, T=7):
    rng = np.random.default_rng(seed)
    names = [str(uuid.UUID(int=int(rng.integers(0, 2**63)))) for _ in range(n_groups)]
    uid = np.array([names[i] for i in range(n_groups) for _ in range(group_size)], dtype=object)
    uid = uid[rng.permutation(len(uid))]
    B = len(uid)
    lengths = rng.integers(1, T + 1, B)
    mask = torch.zeros(B, T, dtype=torch.long)
    scores = rng.choice([0.0, 0.5, 1.0], B)
    scores[uid == names[0]] = 0.0  # a group without positives
    rewards = torch.zeros(B, T, dtype=torch.float32)
    for b in range(B):
        mask[b, : lengths[b]] = 1
        rewards[b, lengths[b] - 1] = scores[b]  # verl puts the outcome reward on the last response token
    return rewards, mask, uid, scores


def _adv_reference(scores, uid, mask, tau_r):
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for g in set(uid.tolist()):
        rows = [i for i in range(B) if uid[i] == g]
        pos = [i for i in rows if scores[i] > tau_r]
        for i in pos:
            for t in range(T):
                out[i][t] = (1.0 / len(pos)) * float(mask[i, t])
    return torch.tensor(out, dtype=torch.float64)


def _old_log_probs(seed, mask):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(mask.shape, generator=g) * 3.0 * mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tau_r", [0.0, 0.5])
def test_advantage_estimator_uniform_weights(seed, tau_r):
    rewards, mask, uid, scores = _adv_batch(seed)
    config = OmegaConf.create({"adv_estimator": "popo", "popo": {"reward_mode": "threshold", "tau_r": tau_r,
                                                                  "weight_mode": "uniform"}})
    fn = core_algos.get_adv_estimator_fn("popo")
    # the keyword call of verl/trainer/ppo/ray_trainer.py::compute_advantage, plus the old log-probs POPO's trainer adds
    adv, ret = fn(token_level_rewards=rewards, response_mask=mask, config=config, index=uid,
                  old_log_probs=_old_log_probs(seed, mask))
    ref = _adv_reference(scores, uid, mask, tau_r)
    assert adv.shape == rewards.shape and ret.shape == rewards.shape
    assert adv.dtype == rewards.dtype
    np.testing.assert_allclose(adv.double().numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ret.double().numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)
    assert (adv[mask == 0] == 0).all()


def test_advantage_estimator_gives_the_softmax_weights_of_popo_md():
    """The default weights: softmax over each prompt's positives of the length-normalised old sequence log-probs."""
    rewards, mask, uid, scores = _adv_batch(5)
    rewards = (rewards == 1.0).float()  # binary rewards: the default reward_mode
    old = _old_log_probs(5, mask)
    adv, _ = core_algos.get_adv_estimator_fn("popo")(token_level_rewards=rewards, response_mask=mask,
                                                     config=OmegaConf.create({"popo": {}}), index=uid, old_log_probs=old)
    seq = (old * mask).sum(-1) / mask.sum(-1)
    for g in set(uid.tolist()):
        pos = [i for i in range(len(uid)) if uid[i] == g and scores[i] == 1.0]
        expected = torch.softmax(seq[pos].double(), 0) if pos else torch.zeros(0)
        got = torch.stack([adv[i][mask[i] > 0][0] for i in pos]).double() if pos else torch.zeros(0)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5)
    negatives = torch.from_numpy(scores != 1.0)
    assert (adv[negatives] == 0).all()


def test_advantage_estimator_refuses_to_run_outside_popos_trainer():
    """verl's own advantage step passes no old log-probs: the estimator says where POPO runs instead of guessing."""
    rewards, mask, uid, _ = _adv_batch(4)
    fn = core_algos.get_adv_estimator_fn("popo")
    with pytest.raises(ValueError, match="algorithm=popo.*trainer.v1.trainer_mode=popo"):
        fn(token_level_rewards=rewards, response_mask=mask, config=None, index=uid)
    with pytest.raises(ValueError, match="uid"):
        fn(token_level_rewards=rewards, response_mask=mask, config=None, index=None, old_log_probs=_old_log_probs(4, mask))
    adv, _ = fn(token_level_rewards=torch.zeros_like(rewards), response_mask=mask, config=None, index=uid,
                old_log_probs=_old_log_probs(4, mask))
    assert torch.isfinite(adv).all() and (adv == 0).all()


# ----------------------------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------------------------


def _actor_config(clip_ratio_high=0.2, clip_ratio=0.2):
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio=clip_ratio,
        clip_ratio_low=0.2,
        clip_ratio_high=clip_ratio_high,
        loss_agg_mode="token-mean",
        policy_loss=PolicyLossConfig(loss_mode="popo"),
    )
    return cfg


def _loss_batch(seed, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        mask[b, n:] = False
    w = torch.rand(B, generator=g, dtype=torch.float64)
    w[[1, 4]] = 0.0  # negatives
    adv = w[:, None] * mask.to(torch.float64)
    n_pos_tokens = int((mask.sum(-1) * (w > 0)).sum())
    return old, mask, w, adv, n_pos_tokens


def _call_like_ppo_loss(cfg, old, log_prob, adv, mask, n_tokens):
    cfg.global_batch_info["dp_size"] = 1
    cfg.global_batch_info["batch_num_tokens"] = n_tokens
    cfg.global_batch_info["global_batch_size"] = None
    cfg.global_batch_info["loss_scale_factor"] = cfg.loss_scale_factor
    fn = core_algos.get_policy_loss_fn(cfg.policy_loss.get("loss_mode", "vanilla"))
    return fn(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=cfg.loss_agg_mode,
        config=cfg,
        rollout_is_weights=None,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_gradient_at_ratio_one_equals_weighted_nll(seed):
    old, mask, w, adv, n_tok = _loss_batch(seed)
    cfg = _actor_config()
    assert cfg.loss_scale_factor is None
    log_prob = old.clone().requires_grad_(True)
    loss, metrics = _call_like_ppo_loss(cfg, old, log_prob, adv, mask, n_tok)
    (g,) = torch.autograd.grad(loss, log_prob)

    ref_lp = old.clone().requires_grad_(True)
    ref_loss = reference_loss.weighted_nll_loss(ref_lp, adv[:, 0], mask)
    (g_ref,) = torch.autograd.grad(ref_loss, ref_lp)
    np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-12, atol=1e-15)
    # the value is the weighted NLL as well
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    # and both equal the hand-written gradient -w m / N+
    np.testing.assert_allclose(g.numpy(), (-w[:, None] * mask / n_tok).numpy(), rtol=1e-12, atol=1e-15)
    for k in ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert k in metrics and math.isfinite(metrics[k])
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["actor/pg_clipfrac"] == 0.0


@pytest.mark.parametrize("clip_high", [0.2, 0.3])
def test_policy_loss_clips_ratio_above(clip_high):
    old, mask, w, adv, n_tok = _loss_batch(7)
    B, T = old.shape
    # per-token log-ratio: a mix of below 1, inside (1, 1+eps) and above 1+eps
    deltas = torch.tensor([-0.5, 0.1, 0.25, 0.4, 0.0], dtype=torch.float64)
    delta = deltas.repeat(B, 1)[:, :T]
    cfg = _actor_config(clip_ratio_high=clip_high, clip_ratio=0.05)  # clip_ratio_high wins over clip_ratio
    log_prob = (old + delta).requires_grad_(True)
    loss, metrics = _call_like_ppo_loss(cfg, old, log_prob, adv, mask, n_tok)
    (g,) = torch.autograd.grad(loss, log_prob)
    for b in range(B):
        for t in range(T):
            r = math.exp(float(delta[b, t]))
            m = float(mask[b, t])
            if r > 1.0 + clip_high:
                expected = 0.0
            else:
                expected = -float(w[b]) * r * m / n_tok
            assert float(g[b, t]) == pytest.approx(expected, rel=1e-10, abs=1e-15), (b, t, r)
    clipped = [(b, t) for b in range(B) for t in range(T) if mask[b, t] and w[b] > 0 and math.exp(float(delta[b, t])) > 1 + clip_high]
    assert clipped, "the test must contain clipped tokens"
    assert all(float(g[b, t]) == 0.0 for b, t in clipped)
    weighted = [(b, t) for b in range(B) for t in range(T) if mask[b, t] and w[b] > 0]
    assert metrics["actor/pg_clipfrac"] == pytest.approx(len(clipped) / len(weighted), rel=1e-6)


def test_policy_loss_rejects_negative_advantages():
    old, mask, w, adv, n_tok = _loss_batch(0)
    adv = adv.clone()
    adv[0, 0] = -0.1
    # checked on the device (torch._assert_async: no host sync per micro-batch); on the CPU it raises at once
    with pytest.raises(RuntimeError, match="non-negative"):
        _call_like_ppo_loss(_actor_config(), old, old.clone().requires_grad_(True), adv, mask, n_tok)


def test_policy_loss_all_negative_batch_is_zero_and_finite():
    old, mask, _, adv, _ = _loss_batch(1)
    log_prob = old.clone().requires_grad_(True)
    loss, _ = _call_like_ppo_loss(_actor_config(), old, log_prob, torch.zeros_like(adv), mask, 1)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert (log_prob.grad == 0).all()


def test_policy_loss_through_verl_ppo_loss(micro_batch):
    """End to end through verl's own `ppo_loss` (nested no-padding layout, global token normalisation)."""
    data, _, ref = micro_batch(seed=5, n=5)
    w, mask, resp_lp, seq_lp = ref["weights"], ref["mask"], ref["resp_lp"], ref["seq_lp"]
    n_tok = int((mask.sum(-1) * (w > 0)).sum())
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=n_tok, global_batch_size=None)
    cfg = _actor_config()
    loss, _ = ppo_loss(cfg, {"log_probs": torch.nested.as_nested_tensor(seq_lp, layout=torch.jagged)}, data)
    assert cfg.global_batch_info["batch_num_tokens"] == n_tok
    grads = torch.autograd.grad(loss, seq_lp)

    ref_lp = resp_lp.clone().requires_grad_(True)
    expected = reference_loss.weighted_nll_loss(ref_lp, w, mask)
    (g_ref,) = torch.autograd.grad(expected, ref_lp)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for i, s in enumerate(seq_lp):
        r = int(mask[i].sum())
        p = s.shape[0] - r
        want = torch.zeros(p + r, dtype=torch.float64)
        want[p - 1 : p + r - 1] = g_ref[i, :r]
        np.testing.assert_allclose(grads[i].numpy(), want.numpy(), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Ray worker sees the registration
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def local_ray(request):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)

    def _finish():
        if started and ray.is_initialized():
            ray.shutdown()

    request.addfinalizer(_finish)
    return ray


def test_registration_inside_ray_worker(local_ray):
    ray = local_ray

    @ray.remote
    def probe():
        import os as _os

        import verl  # noqa: F401
        from verl.trainer.ppo import core_algos as ca
        from verl.utils.device import get_device_name

        both = "popo" in ca.ADV_ESTIMATOR_REGISTRY and "popo" in ca.POLICY_LOSS_REGISTRY
        return both, get_device_name(), _os.getpid()

    both, device, pid = ray.get(probe.remote(), timeout=240)
    assert both is True
    from verl.utils.device import get_device_name

    assert device == get_device_name(), "the worker sees the driver's platform (cpu here, cuda on a GPU machine)"
    assert pid != os.getpid()  # it really ran in another process


# ----------------------------------------------------------------------------------------------
# a broken plugin is loud
# ----------------------------------------------------------------------------------------------


def _run_python(code):
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=240)


def test_broken_registration_is_loud():
    proc = _run_python(
        """
        import importlib
        import popo_verl.algos as a          # imports verl, which loads the (working) plugin
        def broken():
            raise RuntimeError("boom")
        a.register = broken
        import popo_verl.plugin
        importlib.reload(popo_verl.plugin)   # register again: now it fails
        """
    )
    assert proc.returncode != 0
    assert "popo-verl: failed to register" in proc.stderr
    assert "Traceback" in proc.stderr
    assert "RuntimeError: boom" in proc.stderr


def test_broken_plugin_is_loud_through_verl_import():
    """verl swallows plugin errors at DEBUG level; ours still prints its traceback to stderr."""
    proc = _run_python(
        """
        import sys
        sys.modules["popo_verl.cpu"] = None   # a half-installed package: `from popo_verl import cpu` fails
        import verl
        from verl.trainer.ppo import core_algos
        print("POPO_REGISTERED=" + str("popo" in core_algos.POLICY_LOSS_REGISTRY))
        """
    )
    assert "popo-verl: failed to register" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr
    assert "popo_verl.cpu" in proc.stderr
    assert "POPO_REGISTERED=False" in proc.stdout  # verl itself imported fine, but nothing of POPO's is there


# ----------------------------------------------------------------------------------------------
# any of our modules may be the first to import verl; the CLI helpers never import it
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["popo_verl.workers", "popo_verl.rollout.hf", "popo_verl.actor_loss", "popo_verl.policy_loss", "popo_verl.algos"])
def test_a_glue_module_imported_first_still_registers_everything(first):
    """A Ray worker unpickling a POPO class imports that module before verl: verl's plugin loader then meets it
    half-initialised. Registration must still complete, and the CPU platform must be in place before verl
    caches its platform (it answers once per process)."""
    proc = _run_python(
        f"""
        import sys
        import {first}
        assert "verl" in sys.modules
        from verl.trainer.ppo import core_algos
        from verl.utils.device import get_device_name
        import popo_verl.trainer  # trainer mode "popo" (the driver imports it; a worker may not need it)
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
        print("REG", "popo" in core_algos.POLICY_LOSS_REGISTRY, "popo" in core_algos.ADV_ESTIMATOR_REGISTRY,
              get_device_name(), "popo" in TRAINER_REGISTRY)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REG True True cpu True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "popo-verl: failed" not in proc.stderr


def test_command_line_helpers_do_not_import_verl():
    proc = _run_python(
        """
        import sys
        import popo_verl, popo_verl.core, popo_verl.tiny, popo_verl.tiny.summary
        print("LOADED", sorted(m for m in ("verl", "ray", "transformers") if m in sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout
