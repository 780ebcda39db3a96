"""PopoFSDPEngine built in-process on verl 0.9.1's real FSDP2 engine (one gloo rank, CPU backend).

Pins what popo_verl/engines/fsdp.py relies on in verl/workers/engine/fsdp/transformer_impl.py:
`_build_module` / `_build_fsdp_module` / `forward_step` / `prepare_model_outputs` / `optimizer_step` /
`get_per_tensor_param`, and verl's packed (remove-padding) micro-batch layout.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensordict import TensorDict

import verl  # noqa: F401
from verl.trainer.config.config import CheckpointConfig
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
from verl.workers.utils.padding import left_right_2_no_padding

from popo_verl import core
from popo_verl.config import PopoConfig
from popo_verl.engines.fsdp import PopoFSDPEngine
from popo_verl.protocol import POOLED_KEY, PRED_KEY, is_predictor_param

PROMPT, RESPONSE = 5, 6


@pytest.fixture(scope="module")
def process_group():
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build_engine(model_path: str, param_dtype: str, forward_only: bool = False, rmpad: bool = True, sp: int = 1,
                 clip_grad: float = 1.0, predictor_clip_grad: float = 0.0, **model_kwargs) -> PopoFSDPEngine:
    model = HFModelConfig(path=model_path, use_remove_padding=rmpad, override_config={"attn_implementation": "sdpa"},
                          **model_kwargs)
    engine = FSDPEngineConfig(strategy="fsdp2", mixed_precision={"param_dtype": param_dtype}, forward_only=forward_only,
                              use_torch_compile=False, ulysses_sequence_parallel_size=sp)
    engine.use_remove_padding = rmpad
    e = PopoFSDPEngine(model_config=model, engine_config=engine, optimizer_config=FSDPOptimizerConfig(lr=1e-2, clip_grad=clip_grad),
                       checkpoint_config=CheckpointConfig())
    e.configure_popo(PopoConfig(predictor_hidden_dim=16, predictor_layers=2, predictor_clip_grad=predictor_clip_grad), seed=0)
    e.initialize()
    return e


def make_batch(n: int = 4, seed: int = 0, rmpad: bool = True) -> tuple[TensorDict, torch.Tensor, torch.Tensor]:
    """verl's left-padded prompt + right-padded response layout, then its no-padding conversion."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 40, (n, PROMPT + RESPONSE), generator=g)
    attention = torch.ones(n, PROMPT + RESPONSE, dtype=torch.long)
    p_pad = [i % 3 for i in range(n)]  # left padding of the prompt
    r_len = [RESPONSE - (i % 4) for i in range(n)]  # response lengths
    for i in range(n):
        attention[i, : p_pad[i]] = 0
        attention[i, PROMPT + r_len[i]:] = 0
    input_ids = input_ids * attention
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention[:, PROMPT:].clone()
    td = TensorDict({"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
                     "responses": input_ids[:, PROMPT:], "prompts": input_ids[:, :PROMPT],
                     "response_mask": response_mask, "loss_mask": response_mask.clone()}, batch_size=[n])
    padded = (input_ids.clone(), attention.clone(), position_ids.clone())
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, use_remove_padding=rmpad, use_dynamic_bsz=False, micro_batch_size_per_gpu=n, temperature=1.0,
                         calculate_entropy=False, global_batch_size=n)
    return td, padded, response_mask


def reference_pooled(model_path: str, padded, response_mask) -> torch.Tensor:
    """The final-norm states at the response tokens (first response token through the last, EOS), averaged:
    the reference's pooling window, from a plain HF fp32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", torch_dtype=torch.float32)
    input_ids, attention, position_ids = padded
    seen = {}
    h = model.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids)
    h.remove()
    states = seen["h"][:, PROMPT: PROMPT + RESPONSE]  # the states at the response tokens, not those predicting them
    m = response_mask.unsqueeze(-1).float()
    return (states * m).sum(1) / m.sum(1)


def capture(store: dict, loss_from=None):
    def loss_fn(model_output, data, dp_group=None):
        store.update({k: v for k, v in model_output.items() if k in (POOLED_KEY, PRED_KEY)})
        loss = loss_from(model_output) if loss_from else model_output["log_probs"].values().sum() * 0.0
        return loss, {}

    return loss_fn


def full_predictor(e: PopoFSDPEngine) -> torch.nn.Module:
    """An unsharded fp32 copy of the engine's head."""
    head = e.popo_predictor
    first, last = head.net[0], head.net[-1]
    copy = core.PredictorHead(first.in_features, first.out_features, 2, last.out_features)
    copy.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in head.state_dict().items()})
    return copy.float()


@pytest.mark.parametrize("rmpad", [True, False], ids=["remove_padding", "padded"])
def test_pooled_state_is_the_response_mean_of_the_final_norm(process_group, tiny_random_model, rmpad):
    e = build_engine(tiny_random_model, "fp32", rmpad=rmpad)
    data, padded, response_mask = make_batch(rmpad=rmpad)
    got = {}
    with e.eval_mode():
        e.infer_batch(data, loss_function=capture(got))
    expected = reference_pooled(tiny_random_model, padded, response_mask)
    assert got[POOLED_KEY].shape == expected.shape
    assert torch.allclose(got[POOLED_KEY].float().cpu(), expected, atol=1e-5), (got[POOLED_KEY] - expected).abs().max()


