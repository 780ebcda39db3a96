"""One rank of tests/test_megatron_engine.py: PopoMegatronEngine on megatron-core on the CPU (gloo).

python tests/megatron_worker.py MODEL OUT_DIR   with RANK, WORLD_SIZE, MASTER_ADDR/PORT, TP, PP, CP, RMPAD set.
Writes OUT_DIR/rank<r>.pt with what the test asserts on.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from popo_verl.engines import mcore_cpu  # noqa: E402

mcore_cpu.install()

import verl  # noqa: E402,F401
from test_engine import make_batch, reference_pooled  # noqa: E402
from verl.trainer.config.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.megatron_utils import get_hf_model_checkpoint_path, get_model_dist_checkpoint_path, unwrap_model  # noqa: E402
from verl.workers.config import HFModelConfig, McoreEngineConfig, McoreOptimizerConfig  # noqa: E402

from popo_verl.engines.fsdp import POOLED_KEY, PRED_KEY, is_predictor_param  # noqa: E402
from popo_verl.engines.megatron import MegatronSiamese, PopoMegatronEngine, named_local_params  # noqa: E402

TP, PP, CP = (int(os.environ.get(k, "1")) for k in ("TP", "PP", "CP"))
RMPAD = os.environ.get("RMPAD", "1") == "1"


def build(model_path, dtype="float32", forward_only=False, clip_grad=1.0, predictor_clip_grad=0.0, checkpoint=None,
          **engine):
    model = HFModelConfig(path=model_path, use_remove_padding=RMPAD)
    ec = McoreEngineConfig(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP, context_parallel_size=CP,
                           vanilla_mbridge=True,
                           use_mbridge=True, forward_only=forward_only, use_remove_padding=RMPAD,
                           override_transformer_config=dict(mcore_cpu.ENGINE_OVERRIDES), **engine)
    # verl allows bf16/fp16 Megatron models only (McoreEngineConfig.dtype): fp32 here compares exactly
    object.__setattr__(ec, "dtype", dtype)
    oc = McoreOptimizerConfig(lr=1e-2, clip_grad=clip_grad, total_training_steps=10)
    e = PopoMegatronEngine(model_config=model, engine_config=ec, optimizer_config=oc,
                           checkpoint_config=checkpoint or CheckpointConfig())
    e.configure_popo(predictor_hidden=16, predictor_layers=2, seed=0, predictor_clip_grad=predictor_clip_grad)
    e.initialize()
    return e


def batch(seed):
    data, padded, response_mask = make_batch(seed=seed, rmpad=RMPAD)
    tu.assign_non_tensor(data, micro_batch_size_per_gpu=2)  # two micro-batches: the pipeline schedule runs
    return data, padded, response_mask


def capture(store, loss_from=None):
    def loss_fn(model_output, data, dp_group=None):
        store.setdefault(POOLED_KEY, []).append(model_output[POOLED_KEY].detach().float().cpu())
        if PRED_KEY in model_output:
            store.setdefault(PRED_KEY, []).append(model_output[PRED_KEY].detach().float().cpu())
        lp = model_output["log_probs"]
        loss = loss_from(model_output) if loss_from else lp.values().sum() * 0.0
        return loss, {}

    return loss_fn


def norm(ts):
    ts = [t.double() for t in ts if t is not None]
    return float(torch.sqrt(sum(t.pow(2).sum() for t in ts))) if ts else 0.0


def round_trip(e, ckpt) -> dict[str, bool]:
    """Save, move every local parameter (head included), load: whether each came back exactly."""
    saved = {k: p.detach().clone() for k, p in named_local_params(e, with_head=True).items()}
    e.save_checkpoint(ckpt, global_step=1)
    with torch.no_grad():
        for p in named_local_params(e, with_head=True).values():
            p.add_(1.0)
    e.load_checkpoint(ckpt, del_local_after_load=False)
    now = named_local_params(e, with_head=True)
    return {k: bool(torch.equal(now[k], v)) for k, v in saved.items()}


def main(model_path: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    res = {"tp": TP, "pp": PP, "cp": CP}

    # -- pooled state (fp32 model) against the pooling of an HF fp32 forward of the same weights
    e = build(model_path, clip_grad=1.0, predictor_clip_grad=0.5 if TP == PP == CP == 1 else 0.0)
    data, padded, response_mask = batch(seed=0)
    got = {}
    with e.eval_mode():
        e.infer_batch(data, loss_function=capture(got))
    res["last_stage"] = bool(e.popo_heads())
    if got:
        res["pooled"] = torch.cat(got[POOLED_KEY])
        res["expected"] = reference_pooled(model_path, padded, response_mask)
    res["head_dtypes"] = sorted({str(p.dtype) for h in e.popo_heads() for p in h.parameters()})

    # -- one training step: the head trains, its gradient stays out of the policy's clip
    heads = [p for h in e.popo_heads() for p in h.parameters()]
    head_before = [p.detach().clone() for p in heads]
    sub = e._sub_optimizers()[0]
    head_ids = e._popo_head_shards[0]
    seen = []
    prepare, inner_step = sub.prepare_grads, sub.optimizer.step

    def recording_prepare():
        found_inf = prepare()
        params = [p for g in sub.optimizer.param_groups for p in g["params"]]
        seen.append({"pre_policy": norm([p.grad for p in params if id(p) not in head_ids]),
                     "pre_head": norm([p.grad for p in params if id(p) in head_ids])})
        return found_inf

    def recording_step(*a, **k):
        params = [p for g in sub.optimizer.param_groups for p in g["params"]]
        seen[-1].update(applied_policy=norm([p.grad for p in params if id(p) not in head_ids]),
                        applied_head=norm([p.grad for p in params if id(p) in head_ids]))
        return inner_step(*a, **k)

    sub.prepare_grads, sub.optimizer.step = recording_prepare, recording_step
    steps = []
    e.popo_after_optimizer_step = steps.append
    target = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    data, _, _ = batch(seed=4)

    def loss(out):
        rows = out[PRED_KEY].shape[0]
        t = target[:rows] if rows == 2 else target
        return 0.01 * out["log_probs"].values().sum() - 5.0 * F.cosine_similarity(out[PRED_KEY], t, dim=-1).sum()

    with e.train_mode():
        out = e.train_batch(data, loss_function=capture({}, loss))
    metrics = out.get("metrics", {}) if isinstance(out, dict) else {}
    res["grad_norm"] = float(metrics["grad_norm"]) if "grad_norm" in metrics else None
    res["head_norm_metric"] = e.popo_predictor_grad_norm
    res["seen"] = list(seen)
    res["ema_callbacks"] = steps
    res["head_moved"] = [not torch.equal(p, b) for p, b in zip(heads, head_before)]

    # -- the siamese: fp32 shadow of a forward-only (ref) engine, EMA of the actor
    ref = build(model_path, forward_only=True)
    res["ref_heads"] = len(ref.popo_heads())
    sia = MegatronSiamese(e, ref)
    sia.copy_from_actor()
    res["copy_exact"] = all(torch.equal(xi, th.float()) for xi, th in zip(*sia.pairs()))
    with e.train_mode():
        e.train_batch(batch(seed=5)[0], loss_function=capture({}, loss))
    old = {k: v.clone() for k, v in sia.shadow.items()}
    actor_now = {k: p.detach().float().clone() for k, p in sia.actor_params().items()}
    sia.ema(0.9)
    res["ema_err"] = max(float((sia.shadow[k] - (0.9 * old[k] + 0.1 * actor_now[k])).abs().max()) for k in old)
    res["ema_moved"] = max(float((sia.shadow[k] - old[k]).abs().max()) for k in old)
    res["ref_is_shadow"] = all(torch.equal(p.detach().float(), sia.shadow[k]) for k, p in named_local_params(ref).items())
    got = {}
    with ref.eval_mode():
        ref.infer_batch(batch(seed=0)[0], loss_function=capture(got))
    res["ref_outputs"] = sorted(got)

    # -- the rollout's weights and the HF export leave the head out; the dist checkpoint round-trips it
    params, _ = e.get_per_tensor_param()
    res["export_names"] = sorted(n for n, _ in params)
    res["heads_back_after_export"] = len(e.popo_heads())
    ckpt = os.path.join(out_dir, "ckpt")
    res["restored"] = round_trip(e, ckpt)
    if rank == 0:
        from safetensors import safe_open

        hf = get_hf_model_checkpoint_path(ckpt)
        keys = []
        for f in sorted(os.listdir(hf)) if os.path.isdir(hf) else []:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(hf, f), "pt") as st:
                    keys += list(st.keys())
        res["hf_keys"] = sorted(keys)
    # -- a start from Megatron shards converted from the HF model (use_dist_checkpointing=True; verl's converter
    #    saves the model's sharded state dict, which has no head): the policy's weights load, the head starts anew
    from megatron.core import dist_checkpointing

    from popo_verl.engines.megatron import head_detached

    shards = os.path.join(out_dir, "converted")
    os.makedirs(shards, exist_ok=True)
    with head_detached(e.module):
        dist_checkpointing.save(unwrap_model(e.module[0]).sharded_state_dict(), shards)
    d = build(model_path, use_dist_checkpointing=True, dist_checkpointing_path=shards,
              checkpoint=CheckpointConfig(save_contents=["model", "optimizer", "extra", "hf_model"]))
    want, got = named_local_params(e), named_local_params(d)
    res["dist_start_same_names"] = sorted(want) == sorted(got)
    res["dist_start_equal"] = all(torch.equal(got[k].detach(), p.detach()) for k, p in want.items() if k in got)
    res["dist_start_heads"] = len(d.popo_heads())
    with d.train_mode():  # it trains (and its optimizer has a state to save: none before a step without TE)
        d.train_batch(batch(seed=6)[0], loss_function=capture({}, loss))
    d_ckpt = os.path.join(out_dir, "ckpt_dist_start")
    res["dist_start_restored"] = round_trip(d, d_ckpt)  # its checkpoint, HF export included, saves and loads
    res["dist_start_ckpt"] = d_ckpt
    if rank == 0:  # the model slot in Megatron shards (the head's keys with it), the HF export beside it
        res["dist_start_hf_files"] = sorted(os.listdir(get_hf_model_checkpoint_path(d_ckpt)))
        res["dist_start_model_keys"] = sorted(dist_checkpointing.load_tensors_metadata(
            get_model_dist_checkpoint_path(d_ckpt)))
    # bf16 model (verl's default dtype): the head is stored and computed in fp32
    b = build(model_path, dtype="bfloat16")
    heads = b.popo_heads()
    state = {k: v.detach().cpu().clone() for k, v in heads[0].state_dict().items()} if heads else None
    got = {}
    with b.train_mode():  # collective: every stage runs it
        b.train_batch(batch(seed=1)[0], loss_function=capture(got, lambda out: out[PRED_KEY].sum() * 0.0
                                                              + out["log_probs"].values().sum() * 0.0))
    # its checkpoint round-trips: the fp32 head makes the optimizer's groups mixed-dtype
    # (popo_verl/engines/megatron.py reindex_mixed_dtype_groups)
    res["bf16_state_lookup_ok"] = all(
        opt._get_main_param_and_optimizer_states(p)["param"].numel() == opt._get_model_param_range_map(p)["param"].size
        for opt in b._sub_optimizers() for p in opt.model_param_group_index_map)
    res["bf16_restored"] = round_trip(b, os.path.join(out_dir, "ckpt_bf16"))
    if heads:
        res["bf16_head_state"] = state
        res["bf16_head_dtypes"] = sorted({str(p.dtype) for h in heads for p in h.parameters()})
        res["bf16_policy_dtypes"] = sorted({str(p.dtype) for p in named_local_params(b).values()})
        res["bf16_pooled"], res["bf16_pred"] = torch.cat(got[POOLED_KEY]), torch.cat(got[PRED_KEY])
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
