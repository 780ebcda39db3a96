"""POPO's math, one function per formula (Xu & Fang, arXiv 2605.06650).

Pure torch: nothing here imports verl, so this file reads next to the paper.

    L = L_nll + alpha * L_sim + beta * L_ent

Notation: B rows (responses), T response tokens, D hidden size.
S+(x) is the positive set of prompt x (`positive_mask`): with binary rewards the responses the verifier
scored correct (r = 1), with graded ones those whose reward exceeds tau_r.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# the modes each formula takes are the config's choices (defined once, torch-free, for the config check)
from popo_verl.config import REWARD_MODES, WEIGHT_MODES

CORRECT_SCORE, INCORRECT_SCORE = 1.0, 0.0


class NonBinaryRewardError(ValueError):
    """reward_mode='binary' met rewards other than CORRECT_SCORE / INCORRECT_SCORE; `values` holds them (distinct)."""

    def __init__(self, values: list[float], n_rows: int, n_total: int):
        self.values, self.n_rows, self.n_total = values, n_rows, n_total
        super().__init__(
            f"positive_mask: reward_mode='binary' takes rewards in {{{INCORRECT_SCORE:g}, {CORRECT_SCORE:g}}} only; "
            f"{n_rows} of {n_total} rewards are not, e.g. {values[:5]}"
        )


def positive_mask(rewards: torch.Tensor, tau_r: float | None = None, reward_mode: str = "binary") -> torch.Tensor:
    """Positive set membership -> bool[B]:

        binary:             1[r(y) = 1]      (every r must be 0 or 1, else NonBinaryRewardError)
        threshold, graded:  1[r(y) > tau_r]  (tau_r None = 0.0)

    Binary is the default because a threshold silently turns partial credit into "correct": with tau_r = 0
    a reward of 0.5 for a wrong answer would be trained on as if it were right. tau_r is refused there (it
    would mean nothing, and a caller who passes it has a threshold in mind).
    """
    if reward_mode not in REWARD_MODES:
        raise ValueError(f"positive_mask: unknown reward_mode {reward_mode!r}; expected one of {REWARD_MODES}")
    rewards = torch.as_tensor(rewards)
    if not torch.isfinite(rewards).all():
        raise ValueError("positive_mask: rewards contain NaN or inf; a verifier must return finite scores")
    if reward_mode != "binary":
        return rewards > (0.0 if tau_r is None else tau_r)
    if tau_r is not None:
        raise ValueError(f"positive_mask: tau_r={tau_r} is a threshold; reward_mode='binary' takes none")
    # exact comparison: verl puts the outcome reward on one token and zeros elsewhere, so sums are exact
    off = (rewards != CORRECT_SCORE) & (rewards != INCORRECT_SCORE)
    if off.any():
        raise NonBinaryRewardError(sorted(set(rewards[off].tolist())), int(off.sum()), rewards.numel())
    return rewards == CORRECT_SCORE


def sequence_log_probs(
    token_log_probs: torch.Tensor, response_mask: torch.Tensor, length_normalize: bool = True
) -> torch.Tensor:
    """Sequence log-prob:  log pi(y|x) = sum_t m_t log pi(y_t|.)   [/ max(sum_t m_t, 1)]  -> [B]."""
    mask = response_mask.to(token_log_probs.dtype)
    total = (token_log_probs * mask).sum(dim=-1)
    if length_normalize:
        total = total / mask.sum(dim=-1).clamp(min=1.0)
    return total


def group_ids(group_index: Sequence[Hashable] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map B hashable group ids (e.g. verl's uid strings) to dense int64 ids 0..G-1."""
    if isinstance(group_index, torch.Tensor):
        return torch.unique(group_index.flatten(), return_inverse=True)[1].long()
    arr = np.asarray(group_index, dtype=object).reshape(-1)
    # np.unique on object arrays needs comparable items; a dict keeps any hashable and is O(B).
    lookup: dict = {}
    dense = np.fromiter((lookup.setdefault(g, len(lookup)) for g in arr), dtype=np.int64, count=len(arr))
    return torch.from_numpy(dense)


