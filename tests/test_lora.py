"""POPO with LoRA (issue #35 item 3): the siamese is the frozen base plus an fp32 EMA of the adapters
(engines/fsdp.py `LoraSiamese`), the predictor head stays out of PEFT, and no second model is built.

In-process on verl's real FSDP2 engine with PEFT (one gloo rank), and end to end through scripts/run_tiny_cpu.sh
(verl's trainer, workers and Ray): training, the rollout's merged-weight sync, checkpoints, resume and the HF exports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from popo_verl import checkpoint
from popo_verl.config import validate_popo_config
from popo_verl.engines.common import local_shard
from popo_verl.engines.fsdp import LoraSiamese, is_adapter_param
from popo_verl.model_merger import merge_lora_state
from popo_verl.protocol import POOLED_KEY, is_predictor_param
from test_e2e_cpu import initial_state, run_tiny
from test_engine import build_engine, capture, make_batch, process_group  # noqa: F401  (process_group: a fixture)

RANK, ALPHA = 4, 8


def lora_engine(model_path: str):
    return build_engine(model_path, "fp32", lora_rank=RANK, lora_alpha=ALPHA)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# ------------------------------------------------------------------------------------------------ in-process
def test_the_head_stays_out_of_peft_trainable_and_fp32(process_group, tiny_random_model):
    """verl applies PEFT (target_modules=all-linear) after _build_module: the head, attached there, would be wrapped in
    adapters and frozen. It is held out and re-attached: trainable, fp32, no adapter inside; the base is frozen."""
    e = lora_engine(tiny_random_model)
    named = dict(e.module.named_parameters())
    head = {n: p for n, p in named.items() if is_predictor_param(n)}
    assert head and all(p.requires_grad and p.dtype == torch.float32 for p in head.values())
    assert not any(is_adapter_param(n) or ".base_layer." in n for n in head), sorted(head)
    adapters = {n for n, p in named.items() if is_adapter_param(n)}
    assert adapters and all(named[n].requires_grad for n in adapters)
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert frozen and frozen == set(named) - adapters - set(head), "everything else is the frozen base"

    before = {n: full(p) for n, p in named.items()}
    data, _, _ = make_batch(seed=1)
    got = {}
    with e.train_mode():
        e.train_batch(data, loss_function=capture(got, lambda out: -out["log_probs"].values().mean()
                                                  + out["popo_pred"].pow(2).mean()))
    moved = {n for n, p in e.module.named_parameters() if not torch.equal(full(p), before[n])}
    assert moved == set(head) | {n for n in adapters if ".lora_B." in n} or moved == set(head) | adapters, sorted(moved)
    assert not moved & frozen


def test_the_rollout_sync_leaves_the_head_out_in_every_lora_mode(process_group, tiny_random_model):
    from transformers import AutoModelForCausalLM

    e = lora_engine(tiny_random_model)
    hf = set(AutoModelForCausalLM.from_pretrained(tiny_random_model).state_dict())
    # adapter mode (vLLM's add_lora): first the base, then the adapters alone
    base, _ = e.get_per_tensor_param(base_sync_done=False)
    adapters, peft_config = e.get_per_tensor_param(base_sync_done=True)
    base, adapters = dict(base), dict(adapters)
    assert peft_config["r"] == RANK
    assert adapters and all("lora_" in n for n in adapters) and not any(is_predictor_param(n) for n in adapters)
    assert base and not any(is_predictor_param(n) or "lora_" in n for n in base)
    # merge mode (model.lora.merge=true, what the hf rollout needs): HF names, W0 + (alpha / r) B A, which verl
    # 0.9.1 sends in bf16 whatever the actor's dtype (FSDPEngine._merged_lora_per_tensor_param)
    e.model_config.lora["merge"] = True
    merged, none = e.get_per_tensor_param()
    merged = dict(merged)
    assert none is None and set(merged) <= hf and len(merged) >= len(hf) - 1  # tied lm_head may be left out
    with torch.no_grad():
        for _, p in e.module.named_parameters():
            if ".lora_B." in _:
                p.add_(0.1)  # B starts at 0: make the merge visible
    merged = dict(e.get_per_tensor_param()[0])
    state = {n: full(p) for n, p in e.module.named_parameters()}
    expected = merge_lora_state(state, ALPHA / RANK)
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q = state[f"base_model.model.{q}".replace(".weight", ".base_layer.weight")]
    rounding = (merged[q].float() - expected[q]).abs().max()
    assert rounding < 1e-2, "W0 + (alpha / r) B A, to bf16 rounding"
    assert (expected[q] - base_q).abs().max() > 10 * rounding, "the merge moved the weight far beyond that rounding"


def test_the_lora_siamese_is_an_ema_of_the_adapters_swapped_in_for_its_forward(process_group, tiny_random_model):
    e = lora_engine(tiny_random_model)
    siamese = LoraSiamese(e)
    adapters = {n: p for n, p in e.module.named_parameters() if is_adapter_param(n)}
    n_model = sum(p.numel() for p in e.module.parameters())
    n_siamese = sum(t.numel() for t in siamese.state().values())
    assert n_siamese == sum(p.numel() for p in adapters.values()) < n_model / 4, "adapter-sized, not a model copy"

    data, _, _ = make_batch(seed=3)

    def pooled():
        got = {}
        with e.eval_mode():
            e.infer_batch(data.clone(), loss_function=capture(got))
        return got[POOLED_KEY].clone()

    live0 = {n: full(p) for n, p in adapters.items()}
    with torch.no_grad():  # the actor moves away from the siamese (B = 0 at init: move every adapter)
        for p in adapters.values():
            p.add_(0.05 * torch.randn_like(p))
    theta = {n: full(p) for n, p in adapters.items()}
    siamese.ema(0.75)
    xi = {n: full(t) for n, t in siamese.named_siamese_params()}
    for n in adapters:
        assert torch.allclose(xi[n], 0.75 * live0[n] + 0.25 * theta[n], atol=1e-7), n
    drift = sum((theta[n] - xi[n]).pow(2).sum() for n in adapters)
    assert siamese.distance_sq().item() == pytest.approx(drift.item(), rel=1e-6)

    actor_out = pooled()
    e.popo_infer_context = siamese.swapped_in
    try:
        siamese_out = pooled()
    finally:
        e.popo_infer_context = None
    with torch.no_grad():  # the same forward with the EMA adapters put in by hand (one rank: the shard is the whole)
        for n, p in adapters.items():
            local_shard(p.data).copy_(xi[n])
    by_hand = pooled()
    with torch.no_grad():
        for n, p in adapters.items():
            local_shard(p.data).copy_(theta[n])
    assert torch.equal(siamese_out, by_hand) and not torch.allclose(siamese_out, actor_out)
    assert torch.equal(pooled(), actor_out)
    assert all(torch.equal(full(p), theta[n]) for n, p in adapters.items()), "the live adapters are restored"

    state = siamese.state()
    siamese.copy_from_actor()
    assert siamese.distance_sq().item() == 0
    siamese.load(state)
    assert all(torch.equal(full(t), xi[n]) for n, t in siamese.named_siamese_params())
    with pytest.raises(RuntimeError, match="not this run's LoRA siamese"):
        siamese.load({"model.layers.0.self_attn.q_proj.weight": torch.zeros(1)})


def lora_config(**model):
    return OmegaConf.create({
        "algorithm": {"popo": {}, "filter_groups": {"enable": False}},
        "actor_rollout_ref": {"rollout": {"n": 8, "name": "hf"}, "actor": {"strategy": "fsdp2", "checkpoint": {}},
                              "model": {"lora_rank": 8, "lora": {"merge": True}, **model}},
        "data": {"train_batch_size": 8},
        "reward": {"reward_model": {"enable": False, "enable_resource_pool": False}},
        "trainer": {"v1": {"sampler": {"custom_sampler": {"path": None, "name": None}}}},
    })


def test_lora_settings_that_cannot_work_are_refused_naming_the_key():
    validate_popo_config(lora_config())
    cfg = lora_config()
    cfg.actor_rollout_ref.model.lora.merge = False
    with pytest.raises(ValueError, match=r"lora.merge=true with rollout.name=hf"):
        validate_popo_config(cfg)
    cfg = lora_config()
    cfg.actor_rollout_ref.actor.checkpoint.save_lora_only = True
    with pytest.raises(ValueError, match="save_lora_only=true would leave POPO's predictor head out"):
        validate_popo_config(cfg)
    cfg = lora_config()
    cfg.actor_rollout_ref.actor.strategy = "megatron"
    with pytest.raises(ValueError, match="LoRA runs on the FSDP engines"):
        validate_popo_config(cfg)
    with pytest.raises(ValueError, match="LoRA runs on the FSDP engines"):
        validate_popo_config(lora_config(lora_rank=0, lora={"rank": 8, "merge": True}))
    with pytest.raises(ValueError, match="lora_adapter_path"):
        validate_popo_config(lora_config(lora_adapter_path="/some/adapter"))


# ------------------------------------------------------------------------------------------------ end to end
TAU = 0.9


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir):
    """3 steps of POPO with LORA_RANK=8, a checkpoint after each, then the run resumed from step 2's checkpoint."""
    tmp = tmp_path_factory.mktemp("lora")
    env = {"LORA_RANK": "8"}
    first = run_tiny(tmp, tiny_dir, "popo", f"algorithm.popo.tau={TAU}", steps=3, save_freq=1, env_extra=env)
    ckpt = tmp / "resumed"
    shutil.copytree(first["ckpt"] / "global_step_2", ckpt / "global_step_2")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = run_tiny(tmp, tiny_dir, "popo", f"algorithm.popo.tau={TAU}", steps=3, save_freq=1, ckpt=ckpt,
                       env_extra=env)
    return first, resumed


