"""Per-row scalars on verl's per-token response layout, and back.

verl moves per-token fields (advantages, log-probs) between its trainer and workers as nested
(jagged) response tensors; POPO's per-row quantities (the weight w, the similarity weight s, the
token scale c) travel the same way, one constant per row. The trainer writes them with
`row_to_tokens`; the loss and the trainer read them back with `tokens_to_row`.
"""

from __future__ import annotations

import torch

from verl.workers.utils.padding import response_to_nested


def padded(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A nested (jagged) tensor as a padded [B, T] one; a dense tensor as it is."""
    return t.to_padded_tensor(fill) if getattr(t, "is_nested", False) else t


def row_to_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] -> the response layout of `response_mask` (nested like it), value b on every token of row b."""
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
