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
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from popo_verl.engines import mcore_cpu  # noqa: E402

mcore_cpu.install()

import verl  # noqa: E402,F401
from test_engine import make_batch, reference_pooled  # noqa: E402
from verl.trainer.config.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.megatron_utils import get_hf_model_checkpoint_path, get_model_dist_checkpoint_path, unwrap_model  # noqa: E402
from verl.workers.config import HFModelConfig, McoreEngineConfig, McoreOptimizerConfig  # noqa: E402

from popo_verl.config import PopoConfig  # noqa: E402
from popo_verl.protocol import POOLED_KEY, PRED_KEY, is_predictor_param  # noqa: E402
from popo_verl.engines.megatron import MegatronSiamese, PopoMegatronEngine, named_local_params  # noqa: E402

TP, PP, CP = (int(os.environ.get(k, "1")) for k in ("TP", "PP", "CP"))
RMPAD = os.environ.get("RMPAD", "1") == "1"
# the bf16 siamese's actor: megatron's distributed optimizer (verl's default) on the THD layouts, its
# Float16OptimizerWithFloat16Params (`use_distributed_optimizer=False`) on the BSHD ones
DIST_OPT = RMPAD
TARGET = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))


def loss_of(out):
    """A loss on the log-probs and the head's prediction (against a fixed target)."""
    rows = out[PRED_KEY].shape[0]
    t = TARGET[:rows] if rows == 2 else TARGET
    return 0.01 * out["log_probs"].values().sum() - 5.0 * F.cosine_similarity(out[PRED_KEY], t, dim=-1).sum()


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
    e.configure_popo(PopoConfig(predictor_hidden_dim=16, predictor_layers=2, predictor_clip_grad=predictor_clip_grad), seed=0)
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
    """Save, move every local parameter (head included), load: whether each came back exactly. The parameters are
    read and moved on the device (eval_mode onloads them where verl offloads them: param_offload)."""
    with e.eval_mode():
        saved = {k: p.detach().clone() for k, p in named_local_params(e, with_head=True).items()}
    e.save_checkpoint(ckpt, global_step=1)
    with e.eval_mode(), torch.no_grad():
        for p in named_local_params(e, with_head=True).values():
            p.add_(1.0)
    e.load_checkpoint(ckpt, del_local_after_load=False)
    with e.eval_mode():
        now = {k: p.detach().clone() for k, p in named_local_params(e, with_head=True).items()}
    return {k: bool(torch.equal(now[k], v)) for k, v in saved.items()}


class PinnedAllocations(TorchFunctionMode):
    """Records the storage of every tensor allocated in pinned host memory (`device="cpu", pin_memory=True`: on a
    GPU machine page-locked host memory; the CPU stand-in drops the pinning after this mode has seen the call)."""

    def __init__(self):
        super().__init__()
        self.ptrs = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if kwargs.get("pin_memory") and str(kwargs.get("device")) == "cpu" and isinstance(out, torch.Tensor):
            self.ptrs.add(out.data_ptr())
        return out


def owned_range(engine, p):
    """The range of the flat parameter p whose fp32 main values this rank's optimizer steps (megatron's own map)."""
    for opt in engine._sub_optimizers():
        if p in getattr(opt, "model_param_gbuf_map", {}):
            r = opt._get_model_param_range_map(p)["param"]
            return r.start, r.end
    return None