def test_predictor_is_fp32_under_bf16_mixed_precision_and_trains(process_group, tiny_random_model):
    e = build_engine(tiny_random_model, "bf16")
    head_params = {n: p for n, p in e.module.named_parameters() if is_predictor_param(n)}
    assert head_params and all(p.dtype == torch.float32 for p in head_params.values())
    replay_head = full_predictor(e)
    before = {n: p.full_tensor().clone() for n, p in head_params.items()}
    steps, got = [], {}
    e.popo_after_optimizer_step = steps.append
    target = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    data, _, _ = make_batch(seed=1)
    with e.train_mode():
        # the log-prob term keeps the LM output in the graph, as popo_actor_loss does: FSDP2 unshards the
        # root for backward from a hook on the model's output
        e.train_batch(data, loss_function=capture(got, lambda out: -F.cosine_similarity(
            out[PRED_KEY], target.to(out[PRED_KEY].device), dim=-1).mean() + 0.0 * out["log_probs"].values().sum()))
    # the head ran in fp32 on the (bf16-model) pooled state: an fp32 replay matches; a bf16 head would be ~1e-2 off
    # (compared on the CPU, where the replay head lives, whatever device verl ran the engine on)
    pred, pooled = got[PRED_KEY].cpu(), got[POOLED_KEY].cpu()
    with torch.no_grad():
        replay = replay_head(pooled.float())
    assert pred.dtype == torch.float32
    assert torch.allclose(pred, replay, atol=1e-6), (pred - replay).abs().max()
    with torch.no_grad():
        bf16 = replay_head.to(torch.bfloat16)(pooled.to(torch.bfloat16)).float()
    assert not torch.allclose(bf16, replay, atol=1e-6), "the check above could tell bf16 from fp32"
    # one optimizer step on the cosine loss: every head weight moved, in fp32; the EMA callback saw it
    assert len(steps) == 1 and steps[0] > 0
    assert all(p.dtype == torch.float32 for p in head_params.values())
    assert all(not torch.equal(p.full_tensor(), before[n]) for n, p in head_params.items())


def _norm(tensors) -> float:
    present = [(t.full_tensor() if hasattr(t, "full_tensor") else t).double() for t in tensors if t is not None]
    return float(torch.sqrt(sum(t.pow(2).sum() for t in present))) if present else 0.0


@pytest.mark.parametrize("predictor_clip", [0.0, 0.5], ids=["head_unclipped", "head_clipped"])
def test_grad_clip_covers_the_policy_alone_and_the_head_norm_is_logged(process_group, tiny_random_model, predictor_clip):
    """verl's clip (clip_grad = 1) sees the policy's norm alone: `actor/grad_norm` is that norm, the policy steps
    with its gradient clipped to 1 by its own norm (not shrunk further by the head's), the head's own norm is logged
    and it steps unclipped, or clipped on its own when predictor_clip_grad > 0."""
    e = build_engine(tiny_random_model, "fp32", clip_grad=1.0, predictor_clip_grad=predictor_clip)
    target = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    data, _, _ = make_batch(seed=4)
    loss = lambda out: 0.01 * out["log_probs"].values().sum() - 5.0 * F.cosine_similarity(  # noqa: E731
        out[PRED_KEY], target.to(out[PRED_KEY].device), dim=-1).sum()
    policy = [p for n, p in e.module.named_parameters() if not is_predictor_param(n)]
    head = [p for n, p in e.module.named_parameters() if is_predictor_param(n)]
    before = [p.full_tensor().clone() for p in head]
    seen, pre_clip = [], {}
    step = e.optimizer.step

    def recording_step(*a, **k):  # what each optimizer.step applies
        seen.append((_norm([p.grad for p in policy]), _norm([p.grad for p in head])))
        return step(*a, **k)

    e.optimizer.step = recording_step
    with e.train_mode():
        orig = e._separable_head_params

        def grads_before_clip():
            params = orig()
            pre_clip["policy"] = _norm([p.grad for p in policy])
            return params

        e._separable_head_params = grads_before_clip
        out = e.train_batch(data, loss_function=capture({}, loss))
    grad_norm = float(out["metrics"]["grad_norm"])
    head_norm = out["metrics"]["popo/predictor_grad_norm"].aggregate()
    assert grad_norm == pytest.approx(pre_clip["policy"], rel=1e-5), "actor/grad_norm is the policy's norm"
    assert grad_norm > 1.0 and head_norm > 1.0, (grad_norm, head_norm)  # both parts need clipping at 1
    applied = [(pn, hn) for pn, hn in seen]
    policy_step = [pn for pn, hn in applied if pn > 0]
    head_step = [hn for pn, hn in applied if hn > 0]
    assert len(policy_step) == 1 and policy_step[0] == pytest.approx(1.0, rel=1e-4), applied
    assert len(head_step) == 1 and head_step[0] == pytest.approx(predictor_clip or head_norm, rel=1e-4), applied
    assert all(pn == 0 or hn == 0 for pn, hn in applied), "policy and head step apart"
    assert all(not torch.equal(p.full_tensor(), b) for p, b in zip(head, before)), "the head was stepped"


