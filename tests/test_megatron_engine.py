"""PopoMegatronEngine on verl 0.9.1's real Megatron engine, megatron-core on the CPU over gloo.

Runs where megatron-core and mbridge are installed (`pip install -e ".[megatron-cpu]"`; not in the `test` extra:
installing megatron-core makes every verl process import its Megatron engine, which changes the environment the
CPU runs and benchmarks are measured in). Without them every test here is skipped with that reason, loudly (see
the README's engine section). megatron-core does not run on a CPU torch as shipped: popo_verl/engines/mcore_cpu.py
stands in for the GPU and Transformer Engine (its docstring has the first failing call and each stand-in).

Each layout runs tests/megatron_worker.py on 1 or 2 gloo ranks: TP = PP = 1 (packed THD and padded BSHD),
TP = 2 with sequence parallelism (THD), PP = 2 (THD, two micro-batches through the pipeline schedule), CP = 2 (THD
and BSHD: each rank holds a zigzag half of every sequence; the two ranks are also two replicas of the head in the
distributed optimizer's data-parallel group, as DP = 2 would make them).
Pins what popo_verl/engines/megatron.py relies on in verl/workers/engine/megatron/transformer_impl.py
(`_build_megatron_module`, `forward_step`, `optimizer_step`, `get_per_tensor_param`, `load_checkpoint`), in
mbridge (`get_model(post_model_creation_callbacks=...)`, `load_weights`/`save_weights`) and in megatron-core's
ChainedOptimizer.step (`get_parameters`, `step_with_ready_grads`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed: pip install -e '.[megatron-cpu]' (README, engine support)")
pytest.importorskip("mbridge", reason="mbridge not installed: pip install -e '.[megatron-cpu]' (README, engine support)")

from popo_verl.protocol import is_predictor_param  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "megatron_worker.py")
# name: (world size, TP, PP, CP, packed THD micro-batches)
LAYOUTS = {"tp1_thd": (1, 1, 1, 1, 1), "tp1_bshd": (1, 1, 1, 1, 0), "tp2_sp_thd": (2, 2, 1, 1, 1),
           "pp2_thd": (2, 1, 2, 1, 1), "cp2_thd": (2, 1, 1, 2, 1), "cp2_bshd": (2, 1, 1, 2, 0)}


def run_layout(name, model_path, out_dir):
    world, tp, pp, cp, rmpad = LAYOUTS[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "TP": str(tp), "PP": str(pp), "CP": str(cp), "RMPAD": str(rmpad), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, WORKER, model_path, str(out_dir)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tiny_random_model, tmp_path_factory):
    return request.param, run_layout(request.param, tiny_random_model, tmp_path_factory.mktemp(request.param))


def test_pooled_state_equals_the_response_mean_of_the_final_norm(layout):
    """On the last stage (every TP rank), the pooled state equals the FSDP engine's definition (tests/test_engine.py
    checks the FSDP engine against the same HF fp32 pooling) on the same weights and inputs."""
    name, ranks = layout
    last = [r for r in ranks if r["last_stage"]]
    assert len(last) == len(ranks) // LAYOUTS[name][2]  # every TP and CP rank of the last stage
    for r in last:
        assert r["pooled"].shape == r["expected"].shape == (4, 32)
        assert torch.allclose(r["pooled"], r["expected"], atol=2e-5), (r["pooled"] - r["expected"]).abs().max()


def test_predictor_lives_on_the_last_stage_in_fp32_and_trains(layout):
    _, ranks = layout
    for r in ranks:
        if r["last_stage"]:
            assert r["head_dtypes"] == ["torch.float32"] and r["head_moved"] and all(r["head_moved"])
        else:
            assert r["head_dtypes"] == [] and r["head_moved"] == []
    assert all(r["ref_heads"] == 0 for r in ranks), "the forward-only (siamese) engine has no head"
    assert all(r["ref_outputs"] == ["popo_pooled"] for r in ranks if r["last_stage"])


def test_grad_clip_covers_the_policy_alone(layout):
    """clip_grad = 1: `grad_norm` is the policy's norm before the clip, the policy steps with its main gradient
    clipped to 1, the head's gradient is left out of that norm and clipped on its own (predictor_clip_grad 0.5 on
    one rank; 0 = unclipped on two, where the main-gradient shards are split over TP/PP ranks)."""
    name, ranks = layout
    if len(ranks) == 1:
        r = ranks[0]
        first = r["seen"][0]
        assert r["grad_norm"] == pytest.approx(first["pre_policy"], rel=1e-5)
        assert first["pre_policy"] > 1 and first["pre_head"] > 0.5
        assert first["applied_policy"] == pytest.approx(1.0, rel=1e-4)
        assert first["applied_head"] == pytest.approx(0.5, rel=1e-4)
        assert r["head_norm_metric"] == pytest.approx(first["pre_head"], rel=1e-5)
    else:
        total = sum(r["seen"][0]["pre_policy"] ** 2 for r in ranks) ** 0.5
        grad_norm = next(r["grad_norm"] for r in ranks if r["grad_norm"] is not None)
        assert grad_norm > 1
        scale = sum(r["seen"][0]["applied_policy"] ** 2 for r in ranks) ** 0.5 / total
        assert scale == pytest.approx(1.0 / grad_norm, rel=1e-3), "the policy is clipped by its own norm"
        head = [r["seen"][0] for r in ranks if r["last_stage"]]
        assert all(h["applied_head"] == pytest.approx(h["pre_head"], rel=1e-5) for h in head), "head unclipped"
    assert all(len(r["ema_callbacks"]) == 2 for r in ranks)


def test_siamese_is_the_ema_of_the_actor_in_fp32(layout):
    _, ranks = layout
    for r in ranks:
        assert r["copy_exact"] and r["ref_is_shadow"]
        assert r["ema_moved"] > 1e-4 and r["ema_err"] < 1e-6, (r["ema_moved"], r["ema_err"])
        assert not r["shadow_on_host"], "nothing offloaded: the shadow stays on the device"


def test_siamese_of_a_bf16_actor_follows_the_fp32_main_parameters(layout):
    """bf16 actor (verl's dtype), one step at lr 1e-6 (far below bf16's resolution of the weights), the EMA (tau 0.5)
    run inside optimizer_step as the POPO worker runs it: the shadow is the EMA of the optimizer's fp32 main
    parameters (the distributed optimizer's owned shards on THD layouts, whole fp32 copies without it on BSHD), so
    it moves where the bf16 weights did not (an EMA of the bf16 weights stays put there), and the bf16 ref model
    holds it, every rank's shard included."""
    _, ranks = layout
    for r in ranks:
        assert r["bf16_lr"] == 1e-6 and r["bf16_main_moved"] > 0
        assert r["bf16_still"] > 0, "the step changed every bf16 weight: it tells nothing"
        assert r["bf16_still_shadow_moved"] > 0.5 * r["bf16_still"], (r["bf16_still_shadow_moved"], r["bf16_still"])
        assert r["bf16_main_ema_err"] == 0.0
        assert r["bf16_ref_is_shadow"]
        whole, pairs, on_device = r["bf16_distance_sq"]  # ||theta - xi||^2 (the drift), each weight once over ranks
        assert whole > 0 and pairs == pytest.approx(whole, rel=1e-5) and on_device == pytest.approx(whole, rel=1e-5)


def test_siamese_shadow_lives_in_pinned_host_memory_when_the_actor_is_offloaded(layout):
    """The actor offloaded (param_offload; optimizer_offload on the BSHD layouts, without the distributed optimizer,
    which verl's param_offload needs): the shadow is allocated in pinned host memory (recorded as requested: on the CPU
    stand-in there is no page-locked memory, and verl's offload moves nothing) and is still that storage after a step
    whose EMA ran, so it takes no device memory between steps. A proxy: no device to tell it from on the CPU."""
    _, ranks = layout
    for r in ranks:
        assert r["bf16_shadow_on_host"] and r["bf16_shadow_pinned"] and r["bf16_shadow_stays_pinned"]


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _ShardOwner:
    """A distributed optimizer as `_gather_head_from_its_owners` reads it: this rank owns [start, end) of p."""

    def __init__(self, p, start, end):
        self.model_param_gbuf_map = {p: None}
        self._range = _Range(start, end)

    def _get_model_param_range_map(self, p):
        return {"param": self._range}


def _gather_head(monkeypatch, p, start, end, other_rank):
    """Run PopoMegatronEngine._gather_head_from_its_owners on a head of one parameter p, as one of two data-parallel
    replicas; the other owns `other_rank` (its values, its owner counts), which the all-reduce adds."""
    import types

    from popo_verl.engines import megatron

    reduced = iter(other_rank)

    def all_reduce(t, group=None):
        assert t.device == p.device, f"all-reduce of a {t.device} tensor for a head on {p.device} (NCCL: device only)"
        t.add_(next(reduced))

    monkeypatch.setattr(megatron.mpu, "get_data_parallel_group", lambda with_context_parallel=False: "dp")
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    head = torch.nn.Module()
    head.w = p
    engine = types.SimpleNamespace(optimizer=object(), is_param_offload_enabled=False, module=[],
                                   popo_heads=lambda: [head], _sub_optimizers=lambda: [_ShardOwner(p, start, end)])
    engine._model_onloaded = lambda: megatron.PopoMegatronEngine._model_onloaded(engine)
    with torch.no_grad():
        megatron.PopoMegatronEngine._gather_head_from_its_owners(engine)


def test_head_reload_averages_each_element_over_its_owners(monkeypatch):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # this rank owns [0, 2); the other rank [2, 3)
    _gather_head(monkeypatch, p, 0, 2, [torch.tensor([0.0, 0.0, 30.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])])
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0, 30.0, 4.0]))  # element 3 has no owner: left as it was


