"""Device -> host transfers in one POPO update, counted on the CPU (the proxy for a GPU's host syncs).

One update = verl's real FSDP2 `train_batch` on POPO's engine with POPO's loss, the EMA and Adam-direction work
after the optimizer step, and the step's `popo_stats`: what the actor worker runs per training step. Each
`.item()`, `.tolist()`, `.cpu()`, `.numpy()` and each tensor turned into a Python float, int or bool is a host
sync on a GPU. Counted where the call comes from POPO's code (popo_verl/); the count must not grow with the number
of parameter tensors or of rows, and stays within a small budget.
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from test_engine import build_engine, make_batch, process_group  # noqa: F401  (fixture)

import popo_verl
from popo_verl.actor_loss import popo_actor_loss
from popo_verl.protocol import SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY
from popo_verl.timing import DeviceTimer
from popo_verl.engines.fsdp import FsdpSiamese
from popo_verl.siamese_ema import SiameseEma
from popo_verl.workers import PopoActorRolloutRefWorker

HOST_TRANSFERS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}
POPO_DIR = os.path.dirname(popo_verl.__file__) + os.sep


class TransferCounter(TorchFunctionMode):
    """Counts host transfers by the first frame outside torch that asked for them."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_TRANSFERS and not self.paused:
            frame = sys._getframe(1)
            while frame is not None and (os.sep + "torch" + os.sep) in frame.f_code.co_filename:
                frame = frame.f_back
            site = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
            self.sites[site] += 1
        return func(*args, **(kwargs or {}))

    def popo(self) -> collections.Counter:
        return collections.Counter({k: v for k, v in self.sites.items() if k.startswith(POPO_DIR)})


def _model(tmp_path_factory, layers: int) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp(f"model_{layers}_layers")
    cfg = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=2, pad_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _worker(actor, ref) -> PopoActorRolloutRefWorker:
    """The worker's per-step POPO state around two in-process engines (its Ray and hybrid-engine set-up left out)."""
    w = object.__new__(PopoActorRolloutRefWorker)
    w.actor, w.ref = SimpleNamespace(engine=actor), SimpleNamespace(engine=ref)
    w.ema = SiameseEma(FsdpSiamese(actor, ref), tau=0.99, clip_grad=actor.optimizer_config.clip_grad)
    w.noise_timer = DeviceTimer()
    w.ema.siamese.copy_from_actor()
    actor.popo_after_optimizer_step = w._after_optimizer_step
    return w


def _update_batch(rows: int, hidden: int):
    data, _, response_mask = make_batch(n=rows, seed=rows)
    data["old_log_probs"] = torch.nested.nested_tensor([torch.full((int(m.sum()),), -3.0) for m in response_mask],
                                                       layout=torch.jagged)
    w = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(rows)])
    data["advantages"] = torch.nested.nested_tensor([torch.full((int(m.sum()),), float(w[i])) for i, m in enumerate(response_mask)],
                                                    layout=torch.jagged)
    data[SIM_WEIGHT_KEY] = w / w.sum()
    data[TOKEN_SCALE_KEY] = torch.ones(rows)
    data[SIAMESE_KEY] = torch.randn(rows, hidden)
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, calculate_entropy=True, dp_size=1)
    return data


def _one_update(actor, worker, rows: int) -> TransferCounter:
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp2", ppo_mini_batch_size=rows, ppo_micro_batch_size_per_gpu=rows, use_dynamic_bsz=False,
                         rollout_n=1)
    loss = partial(popo_actor_loss, config=config, alpha=0.1, beta=0.01, noise_std=0.02, noise_seed=3,
                   noise_timer=worker.noise_timer)
    data = _update_batch(rows, 32)
    counter = TransferCounter()
    step = actor.optimizer.step

    def optimizer_step(*a, **k):  # torch's CPU Adam reads each tensor's step count (its CUDA path is fused/foreach)
        counter.paused = True
        try:
            return step(*a, **k)
        finally:
            counter.paused = False

    actor.optimizer.step = optimizer_step
    try:
        with counter:
            actor.train_batch(data, loss_function=lambda model_output, data, dp_group=None: loss(
                model_output=model_output, data=data, dp_group=dp_group))
            stats = worker.popo_stats(True)
    finally:
        actor.optimizer.step = step
    assert worker.ema.ema_steps >= 1 and stats["popo/drift"] > 0, "the update stepped the optimizer and the EMA"
    return counter


