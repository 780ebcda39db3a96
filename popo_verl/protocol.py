"""What travels between POPO's trainer, workers and engines: the batch keys, the per-row layout, the head's name.

verl moves per-token fields (advantages, log-probs) between its trainer and workers as nested (jagged) response
tensors; POPO's per-row quantities (the weight w, the similarity weight s, the token scale c) travel the same
way, one constant per row: the trainer writes them with `row_to_tokens`, the loss reads them back with
`tokens_to_row`. The predictor head lives in the actor's module under `PREDICTOR_ATTR`: every weight export
(rollout sync, HF export, merged checkpoints) leaves out the names `is_predictor_param` matches.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------- the predictor head's name
PREDICTOR_ATTR = "popo_predictor"
PREDICTOR_PREFIX = PREDICTOR_ATTR + "."

# ---------------------------------------------------------------- engine outputs (joined to verl's model_output)
#: the pooled final-norm states f(x, y), (B, H) fp32
POOLED_KEY = "popo_pooled"
#: the predictor head's output h_phi(f_theta), (B, H) fp32 (trainable engine only)
PRED_KEY = "popo_pred"

# ---------------------------------------------------------------- update-batch fields and flags
#: the siamese's pooled states f_xi of each row, the similarity target
SIAMESE_KEY = "popo_siamese"
#: s: w rescaled so that each mini-batch's sum is 1 (per row)
SIM_WEIGHT_KEY = "popo_sim_weight"
#: c: all tokens / positive tokens of the update batch (per row; 0 on padding rows)
TOKEN_SCALE_KEY = "popo_token_scale"
#: non-tensor flag of a forward-only batch: compute the pooled states only (no LM-head log-probs)
POOLED_ONLY_KEY = "popo_pooled_only"
#: update batch (extra_info): whether the step's stats that the update returns include the drift (drift_interval)
WITH_DRIFT_KEY = "popo_with_drift"


def is_predictor_param(name: str) -> bool:
    """Whether a parameter name (of the model, or of a wrapper around it) is the predictor head's."""
    return name.startswith(PREDICTOR_PREFIX) or f".{PREDICTOR_PREFIX}" in name


def padded(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A nested (jagged) tensor as a padded [B, T] one; a dense tensor as it is."""
    return t.to_padded_tensor(fill) if getattr(t, "is_nested", False) else t


def row_to_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] -> the response layout of `response_mask` (nested like it), value b on every token of row b."""
    from verl.workers.utils.padding import response_to_nested  # here: the head's name needs no verl import

    mask = padded(response_mask, 0).float()
    dense = values.reshape(-1, 1).to(torch.float32) * torch.ones_like(mask)
    return response_to_nested(dense, response_mask) if getattr(response_mask, "is_nested", False) else dense


def tokens_to_row(t: torch.Tensor) -> torch.Tensor:
    """The response layout -> [B]: each row's value, read from its first token (rows are constant; 0 for an empty row).

    A nested tensor is read at its offsets, without padding it (padding needs the longest row: a device sync)."""
    if getattr(t, "is_nested", False) and t.lengths() is None:
        values, offsets = t.values(), t.offsets()
        starts, lengths = offsets[:-1], offsets.diff()
        first = values[starts.clamp(max=max(values.shape[0] - 1, 0))] if values.shape[0] else values.new_zeros(starts.shape)
        return torch.where(lengths > 0, first, torch.zeros_like(first))
    dense = padded(t, 0.0)
    if dense.dim() == 1:
        return dense
    return dense[:, 0] if dense.shape[1] else dense.new_zeros(dense.shape[0])