def test_head_reload_stays_on_the_head_device(monkeypatch):
    """Issue 32 item 9: the owners' count was made on the CPU (`torch.zeros(n)`), the values on the head's device:
    on a GPU the division mixed devices, and NCCL cannot all-reduce a CPU tensor. A head on another device than the
    CPU ("meta", which exists without an accelerator) shows it."""
    p = torch.nn.Parameter(torch.empty(4, device="meta"))
    _gather_head(monkeypatch, p, 0, 2, [torch.zeros(4, device="meta"), torch.zeros(4, device="meta")])
    assert p.device.type == "meta"


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16"])
def test_fp32_head_keeps_its_device_under_a_dtype_cast(cast):
    """Issue 32 item 11: Float16Module casts the model (`module.bfloat16()`) after mbridge's `.cuda()`; a dtype-only
    cast must leave the head fp32 where it is (a CPU probe moved it to the CPU). "meta" stands for the GPU."""
    from popo_verl.engines.megatron import Fp32PredictorHead

    head = Fp32PredictorHead(8, 4, 2).to("meta", torch.bfloat16)  # a device move applies, a cast does not
    assert {(p.device.type, p.dtype) for p in head.parameters()} == {("meta", torch.float32)}
    head = {"to_bf16": lambda h: h.to(torch.bfloat16), "half": lambda h: h.half(),
            "bfloat16": lambda h: h.bfloat16()}[cast](head)
    assert {(p.device.type, p.dtype) for p in head.parameters()} == {("meta", torch.float32)}


