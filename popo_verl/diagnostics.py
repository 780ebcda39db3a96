"""POPO's two diagnostics, each an extra forward on a schedule (monitoring only: neither changes training).

- `popo/kl_policy_siamese` every `kl_monitor_interval` steps: k3 KL(policy || siamese) over all the step's rows.
- `popo/{pos,neg}_logprob_delta` every `implicit_negative_interval` steps: Theorem 3.1's implicit push-down of
  the negatives, made visible.
A mixin of POPO's trainer (popo_verl/trainer.py), which gives it the worker group, the config, the step and the
step's positives.
"""

from __future__ import annotations

import time

import torch
import transfer_queue as tq
from transfer_queue import KVBatchMeta

from verl.workers.utils.padding import response_from_nested

from popo_verl import core
from popo_verl.protocol import padded


class PopoDiagnostics:
    def _due(self, interval) -> bool:
        """Whether a diagnostic run every `interval` steps (0 = off) runs at this step."""
        every = int(interval)
        return every > 0 and self.global_steps % every == 0

    def _maybe_kl_monitor(self, batch: KVBatchMeta, real: torch.Tensor, metrics: dict) -> None:
        """Every `kl_monitor_interval` steps: KL(policy || siamese), k3 over the response tokens of all the step's
        rows (the reference's estimator and rows; an extra siamese forward on the whole batch). Monitoring only."""
        if not self._due(self.popo.kl_monitor_interval) or not bool(real.any()):
            return
        started = time.perf_counter()  # a blocking call: the driver's clock is the truth here
        ref_lp, _ = self._siamese_forward(batch, with_log_probs=True)
        d = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["old_log_probs", "response_mask"])
        mask = padded(d["response_mask"], 0).float() * real.float().unsqueeze(-1)
        old, ref = padded(d["old_log_probs"]).float(), padded(ref_lp).float()
        width = min(old.shape[1], ref.shape[1], mask.shape[1])
        k3 = core.k3_kl(old[:, :width], ref[:, :width]) * mask[:, :width]
        metrics["popo/kl_policy_siamese"] = float(k3.sum() / mask[:, :width].sum().clamp(min=1.0))
        metrics["timing_s/popo_kl_monitor"] = time.perf_counter() - started

    def _maybe_log_prob_deltas(self, batch: KVBatchMeta, metrics: dict) -> None:
        """Theorem 3.1 made visible: how the step's update moved the log-probs of its negatives and positives.

        One extra forward of the updated policy over the step's rows (every `implicit_negative_interval`
        steps) gives popo/neg_logprob_delta and popo/pos_logprob_delta: the mean change of the length-normalised
        sequence log-prob against old_log_probs (the same policy before the update). With positives_only_update
        the negatives never entered the update, so a negative delta is the implicit push-down alone.
        """
        if not self._due(self.popo.implicit_negative_interval):
            return
        started = time.perf_counter()
        saved = dict(batch.extra_info)
        batch.extra_info.update(
            {"calculate_entropy": False, "compute_loss": False, "temperature": self.config.actor_rollout_ref.rollout.temperature}
        )
        try:
            self.actor_rollout_wg.compute_log_prob(batch)
        finally:
            batch.extra_info = saved
        d = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                            select_fields=["log_probs", "old_log_probs", "response_mask"])
        mask_nested = d["response_mask"]
        new = padded(response_from_nested(d["log_probs"], mask_nested))
        old = padded(d["old_log_probs"])
        mask = padded(mask_nested, 0).float()
        width = min(new.shape[1], old.shape[1], mask.shape[1])
        new, old, mask = new[:, :width].float(), old[:, :width].float(), mask[:, :width]
        positive, real = self._popo_positive, self._popo_real
        metrics["popo/pos_logprob_delta"] = core.log_prob_change(new, old, mask, positive)
        metrics["popo/neg_logprob_delta"] = core.log_prob_change(new, old, mask, real & ~positive)
        metrics["timing_s/popo_logprob_deltas"] = time.perf_counter() - started
