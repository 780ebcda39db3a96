"""POPO's loss over a whole batch as POPO.md writes it: the oracle that the verl loss (popo_verl/actor_loss.py, per
micro-batch, with verl's normalisation) and the registered policy loss (popo_verl/algos.py) are checked against.
Built from popo_verl.core's formulas; nothing trains with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from popo_verl import core

NLL_NORMS = ("token", "sequence")


def weighted_nll_loss(
    token_log_probs: torch.Tensor, weights: torch.Tensor, response_mask: torch.Tensor, norm: str = "token"
) -> torch.Tensor:
    """L_nll, the weighted NLL of the positives, in one of two normalisations:

        token:    sum_b w_b sum_t -log pi(y_bt) m_bt / max(sum_{b: w_b > 0} sum_t m_bt, 1)
        sequence: sum_b w_b [sum_t -log pi(y_bt) m_bt / max(sum_t m_bt, 1)] / max(sum_b w_b, 1e-8)

    `token` is global token normalisation over the positive responses, as verl does for GRPO (a long
    correct answer pulls in proportion to its length); `sequence` gives each response its weight alone,
    whatever its length (what the reference's 2-row micro-batches come close to).
    """
    if norm not in NLL_NORMS:
        raise ValueError(f"weighted_nll_loss: norm must be one of {NLL_NORMS}, got {norm!r}")
    mask = response_mask.to(token_log_probs.dtype)
    w = weights.detach().to(token_log_probs.dtype)
    per_row = -(token_log_probs * mask).sum(dim=-1)
    if norm == "sequence":
        per_row = per_row / mask.sum(dim=-1).clamp(min=1.0)
        return (w * per_row).sum() / w.sum().clamp(min=1e-8)
    n_tokens = (mask.sum(dim=-1) * (w > 0).to(mask.dtype)).sum().clamp(min=1.0)
    return (w * per_row).sum() / n_tokens



def similarity_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_sim = - sum_b w_b cos(h_phi(f_theta)_b, sg(f_xi_b + eps_b)) / max(sum_b w_b, 1e-8),  eps ~ N(0, sigma^2).

    Bounded in [-1, 1]; the target (the siamese side) never receives gradient.
    """
    if noise_std < 0:
        raise ValueError(f"similarity_loss: noise_std must be >= 0, got {noise_std}")
    eps = None
    if noise_std > 0:
        eps = torch.randn(target.shape, generator=generator, device=target.device, dtype=pred.dtype)
    w = weights.detach().to(pred.dtype)
    cos = core.representation_cosine(pred, target, eps, noise_std)
    return -(w * cos).sum() / w.sum().clamp(min=1e-8)


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_ent = - sum_bt H_bt m_bt / max(sum_bt m_bt, 1): minus the mean token entropy (an entropy bonus)."""
    m = mask.to(entropy.dtype)
    return -(entropy * m).sum() / m.sum().clamp(min=1.0)




@dataclass
class PopoLossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def popo_loss(
    token_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    entropy: torch.Tensor | None = None,
    pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    alpha: float = 0.1,
    beta: float = 0.01,
    noise_std: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    nll_norm: str = "token",
) -> PopoLossOutput:
    """L = L_nll + alpha * L_sim + beta * L_ent.

    L_sim is skipped (0) without pred/target, L_ent without entropy. `entropy_mask` picks the rows of
    the entropy bonus (default: the positives' response tokens; pass the full response mask for
    entropy_on=all), `nll_norm` the normalisation of L_nll. Returns the total and its parts as float metrics.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"popo_loss: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    zero = token_log_probs.sum() * 0.0  # keeps the graph connected when every part is empty
    l_nll = weighted_nll_loss(token_log_probs, weights, response_mask, norm=nll_norm)
    l_sim, cos_mean = zero, float("nan")
    if pred is not None and target is not None:
        l_sim = similarity_loss(pred, target, weights, noise_std=noise_std, generator=generator)
        with torch.no_grad():
            w = weights.detach().float()
            cos = F.cosine_similarity(pred.detach().float(), target.detach().float(), dim=-1)
            cos_mean = float((w * cos).sum() / w.sum().clamp(min=1e-8)) if w.sum() > 0 else float("nan")
    l_ent, ent_mean = zero, float("nan")
    if entropy is not None:
        if entropy_mask is None:
            entropy_mask = response_mask * (weights.detach() > 0).to(response_mask.dtype).unsqueeze(-1)
        l_ent = entropy_loss(entropy, entropy_mask)
        ent_mean = -float(l_ent.detach())
    total = l_nll + alpha * l_sim + beta * l_ent + zero
    metrics = {
        "popo/loss": float(total.detach()),
        "popo/nll_loss": float(l_nll.detach()),
        "popo/sim_loss": float(l_sim.detach()),
        "popo/cos_sim": cos_mean,
        "popo/ent_loss": float(l_ent.detach()),
        "popo/entropy": ent_mean,
    }
    return PopoLossOutput(total, metrics)