def test_checkpoint_round_trips_weights_and_head_and_exports_leave_it_out(layout):
    _, ranks = layout
    for r in ranks:
        assert r["restored"] and all(r["restored"].values()), [k for k, ok in r["restored"].items() if not ok]
        assert any(is_predictor_param(k) for k in r["restored"]) == r["last_stage"]
        assert r["heads_back_after_export"] == int(r["last_stage"])
        assert r["export_names"] and not any(is_predictor_param(n) for n in r["export_names"])
    hf = ranks[0]["hf_keys"]
    assert hf and not any(is_predictor_param(k) for k in hf)
    assert "model.norm.weight" in hf and "model.embed_tokens.weight" in hf  # the model's own HF names


def test_a_start_from_converted_megatron_shards_loads_without_the_head(layout):
    """use_dist_checkpointing=True: the converted shards have no head (verl's converter saves the plain model); the
    policy's weights load exactly and the head is built fresh on the last stage, not asked of the shards (which
    fails the load: verl loads with StrictHandling.ASSUME_OK_UNEXPECTED); its checkpoints save and load."""
    _, ranks = layout
    for r in ranks:
        assert r["dist_start_same_names"] and r["dist_start_equal"]
        assert r["dist_start_heads"] == int(r["last_stage"])
        assert r["dist_start_restored"] and all(r["dist_start_restored"].values())
    # its checkpoint's HF export (mbridge writes it through an index it sets up only when it loads HF weights)
    assert any(f.endswith(".safetensors") for f in ranks[0]["dist_start_hf_files"]), ranks[0]["dist_start_hf_files"]
    keys = ranks[0]["dist_start_model_keys"]  # the model slot, in Megatron shards: the head is saved with it
    assert any(is_predictor_param(k) for k in keys) and "decoder.final_layernorm.weight" in keys, keys


