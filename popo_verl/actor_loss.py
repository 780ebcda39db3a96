"""POPO's actor loss, installed on verl's actor with `set_loss_fn` in place of `ppo_loss`.

Mirrors the contract of verl 0.9.1's `verl/workers/utils/losses.py::ppo_loss(config, model_output,
data, dp_group)`: one micro-batch in, (loss, metrics) out; `data` carries verl's global-batch info
(dp_size, batch_num_tokens, global_batch_size) so that the sum of micro-batch losses over ranks
and micro-batches is the loss of the whole mini-batch. Metrics follow verl's convention too: each
rank logs its dp-scaled share with SUM aggregation over micro-batches, and verl averages over ranks.

Per micro-batch, with w the POPO weight of each row (in `advantages`), s = `popo_sim_weight`
(w rescaled by the trainer so that the mini-batch sum of s is 1), c = `popo_token_scale`
(all tokens / positive tokens of the update batch; 1 when only positives are sent; 0 on padding
rows), all three per row, and g(r) = r for r <= 1 + eps_high, 0 above (PPO's clip for a positive
advantage; r = 1 on the first mini-batch of a rollout batch):
    L_nll = agg_loss(-w * c * log pi)   with gradient -w * c * g(r) * grad log pi    (nll_norm=token)
          = dp * sum_b s_b mean_t(-log pi_bt)   with the same g(r) per token        (nll_norm=sequence)
    L_sim = -dp * sum_b s_b cos(h_phi(f_theta)_b, sg(f_xi_b + eps_b))   (eps_b keyed by the row's tokens)
    L_ent = -agg_loss(H * c) over the entropy rows (positives, or all with entropy_on=all)
    L     = L_nll + alpha * L_sim + beta * L_ent
which is POPO.md's loss on the mini-batch at ratio 1 (tests/test_losses.py checks it against tests/reference_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from popo_verl import core
from popo_verl.policy_loss import compute_policy_loss_popo, popo_policy_loss_per_sequence
from popo_verl.protocol import PRED_KEY, SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY, tokens_to_row
from popo_verl.timing import DeviceTimer


def row_keys(data) -> torch.Tensor:
    """The key of each row's feature noise: `core.row_hash` of its token ids (prompt + response) -> int64[B].

    Hashed where the ids are: no copy to the host, no sync (on a GPU a host copy is a sync per micro-batch)."""
    ids = data["input_ids"]
    if getattr(ids, "is_nested", False):
        if ids.lengths() is None:  # contiguous rows, one after another
            return core.row_hash(ids.values(), ids.offsets())
        rows = ids.unbind()  # a view with gaps (torch.nested.narrow): rare, and its lengths are on the host
        lengths = torch.tensor([0] + [r.numel() for r in rows], device=ids.values().device)
        return core.row_hash(torch.cat(rows), lengths.cumsum(0))
    n_rows, width = ids.shape
    return core.row_hash(ids.reshape(-1), torch.arange(n_rows + 1, device=ids.device) * width)


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """A per-row field as [B]: sent per row ([B]) or, as verl sends advantages, on the response layout."""
    return t if t.dim() == 1 and not getattr(t, "is_nested", False) else tokens_to_row(t)


def popo_actor_loss(
    config,
    model_output,
    data,
    dp_group=None,
    alpha: float = 0.1,
    beta: float = 0.01,
    noise_std: float = 0.0,
    entropy_on: str = "positives",
    noise_seed: Callable[[], int] | int = 0,
    anchor: str = "cosine",
    nll_norm: str = "token",
    noise_timer: DeviceTimer | None = None,
):
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)

    config.global_batch_info["dp_size"] = data["dp_size"]
    config.global_batch_info["batch_num_tokens"] = data["batch_num_tokens"]
    config.global_batch_info["global_batch_size"] = data["global_batch_size"]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    dp_size = int(data["dp_size"])
    aggregation = AggregationType.SUM

    present = ["response_mask", "old_log_probs"]
    if SIAMESE_KEY in data.keys():
        present.append(SIAMESE_KEY)
    if anchor == "kl":
        if "ref_log_prob" not in data.keys():
            raise RuntimeError("POPO loss with anchor=kl: the update batch has no siamese log-probs (ref_log_prob)")
        present.append("ref_log_prob")
    tensors = data.select(*present).to_padded_tensor()
    response_mask = tensors["response_mask"].to(bool)
    weights = _per_row(data["advantages"]).to(log_prob.dtype).clamp(min=0.0)  # w per row
    # c per row (padding rows carry 0, whatever their place in the micro-batch)
    c = _per_row(data[TOKEN_SCALE_KEY]).to(log_prob.dtype) if TOKEN_SCALE_KEY in data.keys() else torch.ones_like(weights)
    s = _per_row(data[SIM_WEIGHT_KEY]).to(log_prob.dtype) if SIM_WEIGHT_KEY in data.keys() else weights

    # Scalar metrics stay on the device until the end: one host transfer for all of them (a Metric made from a
    # tensor calls .item(), a device sync each).
    scalars: dict[str, tuple[torch.Tensor, AggregationType]] = {}

    # 1. bounded weighted NLL (the registered "popo" policy loss)
    if nll_norm == "sequence":
        nll, pg_metrics = popo_policy_loss_per_sequence(
            old_log_prob=tensors["old_log_probs"], log_prob=log_prob, row_weights=s, response_mask=response_mask,
            config=config, dp_size=dp_size,
        )
    else:
        nll, pg_metrics = compute_policy_loss_popo(
            old_log_prob=tensors["old_log_probs"],
            log_prob=log_prob,
            advantages=(weights * c).unsqueeze(-1) * response_mask,
            response_mask=response_mask,
            loss_agg_mode=config.loss_agg_mode,
            config=config,
        )
    scalars.update({k: (v, AggregationType.MEAN) for k, v in pg_metrics.items()})
    scalars["actor/pg_loss"] = (nll, aggregation)
    total = nll

    # 2. the anchor to the siamese: the similarity penalty (the paper) or, as an ablation, a k3 KL penalty
    pred = model_output.get(PRED_KEY, None)
    if anchor == "kl":
        if alpha > 0:
            kl = agg_loss(
                loss_mat=core.k3_kl(log_prob, tensors["ref_log_prob"].to(log_prob.dtype)) * c.unsqueeze(-1),
                loss_mask=response_mask & (weights > 0).unsqueeze(-1),
                loss_agg_mode=config.loss_agg_mode,
                **config.global_batch_info,
            )
            total = total + alpha * kl
            scalars["popo/kl_loss"] = (kl, aggregation)
            scalars["actor/kl_loss"] = (kl, aggregation)
    elif alpha > 0 and pred is not None and SIAMESE_KEY in tensors.keys():
        target = tensors[SIAMESE_KEY].to(pred.device, pred.dtype)
        if noise_std > 0:
            seed = noise_seed() if callable(noise_seed) else noise_seed
            with noise_timer.span(target.device) if noise_timer is not None else nullcontext():
                eps = core.feature_noise(row_keys(data).to(target.device), target.shape[-1], seed, target.dtype)
        else:
            eps = None
        cos = core.representation_cosine(pred, target, eps, noise_std)
        sim = -(s.to(cos.dtype) * cos).sum() * dp_size
        total = total + alpha * sim
        # dp-scaled like the loss: verl's SUM over micro-batches, mean over ranks gives the mini-batch's L_sim
        scalars["popo/sim_loss"] = (sim, aggregation)
        # the s-weighted mean cosine of the mini-batch, -L_sim: summed and dp-scaled like it, so that every micro-batch
        # reports one value (a micro-batch of padding rows, s = 0, adds 0) and verl's per-rank value counts agree
        scalars["popo/cos_sim"] = (-sim.detach(), aggregation)
    elif alpha > 0 and pred is None:
        raise RuntimeError("POPO loss: the engine returned no predictor output; is the POPO engine installed?")

    # 3. entropy bonus
    if beta > 0 and entropy is not None:
        ent_mask = response_mask if entropy_on == "all" else response_mask & (weights > 0).unsqueeze(-1)
        ent_scale = torch.ones_like(c) if entropy_on == "all" else c
        mean_entropy = agg_loss(
            loss_mat=entropy * ent_scale.unsqueeze(-1),
            loss_mask=ent_mask,
            loss_agg_mode=config.loss_agg_mode,
            **config.global_batch_info,
        )
        total = total - beta * mean_entropy
        scalars["popo/ent_loss"] = (-mean_entropy, aggregation)
        scalars["actor/entropy_loss"] = (mean_entropy, aggregation)
    scalars["popo/nll_loss"] = (nll, aggregation)
    # A micro-batch of padding rows only still joins the collectives: keep the graph connected.
    total = total + 0.0 * log_prob.sum()
    if pred is not None:
        total = total + 0.0 * pred.sum()
    return total, _metrics_on_host(scalars)


def _metrics_on_host(scalars: dict[str, tuple[torch.Tensor | float, AggregationType]]) -> dict[str, Metric]:
    """verl Metrics from device scalars, brought to the host in one transfer."""
    names = list(scalars)
    tensors = [scalars[k][0] for k in names]
    device_values = [t.detach().double().reshape(()) for t in tensors if isinstance(t, torch.Tensor)]
    host = iter(torch.stack(device_values).tolist() if device_values else [])
    values = [next(host) if isinstance(t, torch.Tensor) else float(t) for t in tensors]
    return {k: Metric(value=v, aggregation=scalars[k][1]) for k, v in zip(names, values, strict=True)}
