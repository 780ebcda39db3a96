"""Which rows POPO's actor update sees, and how they are laid out for verl.

The positives: `positive_and_real` is the one definition of a positive (core.positive_mask under
algorithm.popo.reward_mode, on a real row: not one of the padding rows verl adds). Their layout: verl splits an
update batch into dp contiguous chunks, each into mini-batches (one optimizer step each), each into micro-batches
of a fixed size; `positive_layout` sizes those for the step's positives and `spread_padding_order` places the
padding rows that fill them so that no mini-batch is padding alone. The rows travel as a TransferQueue
`KVBatchMeta` (keys and tags of rows held by TransferQueue): `select` takes rows of one, `padding_keys` names the
padding rows the driver must clear, `update_fields` lists what the workers read.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transfer_queue import KVBatchMeta

from popo_verl import core
from popo_verl.protocol import SIAMESE_KEY, padded

#: step-batch fields the actor update never reads: verl's step metrics (returns, scores) and the driver's phases
DRIVER_ONLY_FIELDS = frozenset({"returns", "rm_scores", "token_level_scores", "token_level_rewards"})


def is_padding(tag: dict) -> bool:
    return bool(tag.get("is_padding", False))


def select(batch: KVBatchMeta, rows) -> KVBatchMeta:
    """The rows `rows` of a TransferQueue batch, in that order (same fields and extra info)."""
    return KVBatchMeta(
        partition_id=batch.partition_id,
        keys=[batch.keys[i] for i in rows],
        tags=[batch.tags[i] for i in rows],
        fields=batch.fields,
        extra_info=dict(batch.extra_info),
    )


def padding_keys(batch: KVBatchMeta) -> list:
    return [k for k, t in zip(batch.keys, batch.tags, strict=True) if is_padding(t)]


def as_object_array(values) -> np.ndarray:
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return np.array(list(values), dtype=object)


def non_binary_message(e: core.NonBinaryRewardError, n_real: int, step: int) -> str:
    p = "algorithm.popo."
    shown = ", ".join(f"{v:g}" for v in e.values[:5]) + (", ..." if len(e.values) > 5 else "")
    return (
        f"POPO step {step}: {e.n_rows} of {n_real} rewards are outside {{0, 1}} ({shown}), but "
        f"{p}reward_mode=binary (the default) counts a response as positive only when its reward is 1, the "
        f"verifier's 'correct'. For graded rewards set {p}reward_mode=threshold with {p}tau_r=<x> (positive iff "
        f"reward > x), or {p}reward_mode=graded (positive iff reward > tau_r, default 0; weights scaled by the "
        f"normalised reward)"
    )


def positive_and_real(scores, tags, popo, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positive, real, rewards) of the step's rows, padding rows at reward 0 (verl fills them from a template row:
    neither a positive nor a reward the binary check should see). `popo`: the PopoConfig."""
    real = torch.tensor([not is_padding(t) for t in tags], dtype=torch.bool)
    rewards = torch.where(real, padded(scores).sum(dim=-1).float(), 0.0)
    try:
        positive = core.positive_mask(rewards, popo.reward_threshold, popo.reward_mode)
    except core.NonBinaryRewardError as e:
        # `from None`: the message is the whole story; a chained core traceback would push it up the console
        raise ValueError(non_binary_message(e, int(real.sum()), step)) from None
    return positive & real, real, rewards


def positive_layout(n_pos: int, dp: int, n_optimizer_steps: int, actor) -> tuple[int, int, int | None]:
    """(mini-batches, rows per rank and mini-batch, micro-batch size) for an update on n_pos positives.

    As many optimizer steps as verl's GRPO would take (`n_optimizer_steps`: train_batch_size / ppo_mini_batch_size),
    fewer if there are too few positives; padding rows (zero loss mask, a few tokens) fill each cell up to a
    multiple of the micro-batch size, which verl's fixed-size micro-batching needs. `actor`: actor_rollout_ref.actor.
    """
    n_mini = max(1, min(n_optimizer_steps, n_pos // dp))
    rows = math.ceil(n_pos / (dp * n_mini))
    if actor.use_dynamic_bsz:
        return n_mini, rows, None
    micro_cfg = int(actor.ppo_micro_batch_size_per_gpu)
    if rows <= micro_cfg:
        return n_mini, rows, rows
    return n_mini, math.ceil(rows / micro_cfg) * micro_cfg, micro_cfg


def spread_padding_order(n_real: int, n_total: int, dp: int, n_mini: int) -> list[int]:
    """Order rows so every (dp rank, mini-batch) cell holds real rows before padding.

    verl splits the update batch into `dp` contiguous chunks, then each chunk into `n_mini` contiguous
    mini-batches. Returns, for each slot of that layout, the index of the row to put there (rows
    0..n_real-1 are real, the rest padding), so that no mini-batch is made of padding alone.
    """
    per_rank = n_total // dp
    per_cell = per_rank // n_mini
    order = [-1] * n_total
    nxt_real, nxt_pad = 0, n_real
    for i in range(per_cell):
        for j in range(n_mini):
            for r in range(dp):
                slot = r * per_rank + j * per_cell + i
                if nxt_real < n_real:
                    order[slot], nxt_real = nxt_real, nxt_real + 1
                else:
                    order[slot], nxt_pad = nxt_pad, nxt_pad + 1
    return order


def update_fields(fields, anchor: str) -> list[str]:
    """What the actor update reads: the step batch's fields less those only the driver's metrics use, plus the
    siamese's outputs. Every field listed travels driver -> workers for every row of the update."""
    siamese = {SIAMESE_KEY, "ref_log_prob"} if anchor == "kl" else {SIAMESE_KEY}
    return sorted((set(fields or []) - DRIVER_ONLY_FIELDS) | siamese)