def whole(engine, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each local parameter's values in full (fp32, CPU) from this rank's `values` (its owned range, under the
    distributed optimizer with several data-parallel ranks; summed over them: one owner per element)."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group(with_context_parallel=True)
    distributed = any(hasattr(o, "model_param_gbuf_map") for o in engine._sub_optimizers())
    sharded = distributed and dist.get_world_size(group) > 1
    out = {}
    for k, p in sorted(named_local_params(engine).items()):
        v = values[k].detach().float().cpu().clone()
        if not sharded:
            out[k] = v.reshape(p.shape)
            continue
        full = torch.zeros(p.numel())
        r = owned_range(engine, p)
        if r is not None:
            flat = v.reshape(-1)
            if flat.numel() == p.numel():  # the whole parameter held here (a shadow kept whole): its owned range
                flat = flat[r[0]:r[1]]
            full[r[0]:r[1]] = flat
        dist.all_reduce(full, group=group)
        out[k] = full.reshape(p.shape)
    return out


def main_values(engine) -> dict[str, torch.Tensor]:
    """theta's fp32 main values on this rank: the handle megatron's mixed-precision optimizers give each bf16
    parameter (`param.main_param`: the owned shard under the distributed optimizer, a whole fp32 copy without)."""
    out = {}
    for k, p in named_local_params(engine).items():
        out[k] = p.main_param if getattr(p, "main_param", None) is not None else torch.empty(0)
    return out


def bf16_siamese_step(actor, ref, res, got, data) -> None:
    """The siamese of a bf16 actor that verl offloads between steps: its shadow is allocated in pinned host memory and
    stays there; one step at lr 1e-6 (far below bf16's resolution of the weights, about 1e-4 at 0.02) with the EMA
    (tau 0.5) where the POPO worker runs it, inside optimizer_step: the shadow follows theta's fp32 main values."""
    pinned = PinnedAllocations()
    with pinned:
        sia = MegatronSiamese(actor, ref)
    sia.copy_from_actor()
    main0 = whole(actor, main_values(actor))
    for opt in actor._sub_optimizers():
        for group in opt.optimizer.param_groups:
            group["lr"] = 1e-6
    seen = {}

    def ema_in_step(grad_norm):
        seen["lr"] = actor._sub_optimizers()[0].optimizer.param_groups[0]["lr"]
        seen["model"] = {k: p.detach().float().clone() for k, p in named_local_params(actor).items()}
        sia.ema(0.5)

    def in_pinned_memory():
        return all(t.device.type == "cpu" and t.data_ptr() in pinned.ptrs for t in sia.shadow.values() if t.numel())

    res["bf16_shadow_on_host"] = getattr(sia, "on_host", None)
    res["bf16_shadow_pinned"] = in_pinned_memory()
    actor.popo_after_optimizer_step = ema_in_step
    with actor.train_mode():  # collective: every stage runs it
        actor.train_batch(data, loss_function=capture(got, loss_of))
    del actor.popo_after_optimizer_step
    res["bf16_shadow_stays_pinned"] = in_pinned_memory()
    main1, shadow1 = whole(actor, main_values(actor)), whole(actor, sia.shadow)
    still = {k: seen["model"][k] == main0[k] for k in main0}  # elements whose bf16 weight the step left as it was
    res["bf16_lr"] = seen["lr"]
    res["bf16_main_moved"] = sum(int((main1[k] != main0[k]).sum()) for k in main0)
    res["bf16_still"] = sum(int(m.sum()) for m in still.values())
    res["bf16_still_shadow_moved"] = sum(int((still[k] & (shadow1[k] != main0[k])).sum()) for k in main0)
    res["bf16_main_ema_err"] = max(float((shadow1[k] - torch.lerp(main0[k], main1[k], 0.5)).abs().max()) for k in main0)
    res["bf16_ref_is_shadow"] = all(torch.equal(p.detach().float(), shadow1[k].to(torch.bfloat16).float())
                                    for k, p in named_local_params(ref).items())
    # ||theta - xi||^2 summed over all ranks, each weight once: from the whole tensors (the first data-/context-
    # parallel replica; tensor-parallel duplicates and the last stage's copy of tied embeddings left out, as
    # megatron's grad norm does), against the siamese's own sums
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    first = mpu.get_data_parallel_rank(with_context_parallel=True) == 0
    sums = torch.tensor([
        sum(float((main1[k] - shadow1[k]).double().square().sum()) for k, p in named_local_params(actor).items()
            if first and param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p)),
        sum(float((theta.float().cpu() - xi.cpu()).double().square().sum()) for xi, theta in zip(*sia.counted_pairs())),
        float(sia.distance_sq()) if hasattr(sia, "distance_sq") else float("nan"),
    ], dtype=torch.float64)
    dist.all_reduce(sums)
    res["bf16_distance_sq"] = sums.tolist()  # [whole tensors, counted_pairs, distance_sq]


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
    data, _, _ = batch(seed=4)
    loss = loss_of
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
    actor_now = {k: p.detach().float().clone() for k, p in sia.actor_params().items()}
    res["copy_exact"] = all(torch.equal(v, actor_now[k]) for k, v in whole(e, sia.shadow).items())
    with e.train_mode():
        e.train_batch(batch(seed=5)[0], loss_function=capture({}, loss))
    old = whole(e, sia.shadow)
    actor_now = {k: p.detach().float().clone() for k, p in sia.actor_params().items()}
    sia.ema(0.9)
    new = whole(e, sia.shadow)
    res["ema_err"] = max(float((new[k] - (0.9 * old[k] + 0.1 * actor_now[k])).abs().max()) for k in old)
    res["ema_moved"] = max(float((new[k] - old[k]).abs().max()) for k in old)
    res["ref_is_shadow"] = all(torch.equal(p.detach().float(), new[k]) for k, p in named_local_params(ref).items())
    res["shadow_on_host"] = getattr(sia, "on_host", None)  # nothing offloaded: the shadow stays on the device
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
    # bf16 model (verl's default dtype), its parameters offloaded between steps (param_offload): the head is stored
    # and computed in fp32
    b = build(model_path, dtype="bfloat16", param_offload=True)
    heads = b.popo_heads()
    with b.eval_mode():
        state = {k: v.detach().cpu().clone() for k, v in heads[0].state_dict().items()} if heads else None
    got = {}
    rb = build(model_path, dtype="bfloat16", forward_only=True)  # a bf16 siamese
    if DIST_OPT:
        bf16_siamese_step(b, rb, res, got, batch(seed=1)[0])
    else:
        with b.train_mode():  # collective: every stage runs it
            b.train_batch(batch(seed=1)[0], loss_function=capture(got, loss))
        # megatron's non-distributed optimizer, on an actor of its own: not round-tripped (its checkpoints cannot hold
        # an fp32 parameter in a bf16 model: Float16OptimizerWithFloat16Params.sharded_state_dict pairs its states with
        # float16 parameters only); offloaded with optimizer_offload (verl's param_offload needs the distributed
        # optimizer's parameter buffers)
        n = build(model_path, dtype="bfloat16", optimizer_offload=True, use_distributed_optimizer=False)
        bf16_siamese_step(n, rb, res, {}, batch(seed=1)[0])
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