@pytest.fixture(scope="module")
def counts(process_group, tmp_path_factory):  # noqa: F811
    out = {}
    for layers in (1, 3):
        path = _model(tmp_path_factory, layers)
        actor, ref = build_engine(path, "fp32"), build_engine(path, "fp32", forward_only=True)
        worker = _worker(actor, ref)
        n_tensors = sum(1 for _ in actor.module.parameters())
        for rows in (4, 8):
            out[(layers, rows)] = (_one_update(actor, worker, rows), n_tensors)
    return out


def _report(counts) -> str:
    return "\n".join(f"{key} ({n} tensors): POPO {sum(c.popo().values())} {dict(c.popo())}; all {sum(c.sites.values())}"
                     for key, (c, n) in counts.items())


def test_popo_host_transfers_do_not_grow_with_parameters_or_rows(counts):
    assert counts[(1, 4)][1] < counts[(3, 4)][1], "the two models differ in parameter tensors"
    popo = {key: sum(c.popo().values()) for key, (c, _) in counts.items()}
    assert len(set(popo.values())) == 1, _report(counts)


def test_popo_host_transfers_stay_within_budget(counts):
    """Per update: the loss's metrics (one transfer per micro-batch), the head's norm (FSDP2: its own clip; metric and
    finite check from one read) and the step's statistics (drift and G_max together). verl's own loop makes the rest."""
    c, _ = counts[(3, 8)]
    assert sum(c.popo().values()) <= 3, _report(counts)


def test_stats_without_drift_leave_out_the_pass_over_the_weights(process_group, tiny_random_model):  # noqa: F811
    """drift_interval: on the steps between, popo_stats reports the bound and timings but never reads the weights."""
    actor, ref = build_engine(tiny_random_model, "fp32"), build_engine(tiny_random_model, "fp32", forward_only=True)
    worker = _worker(actor, ref)
    read = []
    worker.ema.siamese.distance_sq = lambda: read.append(1) or torch.zeros((), dtype=torch.float64)
    stats = worker.popo_stats(False)
    assert "popo/drift" not in stats and "popo/drift_bound" in stats and not read
    assert "popo/drift" in worker.popo_stats(True) and read == [1]


class GroupStepAdam(torch.optim.Optimizer):
    """Adam with the state layout of Transformer Engine's and Apex's FusedAdam: `step` in the param group, only the
    moments per parameter."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** group["step"])
                v_hat = st["exp_avg_sq"] / (1 - b2 ** group["step"])
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


def test_adam_direction_reads_the_step_count_wherever_the_optimizer_keeps_it():
    """G_t from torch's AdamW (step per parameter, a tensor) and from a FusedAdam-style optimizer (step in the group)
    on the same gradients: the same norm, and the update it describes is the one the optimizer applied."""
    from popo_verl.siamese_ema import adam_direction_sq

    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = {}
    for name, make in (("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)),
                       ("group_step", lambda ps: GroupStepAdam(ps, lr=1e-2))):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = make(params)
        for gs in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        total, found = adam_direction_sq([opt], skip_ids=set())
        applied = sum(((b - p.detach()) / 1e-2).pow(2).sum() for b, p in zip(before, params))
        results[name] = float(total)
        assert found == len(shapes)
        assert float(total) == pytest.approx(float(applied), rel=1e-4)
    assert results["torch"] == pytest.approx(results["group_step"], rel=1e-6)