def test_weights_for_the_rollout_leave_the_predictor_out(process_group, tiny_random_model):
    from transformers import AutoModelForCausalLM

    e = build_engine(tiny_random_model, "fp32")
    params, _ = e.get_per_tensor_param()
    names = {n for n, _ in params}
    hf = set(AutoModelForCausalLM.from_pretrained(tiny_random_model).state_dict())
    assert not any(is_predictor_param(n) for n in names)
    assert names <= hf and len(names) >= len(hf) - 1  # tied lm_head may be left out


def test_forward_only_engine_has_no_predictor(process_group, tiny_random_model):
    e = build_engine(tiny_random_model, "fp32", forward_only=True)
    assert e.popo_predictor is None
    data, _, _ = make_batch(seed=2)
    got = {}
    with e.eval_mode():
        e.infer_batch(data, loss_function=capture(got))
    assert POOLED_KEY in got and PRED_KEY not in got


@pytest.mark.parametrize("rmpad", [True, False], ids=["remove_padding", "padded"])
def test_pooled_only_forward_skips_the_lm_head_and_the_log_probs(process_group, tiny_random_model, rmpad):
    """The siamese under anchor=cosine: the same pooled states, the LM head on one position per micro-batch, and no
    per-token log-probs in the output (nothing per token goes back to the driver)."""
    e = build_engine(tiny_random_model, "fp32", forward_only=True, rmpad=rmpad)
    positions = []
    hook = e.module.lm_head.register_forward_hook(lambda m, i, o: positions.append(i[0].shape[-2]))
    outputs = {}
    for only in (False, True):
        data, _, _ = make_batch(seed=3, rmpad=rmpad)
        tu.assign_non_tensor(data, popo_pooled_only=only)
        with e.eval_mode():
            outputs[only] = e.infer_batch(data, loss_function=None)["model_output"]
    hook.remove()
    full, pooled_only = outputs[False], outputs[True]
    assert "log_probs" in full and "log_probs" not in pooled_only
    assert positions[0] > 1 and positions[1] == 1, positions
    a, b = full[POOLED_KEY], pooled_only[POOLED_KEY]
    a, b = (t.to_padded_tensor(0.0) if t.is_nested else t for t in (a, b))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ Ulysses SP
def _sp_rank(rank: int, port: int, model_path: str, out_dir: str) -> None:
    from verl.utils.ulysses import ulysses_pad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    e = build_engine(model_path, "fp32", forward_only=True, sp=2)
    data, _, _ = make_batch(n=3, seed=5)
    nnz = int(data["input_ids"].offsets()[-1])
    full = torch.randn(1, nnz, 32, generator=torch.Generator().manual_seed(9))  # the same on both ranks
    _, _, pad = ulysses_pad(torch.zeros(1, nnz, dtype=torch.long), sp_size=2)  # verl's tail pad, then equal slices
    chunk = (nnz + pad) // 2
    local = F.pad(full, (0, 0, 0, pad))[:, rank * chunk: (rank + 1) * chunk].detach().requires_grad_()
    with e.eval_mode(), torch.enable_grad():
        e._popo_pad_size = pad
        pooled = e._pool_response_hidden(local, data)
        pooled.sum().backward()
    torch.save({"pooled": pooled.detach(), "full": full, "local_grad": local.grad, "pad": pad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_pooling_under_ulysses_sequence_parallel(tiny_random_model, tmp_path, monkeypatch):
    """sp = 2 over gloo: each rank holds half of the packed hidden states (verl's own pad-and-slice); the
    pooled state, gathered with verl's gather, equals the pooling of the whole sequence on every rank, and
    the gradient reaches each rank's slice. (The model's Ulysses attention needs flash-attn: GPU only.)
    The two ranks run on the CPU platform even on a GPU machine: one GPU cannot host ranks 0 and 1."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("POPO_VERL_CPU", "1")  # the spawned ranks start fresh interpreters: they read it at import

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sp_rank, args=(port, tiny_random_model, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    data, _, response_mask = make_batch(n=3, seed=5)
    ends = data["input_ids"].offsets()[1:].tolist()
    r_len = response_mask.sum(-1).tolist()
    expected = torch.stack([r0["full"][0, end - r: end].mean(0) for end, r in zip(ends, r_len)])  # response tokens
    for r in (r0, r1):
        assert torch.allclose(r["pooled"], expected, atol=1e-6)
        assert r["local_grad"] is not None and torch.isfinite(r["local_grad"]).all() and r["local_grad"].abs().sum() > 0
    assert r0["local_grad"].shape[1] == (r0["full"].shape[1] + r0["pad"]) // 2