def shards(step_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.full_model_state(step_dir / "actor")


def siamese_of(step_dir: Path) -> dict:
    """The rank's saved siamese state: the adapters' EMA and ema_steps."""
    return checkpoint.full_siamese_state(step_dir / "actor")[1]


def test_lora_trains_through_verl_with_the_base_frozen_and_the_siamese_an_ema_of_the_adapters(lora_run, tiny_dir):
    first, _ = lora_run
    steps = first["steps"]
    assert sorted(steps) == [1, 2, 3]
    for m in steps.values():
        # the hf rollout generates with the adapters merged into the base, rounded to bf16 by verl's merged sync
        # (fp32 weights on both sides give < 1e-4, test_e2e_cpu.py)
        assert m["training/rollout_probs_diff_max"] < 2e-2
        assert 0 < m["popo/drift"] <= m["popo/drift_bound"] * 1.0001 + 1e-12
    initial = initial_state(tiny_dir)
    s2, s3 = (shards(first["ckpt"] / f"global_step_{i}") for i in (2, 3))
    base = {k: v for k, v in s3.items() if not is_adapter_param(k) and not is_predictor_param(k)}
    for k, v in base.items():  # PEFT's names of the untouched HF weights (the tied lm_head is the embedding)
        hf = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(v, initial[hf if hf != "lm_head.weight" else "model.embed_tokens.weight"]), k
    adapters = [k for k in s3 if is_adapter_param(k)]
    head = [k for k in s3 if is_predictor_param(k)]
    assert adapters and head
    assert any(not torch.equal(s2[k], s3[k]) for k in adapters) and any(not torch.equal(s2[k], s3[k]) for k in head)

    x2, x3 = siamese_of(first["ckpt"] / "global_step_2"), siamese_of(first["ckpt"] / "global_step_3")
    assert sorted(x3["siamese"]) == sorted(adapters), "the siamese holds the adapters' EMA, nothing of the base"
    assert x3["ema_steps"] == 3
    for k in adapters:  # one optimizer step per training step: xi_3 = tau xi_2 + (1 - tau) theta_3
        assert torch.allclose(x3["siamese"][k], TAU * x2["siamese"][k] + (1 - TAU) * s3[k], atol=1e-7), k
    assert any(not torch.allclose(x3["siamese"][k], s3[k]) for k in adapters), "the siamese lags the actor"


def test_a_lora_run_resumed_from_its_checkpoint_continues_exactly(lora_run):
    first, resumed = lora_run
    assert sorted(resumed["steps"]) == [3]
    a, b = first["steps"][3], resumed["steps"][3]
    for key in ("popo/positive_ratio", "popo/rows_updated", "popo/ema_steps"):
        assert a[key] == b[key], key
    for key in ("actor/pg_loss", "popo/sim_loss", "popo/drift"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    ma, mb = shards(first["ckpt"] / "global_step_3"), shards(resumed["ckpt"] / "global_step_3")
    for k in ma:  # adapters, head and base
        assert torch.allclose(ma[k], mb[k], atol=1e-6), k
    xa, xb = siamese_of(first["ckpt"] / "global_step_3"), siamese_of(resumed["ckpt"] / "global_step_3")
    for k in xa["siamese"]:
        assert torch.allclose(xa["siamese"][k], xb["siamese"][k], atol=1e-6), k


def test_the_lora_checkpoints_hf_folder_and_the_model_merger_leave_the_head_out(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    first, _ = lora_run
    actor = first["ckpt"] / "global_step_3" / "actor"
    state = shards(first["ckpt"] / "global_step_3")
    merged = merge_lora_state(state, 16 / 8)  # the script's LORA_ALPHA = 2 x rank
    # the checkpoint's huggingface/: the merged model under HF names (verl writes PEFT's names there)
    hf = load_file(str(actor / "huggingface" / "model.safetensors"))
    assert not any(is_predictor_param(k) or "lora_" in k or k.startswith("base_model.") for k in hf)
    for k, v in hf.items():
        assert torch.allclose(v.float(), merged[k], atol=1e-6), k
    AutoModelForCausalLM.from_pretrained(str(actor / "huggingface"))
    # verl's model merger, through popo_verl.model_merger: the base model, and the adapters in lora_adapter/
    target = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "popo_verl.model_merger", "merge", "--backend", "fsdp",
                        "--local_dir", str(actor), "--target_dir", str(target)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    adapter = load_file(str(target / "lora_adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and not is_predictor_param(k) for k in adapter)
    exported = {}
    for f in target.glob("*.safetensors"):
        exported.update(load_file(str(f)))
    assert exported and not any(is_predictor_param(k) or "lora_" in k for k in exported)
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(target)), str(target / "lora_adapter"))
    q = "model.layers.0.self_attn.q_proj.weight"
    w = model.merge_and_unload().state_dict()[q]
    assert torch.allclose(w.float(), merged[q], atol=2e-2)  # verl's merger exports bf16