def popo_weights(
    seq_log_probs: torch.Tensor,
    positive: torch.Tensor,
    group_index: Sequence[Hashable] | np.ndarray | torch.Tensor,
    temperature: float = 1.0,
    mode: str = "softmax",
) -> torch.Tensor:
    """Self-normalised weights over each group's positive set (the bounded importance sampling).

        softmax:  w(y|x) = exp(s(y)/T) / sum_{y' in S+(x)} exp(s(y')/T)   for y in S+(x)
        uniform:  w(y|x) = 1 / |S+(x)|                                    for y in S+(x)
                  w(y|x) = 0                                              otherwise

    s = sequence log-prob under the policy that generated the batch. Each group with a positive sums
    to 1; groups without one get 0. Returned detached: the weights are constants in the loss.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"popo_weights: unknown mode {mode!r}; expected one of {WEIGHT_MODES}")
    if not temperature > 0:
        raise ValueError(f"popo_weights: temperature must be > 0, got {temperature}")
    s = seq_log_probs.detach().reshape(-1).double()
    pos = torch.as_tensor(positive, device=s.device).reshape(-1).bool()
    gid = group_ids(group_index).to(s.device)
    if not (s.numel() == pos.numel() == gid.numel()):
        raise ValueError(
            f"popo_weights: sizes differ: seq_log_probs {s.numel()}, positive {pos.numel()}, group_index {gid.numel()}"
        )
    if not torch.isfinite(s[pos]).all():
        raise ValueError("popo_weights: a positive response has a non-finite sequence log-prob")
    n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    if mode == "uniform":
        logits = torch.zeros_like(s)
    else:
        logits = s / temperature
    logits = torch.where(pos, logits, torch.full_like(logits, -math.inf))
    # Segment softmax: subtract each group's max over positives, exponentiate, divide by the group sum.
    group_max = torch.full((n_groups,), -math.inf, dtype=s.dtype, device=s.device)
    group_max = group_max.scatter_reduce(0, gid, logits, reduce="amax", include_self=True)
    shift = torch.where(pos, logits - group_max[gid], torch.full_like(logits, -math.inf))
    unnorm = torch.exp(shift)  # exactly 0 on negatives
    group_sum = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, gid, unnorm)
    denom = group_sum[gid]
    w = torch.where(denom > 0, unnorm / denom.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(unnorm))
    return w.to(seq_log_probs.dtype if seq_log_probs.is_floating_point() else torch.float32)


def _renormalised_per_group(scaled: torch.Tensor, group_index) -> torch.Tensor:
    """scaled(y) / sum_{y' in group(y)} scaled(y'), 0 where a group sums to 0 (float64 in, float64 out)."""
    gid = group_ids(group_index).to(scaled.device)
    n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    sums = torch.zeros(n_groups, dtype=scaled.dtype, device=scaled.device).index_add_(0, gid, scaled)
    denom = sums[gid]
    return torch.where(denom > 0, scaled / denom.clamp(min=torch.finfo(scaled.dtype).tiny), torch.zeros_like(scaled))


def length_normalized_weights(
    weights: torch.Tensor, lengths: torch.Tensor, group_index: Sequence[Hashable] | np.ndarray | torch.Tensor
) -> torch.Tensor:
    """Optional length correction:  w'(y) = (w(y) / |y|) / sum_{y' in S+(x)} w(y') / |y'|  (groups still sum to 1)."""
    scaled = weights.detach().double().reshape(-1) / lengths.detach().double().reshape(-1).clamp(min=1.0)
    return _renormalised_per_group(scaled, group_index).to(weights.dtype)


def normalised_reward(
    rewards: torch.Tensor, positive: torch.Tensor, group_index: Sequence[Hashable] | np.ndarray | torch.Tensor,
    tau_r: float = 0.0,
) -> torch.Tensor:
    """The normalised reward of reward_mode=graded, in (0, 1] on S+(x), 0 elsewhere:

        r~(y) = (r(y) - tau_r) / (max_{y' in S+(x)} r(y') - tau_r)      for y in S+(x)  (so r(y) > tau_r)

    The excess over the threshold, not r itself: a response's weight then goes to 0 as its reward comes
    down to tau_r (no jump at the edge of S+, where a reward's noise decides membership), and stays
    positive for any tau_r, negative ones included (the policy loss takes weights >= 0). The division by
    the group's best makes r~ a share of what the group achieved (its best positive has r~ = 1); it cancels
    in `graded_weights`, so the weights do not depend on the verifier's scale.
    """
    r = torch.as_tensor(rewards).detach().double().reshape(-1)
    pos = torch.as_tensor(positive, device=r.device).reshape(-1).bool()
    if pos.numel() != r.numel():
        raise ValueError(f"normalised_reward: sizes differ: rewards {r.numel()}, positive {pos.numel()}")
    excess = torch.where(pos, r - tau_r, torch.zeros_like(r))
    if not (excess[pos] > 0).all():
        raise ValueError(f"normalised_reward: a positive has a reward <= tau_r={tau_r}; positives are r > tau_r")
    gid = group_ids(group_index).to(r.device)
    n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    best = torch.zeros(n_groups, dtype=r.dtype, device=r.device).scatter_reduce(0, gid, excess, reduce="amax")
    return torch.where(pos, excess / best[gid].clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(r))


def graded_weights(
    weights: torch.Tensor, normalised_rewards: torch.Tensor, group_index: Sequence[Hashable] | np.ndarray | torch.Tensor
) -> torch.Tensor:
    """reward_mode=graded: the POPO weights scaled by the normalised reward, renormalised over each S+(x):

        w_g(y|x) = w(y|x) r~(y) / sum_{y' in S+(x)} w(y'|x) r~(y')

    With the softmax weights, w_g(y|x) = exp(s(y)/T) r~(y) / sum_{y' in S+(x)} exp(s(y')/T) r~(y'): a
    softmax of s/T + log r~. Each group with a positive still sums to 1 (so w_g is bounded in [0, 1], as in
    POPO); the paper leaves graded rewards open, and this is the smallest change that makes partial credit
    pull in proportion to its credit. With binary rewards r~ = 1 on S+ and w_g = w.
    """
    scaled = weights.detach().double().reshape(-1) * normalised_rewards.detach().double().reshape(-1)
    return _renormalised_per_group(scaled, group_index).to(weights.dtype)


# ----------------------------------------------------------------------------- baselines (not POPO: issue #36)
SAMPLE_REINFORCEMENT_MODES = ("psr", "nsr", "w_reinforce")


def sample_reinforcement_advantages(positive: torch.Tensor, mode: str, positive_weight: float = 0.1) -> torch.Tensor:
    """Per-row advantages of Zhu et al.'s decomposition of RLVR (arXiv 2506.01347, Sec. 3-5): REINFORCE with reward
    +1 on correct and -1 on wrong responses and no baseline, split by the reward's sign:

        PSR (positive sample reinforcement):  A(y) = +1 on y in S+(x), 0 elsewhere
                                              L_PSR = -E[ sum_{y in S+} log pi(y|x) ]
        NSR (negative sample reinforcement):  A(y) = -1 on y not in S+(x), 0 elsewhere
                                              L_NSR = +E[ sum_{y not in S+} log pi(y|x) ]
        W-REINFORCE:                          A(y) = lambda on S+(x), -1 elsewhere
                                              L = lambda L_PSR + L_NSR   (lambda = 0.1 in the paper)

    PSR is POPO without its weights, siamese and entropy: plain NLL on the positives (RAFT-like).
    """
    if mode not in SAMPLE_REINFORCEMENT_MODES:
        raise ValueError(f"sample_reinforcement_advantages: unknown mode {mode!r}; expected one of {SAMPLE_REINFORCEMENT_MODES}")
    positive = torch.as_tensor(positive).bool()
    on_positive = {"psr": 1.0, "nsr": 0.0, "w_reinforce": float(positive_weight)}[mode]
    on_negative = 0.0 if mode == "psr" else -1.0
    return torch.where(positive, on_positive, on_negative).to(torch.float32)


def clipped_nll(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_high: float):
    """L_nll's per-token term with PPO's upper clip of the importance ratio r = pi_theta / pi_old:

        value -log pi_theta(y_t),   gradient -g(r) grad log pi_theta(y_t),   g(r) = r if r <= 1 + eps_high, else 0

    At r = 1 (the first optimizer step on a rollout batch) the gradient is the plain NLL's; a positive already
    pushed past 1 + eps_high stops pulling, as PPO's clipped surrogate does with a positive advantage.
    Returns (per-token loss, log-ratio, ratio).
    """
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, max=1.0 + clip_high)  # d clipped / d log pi = r below the clip, 0 above
    return -(clipped - clipped.detach() + log_prob.detach()), log_ratio, ratio


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f(x, y) = sum_t m_t h_t / max(sum_t m_t, 1): mean of the hidden states over response tokens -> [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=-2) / m.sum(dim=-2).clamp(min=1.0)


def representation_cosine(pred: torch.Tensor, target: torch.Tensor, noise: torch.Tensor | None = None,
                          noise_std: float = 0.0) -> torch.Tensor:
    """cos(h_phi(f_theta), sg(f_xi + eps)) per row, eps = noise_std * noise: L_sim's term (L_sim = -sum_y w(y) cos / sum_y w(y)).

    The target (the siamese side) never receives gradient.
    """
    target = target.detach().to(pred.dtype)
    if noise is not None and noise_std > 0:
        target = target + noise_std * noise.to(target.dtype)
    return F.cosine_similarity(pred, target, dim=-1)


_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / phi)


def _int64(u: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits: torch's >> is arithmetic."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors, wrapping like uint64 (Steele et al., 2014):

        z <- (z ^ z >> 30) * 0xBF58476D1CE4E5B9;  z <- (z ^ z >> 27) * 0x94D049BB133111EB;  z ^ z >> 31
    """
    z = (z ^ _shift_right(z, 30)) * _int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _int64(0x94D049BB133111EB)
    return z ^ _shift_right(z, 31)


def row_hash(token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """A 64-bit key per row of packed token ids (rows back to back, row b = ids[offsets[b]:offsets[b+1]]) -> int64[B]:

        key_b = sum_j mix64(mix64(id_j + gamma) + j * gamma)   (mod 2^64, j the position in the row)

    Computed where the ids are (no copy to the host): the key of a row's feature noise.
    """
    ids = token_ids.reshape(-1).long()
    offsets = offsets.to(ids.device).long()
    n_rows = offsets.numel() - 1
    lengths = offsets.diff()
    row = torch.repeat_interleave(torch.arange(n_rows, device=ids.device), lengths, output_size=ids.numel())
    position = torch.arange(ids.numel(), device=ids.device) - offsets[:-1][row]
    gamma = _int64(_GOLDEN_GAMMA)
    per_token = mix64(mix64(ids + gamma) + position * gamma)
    return torch.zeros(n_rows, dtype=torch.int64, device=ids.device).index_add_(0, row, per_token)


def feature_noise(row_keys: Sequence[int] | torch.Tensor, dim: int, seed: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """eps_b ~ N(0, I_dim), a counter-based draw from (seed, key_b) for each row b -> [B, dim]:

        u_bi = (mix64(base_b + (i + 1) * gamma) >> 11 + 1/2) / 2^53,  base_b = mix64(key_b ^ mix64(seed + gamma))
        eps_bj = sqrt(-2 log u_b,2j) * cos(2 pi u_b,2j+1)                            (Box-Muller)

    Keyed by row (e.g. `row_hash` of its tokens), not by position: the same row gets the same noise whatever
    its place in the micro-batch, the number of ranks, or whether the run was resumed. One batched draw on
    the keys' device (SplitMix64 streams), no generator per row.
    """
    keys = torch.as_tensor(row_keys, dtype=torch.int64, device=device)
    gamma = _int64(_GOLDEN_GAMMA)
    seed_mix = mix64(torch.tensor(int(seed) % (1 << 63), dtype=torch.int64, device=keys.device) + gamma)
    base = mix64(keys ^ seed_mix)
    counters = torch.arange(1, 2 * dim + 1, dtype=torch.int64, device=keys.device) * gamma
    bits = _shift_right(mix64(base.unsqueeze(-1) + counters), 11)  # top 53 bits
    u = (bits.double() + 0.5) * 2.0**-53  # in (0, 1): log never sees 0
    eps = torch.sqrt(-2.0 * torch.log(u[:, 0::2])) * torch.cos(2.0 * math.pi * u[:, 1::2])
    return eps.to(dtype)


def k3_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on samples from pi (Schulman):

        k3 = exp(d) - d - 1,  d = log pi_ref(y_t) - log pi(y_t)     (>= 0, unbiased; d clamped to +-clamp)

    The `anchor=kl` ablation's penalty against the siamese, and the KL(policy || siamese) monitor.
    """
    d = (ref_log_prob - log_prob).clamp(min=-clamp, max=clamp)
    return torch.exp(d) - d - 1.0


def log_prob_change(new_token_log_probs: torch.Tensor, old_token_log_probs: torch.Tensor, response_mask: torch.Tensor,
                    rows: torch.Tensor) -> float:
    """Mean change of the length-normalised sequence log-prob over the selected rows (Theorem 3.1 made visible):

        Delta = mean_{y in rows} [ s_new(y) - s_old(y) ],  s(y) = sum_t m_t log pi(y_t|.) / sum_t m_t

    With `rows` = the negatives of a step and new = the policy after the step's update, Theorem 3.1 says
    Delta < 0 although no negative was in the update. NaN when no row is selected.
    """
    rows = torch.as_tensor(rows, dtype=torch.bool).reshape(-1)
    if not rows.any():
        return float("nan")
    new = sequence_log_probs(new_token_log_probs.double(), response_mask, length_normalize=True)
    old = sequence_log_probs(old_token_log_probs.double(), response_mask, length_normalize=True)
    return float((new - old)[rows].mean())


@torch.no_grad()
def ema_update_(target_params: Iterable[torch.Tensor], online_params: Iterable[torch.Tensor], tau: float) -> None:
    """Siamese update, in place:  xi <- tau * xi + (1 - tau) * theta.

    Computed in the target's dtype (keep the siamese in fp32: a bf16 anchor freezes under small steps).
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"ema_update_: tau must lie in [0, 1], got {tau}")
    targets, onlines = list(target_params), list(online_params)
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update_: {len(targets)} target tensors vs {len(onlines)} online tensors")
    for i, (xi, theta) in enumerate(zip(targets, onlines, strict=True)):
        if xi.shape != theta.shape:
            raise ValueError(f"ema_update_: shape mismatch at tensor {i}: {tuple(xi.shape)} vs {tuple(theta.shape)}")
    # lerp: xi + (1 - tau) * (theta - xi) == tau * xi + (1 - tau) * theta, in xi's precision; one fused launch per
    # bucket of tensors (torch._foreach_lerp_) instead of one per tensor. Online tensors of another dtype or device are
    # cast a bucket at a time, so the temporary copies stay small next to the model.
    bucket: list[tuple[torch.Tensor, torch.Tensor]] = []
    for xi, theta in zip(targets, onlines, strict=True):
        bucket.append((xi, theta))
        if len(bucket) == _EMA_BUCKET:
            _lerp_bucket_(bucket, 1.0 - tau)
            bucket = []
    if bucket:
        _lerp_bucket_(bucket, 1.0 - tau)


_EMA_BUCKET = 64


def _lerp_bucket_(pairs: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> None:
    xis = [xi for xi, _ in pairs]
    thetas = [theta if (theta.dtype, theta.device) == (xi.dtype, xi.device) else theta.to(device=xi.device, dtype=xi.dtype)
              for xi, theta in pairs]
    torch._foreach_lerp_(xis, thetas, weight)


def drift_bound(tau: float, lr: float, max_update_norm: float) -> float:
    """Lemma 3.2:  ||theta_t - xi_t|| <= tau * eta * G_max / (1 - tau)   (inf for tau = 1)."""
    if not 0.0 <= tau <= 1.0 or lr < 0 or max_update_norm < 0:
        raise ValueError(f"drift_bound: need tau in [0, 1], lr >= 0, G >= 0; got {tau}, {lr}, {max_update_norm}")
    if tau >= 1.0:
        return math.inf
    return tau * lr * max_update_norm / (1.0 - tau)


@torch.no_grad()
def parameter_distance_sq(targets: Iterable[torch.Tensor], onlines: Iterable[torch.Tensor]) -> torch.Tensor:
    """||theta - xi||^2 = sum_k ||theta_k - xi_k||^2 over a list of (local) tensors, a float64 scalar on the online
    weights' device (sum it over ranks for the global drift). One per-tensor difference at a time, so no copy of the
    model, and no host transfer (a siamese kept on the host comes to the device a tensor at a time)."""
    norms = [torch.linalg.vector_norm(theta.float() - xi.to(device=theta.device, dtype=torch.float32, non_blocking=True))
             for xi, theta in zip(targets, onlines, strict=True)]
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(norms).double().pow(2).sum()


class PredictorHead(nn.Module):
    """h_phi: [Linear -> LayerNorm -> ReLU] x (num_layers - 1) -> Linear (BYOL-style, policy side only).

    Xavier-uniform weights, zero biases. Keep it in fp32. num_layers = 0 is the identity, h_phi(f) = f
    (the "no predictor" ablation: the cosine then compares the policy's and the siamese's states directly).
    """

    def __init__(self, input_dim: int, hidden_dim: int = 1024, num_layers: int = 2, output_dim: int | None = None):
        super().__init__()
        if num_layers != 0 and num_layers < 2:
            raise ValueError(f"PredictorHead: num_layers must be 0 (identity) or >= 2, got {num_layers}")
        if input_dim < 1 or hidden_dim < 1:
            raise ValueError(f"PredictorHead: dims must be positive, got input {input_dim}, hidden {hidden_dim}")
        output_dim = input_dim if output_dim is None else output_dim
        if num_layers == 0:
            if output_dim != input_dim:
                raise ValueError("PredictorHead: the identity head (num_layers=0) needs output_dim == input_dim")
            self.net = nn.Identity()
            return
        layers: list[nn.Module] = []
        d = input_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU()]
            d = hidden_dim
        layers.append(nn.Linear(d, output_dim))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def weight_entropy(weights: torch.Tensor, group_index) -> float:
    """Mean over groups with a positive of H(w) = -sum_y w(y) log w(y) (0 = one positive dominates)."""
    w = weights.detach().double().reshape(-1)
    gid = group_ids(group_index).to(w.device)
    n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    if n_groups == 0:
        return 0.0
    plogp = torch.where(w > 0, -w * torch.log(w.clamp(min=1e-300)), torch.zeros_like(w))
    h = torch.zeros(n_groups, dtype=w.dtype, device=w.device).index_add_(0, gid, plogp)
    has_pos = torch.zeros(n_groups, dtype=w.dtype, device=w.device).index_add_(0, gid, w) > 0
    return float(h[has_pos].mean()) if has_pos.any() else 0.0