def test_model_merger_converts_the_megatron_shards_without_the_head(layout, tmp_path):
    """`popo_verl.model_merger --backend megatron` on a checkpoint whose model is in Megatron shards only (that
    checkpoint without its HF export, as `use_dist_checkpointing=True` without `hf_model` saves it): verl's
    MegatronModelMerger (on 1 rank: the TP/PP shards are resharded) on the CPU stand-in gives the HF export's
    weights (to bf16 rounding: it builds a bf16 model) and no head."""
    import json
    import shutil

    from safetensors.torch import load_file

    _, ranks = layout
    actor = tmp_path / "actor"
    shutil.copytree(ranks[0]["dist_start_ckpt"], actor)
    hf = actor / "model" / "huggingface"
    exported = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    contents = json.loads((actor / "ckpt_contents.json").read_text())
    del contents["contents"]["hf_model"]
    (actor / "ckpt_contents.json").write_text(json.dumps(contents))
    r = subprocess.run([sys.executable, "-m", "popo_verl.model_merger", "merge", "--backend", "megatron", "--local_dir",
                        str(actor), "--target_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "converted decoder.final_layernorm.weight to model.norm.weight" in r.stdout  # verl's merger ran
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged.keys() == exported.keys() and not any(is_predictor_param(k) for k in merged)
    for k, v in exported.items():
        torch.testing.assert_close(merged[k].float(), v.float(), atol=1e-2, rtol=1e-2, msg=k)


def test_head_is_fp32_under_a_bf16_model(layout):
    """verl's Megatron models are bf16 (McoreEngineConfig.dtype); the head stays fp32 (not cast by Float16Module)
    and computes in fp32: an fp32 replay of it on the pooled state matches, a bf16 one would not."""
    _, ranks = layout
    last = [r for r in ranks if r["last_stage"]]
    assert last and all("bf16_pred" in r for r in last)
    for r in last:
        _check_fp32_head(r)


def _check_fp32_head(r):
    from popo_verl import core

    assert r["bf16_head_dtypes"] == ["torch.float32"] and r["bf16_policy_dtypes"] == ["torch.bfloat16"]
    head = core.PredictorHead(32, 16, 2)
    head.load_state_dict(r["bf16_head_state"])
    with torch.no_grad():
        replay = head(r["bf16_pooled"])
        bf16 = head.to(torch.bfloat16)(r["bf16_pooled"].to(torch.bfloat16)).float()
    assert torch.allclose(r["bf16_pred"], replay, atol=1e-6), (r["bf16_pred"] - replay).abs().max()
    assert not torch.allclose(bf16, replay, atol=1e-6), "the check above could tell bf16 from fp32"


def test_bf16_checkpoint_round_trips_with_the_fp32_head(layout):
    """verl's default (bf16) model with the fp32 head: the distributed optimizer's groups hold both dtypes, which
    megatron-core 0.16.1 numbers inconsistently (popo_verl/engines/megatron.py `reindex_mixed_dtype_groups`;
    without it each parameter's state lookup finds another parameter's shard and the save fails)."""
    _, ranks = layout
    for r in ranks:
        assert r["bf16_state_lookup_ok"]
        assert r["bf16_restored"] and all(r["bf16_restored"].values()), [k for k, ok in r["bf16_restored"].items() if not ok]
        assert any(is_predictor_param(k) for k in r["bf16_restored"]) == r["last_stage"]
