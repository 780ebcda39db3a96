"""POPO trainer: verl 0.9.1's v1 sync trainer with POPO's weights, siamese and positives-only update.

Subclass of `PPOTrainerSync` (verl/trainer/ppo/v1/trainer_sync.py, base in trainer_base.py), registered
as trainer mode "popo", which `algorithm=popo` selects (trainer.v1.trainer_mode). Per step:
  gen -> rewards -> old_log_prob (verl) -> siamese forward on the positives ("ref" phase) ->
  POPO weights per uid from the old log-probs ("adv") -> actor update on the positives ->
  EMA of the siamese after every optimizer step (inside the worker) -> the update batch's padding rows
  cleared from TransferQueue. A step without positives skips the update but still steps the LR schedule.
Overrides (each mirrors the verl method of the same name): `_init_resource_pool_mgr` (POPO's worker),
`_compute_ref_log_prob`, `_compute_advantage`, `_update_actor`. tests/test_e2e_cpu.py pins them.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings

import numpy as np
import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict
from transfer_queue import KVBatchMeta

from verl.single_controller.ray import ResourcePoolManager
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested

from popo_verl import algos, core
from popo_verl.config import get_popo_config, validate_popo_config
from popo_verl.protocol import (POOLED_KEY, POOLED_ONLY_KEY, SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY, WITH_DRIFT_KEY,
                                padded, row_to_tokens)

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

TRAINER_NAME = "popo"
#: step-batch fields the actor update never reads: verl's step metrics (returns, scores) and the driver's phases
DRIVER_ONLY_FIELDS = frozenset({"returns", "rm_scores", "token_level_scores", "token_level_rewards"})


def _is_padding(tag: dict) -> bool:
    return bool(tag.get("is_padding", False))


def _select(batch: KVBatchMeta, rows) -> KVBatchMeta:
    """The rows `rows` of a TransferQueue batch, in that order (same fields and extra info)."""
    return KVBatchMeta(
        partition_id=batch.partition_id,
        keys=[batch.keys[i] for i in rows],
        tags=[batch.tags[i] for i in rows],
        fields=batch.fields,
        extra_info=dict(batch.extra_info),
    )


def _as_object_array(values) -> np.ndarray:
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return np.array(list(values), dtype=object)


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


@register_trainer(TRAINER_NAME)
class PopoTrainer(PPOTrainerSync):
    """Positive-Only Policy Optimization on verl's hybrid engine."""

    def __init__(self, config):
        validate_popo_config(config)
        self.popo = get_popo_config(config)
        if config.actor_rollout_ref.actor.strategy not in ("fsdp", "fsdp2", "megatron"):
            raise NotImplementedError(
                "POPO runs on verl's FSDP/FSDP2 and Megatron engines (strategy fsdp|fsdp2|megatron); "
                f"got strategy={config.actor_rollout_ref.actor.strategy}"
            )
        with open_dict(config):
            # The workers only see actor_rollout_ref: hand them POPO's knobs there.
            config.actor_rollout_ref.popo = OmegaConf.create(OmegaConf.to_container(config.algorithm.popo, resolve=True))
        super().__init__(config)
        # trainer.v1.trainer_mode names this class; the schedule itself is verl's synchronous one
        # (verl's base trainer switches to async buffers and TQ checkpoints for any mode but "sync").
        self.trainer_mode = "sync"
        self.replay_buffer = self._build_replay_buffer()
        # The siamese takes the ref role even though no KL term is used.
        self.use_reference_policy = True
        self.popo_skipped_steps = 0
        self._popo_update_batch: KVBatchMeta | None = None
        # the step's positive and real (not padding) rows, in the step batch's order: set once, in the siamese phase
        self._popo_positive: torch.Tensor | None = None
        self._popo_real: torch.Tensor | None = None
        self._popo_rewards: torch.Tensor | None = None

    # ------------------------------------------------------------------ workers
    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        from popo_verl.workers import PopoActorRolloutRefWorker

        lora = self.config.actor_rollout_ref.model.get("lora", {}).get("rank", 0) or self.config.actor_rollout_ref.model.get(
            "lora_rank", 0
        )
        if lora and lora > 0:
            raise NotImplementedError("POPO with LoRA (ref inside the actor) is not supported: the siamese needs full weights")
        for role in (Role.ActorRollout, Role.Actor, Role.RefPolicy, Role.ActorRolloutRef):
            self.role_worker_mapping.pop(role, None)
            self.mapping.pop(role, None)
        self.role_worker_mapping[Role.ActorRolloutRef] = ray.remote(PopoActorRolloutRefWorker)
        self.mapping[Role.ActorRolloutRef] = "global_pool"
        self.resource_pool_manager = ResourcePoolManager(
            resource_pool_spec=self.resource_pool_manager.resource_pool_spec, mapping=self.mapping
        )

    # ------------------------------------------------------------------ helpers
    def _dp_size(self) -> int:
        wg = self.actor_rollout_wg
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        return max(wg._dispatch_info["actor"]) + 1

    def _n_optimizer_steps(self) -> int:
        cfg = self.config
        return max(1, cfg.data.train_batch_size // cfg.actor_rollout_ref.actor.ppo_mini_batch_size)

    def _positive_and_real(self, scores, tags) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one definition of a positive: core.positive_mask under algorithm.popo.reward_mode, on a real (not
        padding) row. Returns (positive, real, rewards), padding rows at reward 0 (verl fills them from a template
        row: neither a positive nor a reward the binary check should see)."""
        real = torch.tensor([not _is_padding(t) for t in tags], dtype=torch.bool)
        rewards = torch.where(real, padded(scores).sum(dim=-1).float(), 0.0)
        try:
            positive = core.positive_mask(rewards, self.popo.reward_threshold, self.popo.reward_mode)
        except core.NonBinaryRewardError as e:
            # `from None`: the message is the whole story; a chained core traceback would push it up the console
            raise ValueError(self._non_binary_message(e, int(real.sum()))) from None
        return positive & real, real, rewards

    def _non_binary_message(self, e: core.NonBinaryRewardError, n_real: int) -> str:
        p = "algorithm.popo."
        shown = ", ".join(f"{v:g}" for v in e.values[:5]) + (", ..." if len(e.values) > 5 else "")
        return (
            f"POPO step {self.global_steps}: {e.n_rows} of {n_real} rewards are outside {{0, 1}} ({shown}), but "
            f"{p}reward_mode=binary (the default) counts a response as positive only when its reward is 1, the "
            f"verifier's 'correct'. For graded rewards set {p}reward_mode=threshold with {p}tau_r=<x> (positive iff "
            f"reward > x), or {p}reward_mode=graded (positive iff reward > tau_r, default 0; weights scaled by the "
            f"normalised reward)"
        )

    # ------------------------------------------------------------------ siamese forward ("ref" phase)
    def _compute_ref_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """Siamese forward on the positives only: pooled representation (+ log-probs for the KL anchor).

        The step's positives are decided here, once, and reused by the weights phase and the metrics.
        """
        # Rewards the verifier failed on are 0s, not wrong answers: count them, and stop past the allowed share.
        from popo_verl.reward import verifier_error_metrics

        metrics.update(verifier_error_metrics(batch, self.config, self.global_steps))
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
        positive, real, rewards = self._positive_and_real(data["rm_scores"], batch.tags)
        self._popo_positive, self._popo_real, self._popo_rewards = positive, real, rewards
        self._maybe_kl_monitor(batch, real, metrics)
        pos_idx = np.flatnonzero(positive.numpy())
        self._popo_update_batch = None
        if len(pos_idx) == 0:
            return batch
        sub = _select(batch, pos_idx)
        dp = self._dp_size()
        n_mini, rows_per_cell, micro = self._positive_layout(len(pos_idx), dp)
        sub = upsample_batch_to_divisible_size(sub, dp * n_mini * rows_per_cell, self.tokenizer.eos_token_id)
        order = spread_padding_order(len(pos_idx), len(sub), dp, n_mini)
        sub = _select(sub, order)
        if micro is not None:
            sub.extra_info["micro_batch_size_per_gpu"] = micro
        with_log_probs = self.popo.anchor == "kl"  # the cosine anchor reads the pooled states alone
        ref_lp, siamese = self._siamese_forward(sub, with_log_probs=with_log_probs)
        fields = {SIAMESE_KEY: siamese, **({"ref_log_prob": ref_lp} if with_log_probs else {})}
        tq.kv_batch_put(keys=sub.keys, partition_id=sub.partition_id, fields=TensorDict(fields, batch_size=len(sub)))
        self._popo_update_batch = sub
        self._popo_n_mini = n_mini
        return batch

    def _siamese_forward(self, batch: KVBatchMeta, with_log_probs: bool):
        """The siamese (ref role) over `batch`: (response log-probs, nested like verl's, or None without
        `with_log_probs`; pooled states (B, H)). Without log-probs the FSDP engine runs its LM head on one
        position per micro-batch and nothing per token comes back (popo_verl/engines/fsdp.py `pooled_only`)."""
        saved = dict(batch.extra_info)
        batch.extra_info.update(
            {"calculate_entropy": False, "compute_loss": False, "temperature": self.config.actor_rollout_ref.rollout.temperature,
             POOLED_ONLY_KEY: not with_log_probs}
        )
        try:
            output = self.actor_rollout_wg.compute_ref_log_prob(batch)
        finally:
            batch.extra_info = saved
        assert len(output) == len(batch)
        if not with_log_probs:
            return None, tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[POOLED_KEY])[POOLED_KEY]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["log_probs", "response_mask", POOLED_KEY])
        return response_from_nested(data.pop("log_probs"), data["response_mask"]), data[POOLED_KEY]

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

    def _positive_layout(self, n_pos: int, dp: int) -> tuple[int, int, int | None]:
        """(mini-batches, rows per rank and mini-batch, micro-batch size) for an update on n_pos positives.

        As many optimizer steps as verl's GRPO would take (train_batch_size / ppo_mini_batch_size), fewer
        if there are too few positives; padding rows (zero loss mask, a few tokens) fill each cell up to a
        multiple of the micro-batch size, which verl's fixed-size micro-batching needs.
        """
        actor = self.config.actor_rollout_ref.actor
        n_mini = max(1, min(self._n_optimizer_steps(), n_pos // dp))
        rows = math.ceil(n_pos / (dp * n_mini))
        if actor.use_dynamic_bsz:
            return n_mini, rows, None
        micro_cfg = int(actor.ppo_micro_batch_size_per_gpu)
        if rows <= micro_cfg:
            return n_mini, rows, rows
        return n_mini, math.ceil(rows / micro_cfg) * micro_cfg, micro_cfg

    # ------------------------------------------------------------------ POPO weights ("adv" phase)
    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        cfg = self.popo
        fields = ["uid", "response_mask", "old_log_probs"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        mask = padded(response_mask_nested, 0).float()
        old_lp = padded(response_from_nested(data["old_log_probs"], response_mask_nested))
        uid = _as_object_array(data["uid"])
        positive, real = self._popo_positive, self._popo_real

        weights, r_tilde = algos.popo_row_weights(old_lp, mask, self._popo_rewards, positive, uid, cfg)
        if r_tilde is not None and positive.any():
            metrics["popo/normalised_reward_mean"] = float(r_tilde[positive].mean())

        n_tokens = mask.sum(-1)
        pos_tokens = float((n_tokens * positive.float()).sum())
        all_tokens = float((n_tokens * real.float()).sum())
        groups = {g for g, r in zip(uid, real.tolist(), strict=True) if r}
        groups_with_pos = {g for g, p in zip(uid, positive.tolist(), strict=True) if p}
        w_total = float(weights.sum())
        n_mini = getattr(self, "_popo_n_mini", 1) if cfg.positives_only_update else self._n_optimizer_steps()
        sim_w = weights * (n_mini / w_total) if w_total > 0 else torch.zeros_like(weights)
        token_scale = 1.0 if cfg.positives_only_update else (all_tokens / pos_tokens if pos_tokens > 0 else 1.0)

        rows = len(batch)
        # verl's advantages and returns on its per-token layout (its step metrics read both); POPO's own per-row
        # values as [B]. Padding rows (verl's, not real) carry 0 everywhere.
        advantages = row_to_tokens(weights, response_mask_nested)
        fields = {
            "advantages": advantages,
            "returns": advantages,
            SIM_WEIGHT_KEY: sim_w.float(),
            TOKEN_SCALE_KEY: torch.full_like(weights, token_scale).float() * real.float(),
        }
        if not cfg.positives_only_update:
            # Negatives join the update at zero weight; give them a placeholder siamese representation.
            sub_keys = set(self._popo_update_batch.keys) if self._popo_update_batch is not None else set()
            hidden = self._hidden_size()
            missing = [i for i, k in enumerate(batch.keys) if k not in sub_keys]
            if missing:
                tq.kv_batch_put(
                    keys=[batch.keys[i] for i in missing],
                    partition_id=batch.partition_id,
                    fields=TensorDict({SIAMESE_KEY: torch.zeros(len(missing), hidden)}, batch_size=len(missing)),
                )
        batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(fields, batch_size=rows))

        if self._popo_update_batch is not None:
            # The synthetic padding rows of the positive batch carry nothing.
            sub = self._popo_update_batch
            pad_keys = self._padding_keys(sub)
            if pad_keys:
                pm = tq.kv_batch_get(keys=pad_keys, partition_id=sub.partition_id, select_fields=["response_mask"])["response_mask"]
                zeros = row_to_tokens(torch.zeros(len(pad_keys)), pm)
                # (old_log_probs too: verl's padding template copied the first row's, of another length)
                pad_fields = {k: zeros for k in ("advantages", "returns", "old_log_probs")}
                pad_fields.update({k: torch.zeros(len(pad_keys)) for k in (SIM_WEIGHT_KEY, TOKEN_SCALE_KEY)})
                tq.kv_batch_put(keys=pad_keys, partition_id=sub.partition_id, fields=TensorDict(pad_fields, batch_size=len(pad_keys)))
            sub.fields = self._update_fields(batch.fields)

        n_real = int(real.sum())
        metrics.update(
            {
                "popo/positive_ratio": float(positive.sum()) / max(n_real, 1),
                "popo/groups_without_positive": float(len(groups - groups_with_pos)),
                "popo/groups_with_positive": float(len(groups_with_pos)),
                "popo/weight_entropy": core.weight_entropy(weights, uid),
                "popo/weight_max": float(weights.max()) if rows else 0.0,
            }
        )
        return batch

    def _update_fields(self, fields) -> list[str]:
        """What the actor update reads: the step batch's fields less those only the driver's metrics use, plus the
        siamese's outputs. Every field listed travels driver -> workers for every row of the update."""
        siamese = {SIAMESE_KEY, "ref_log_prob"} if self.popo.anchor == "kl" else {SIAMESE_KEY}
        return sorted((set(fields or []) - DRIVER_ONLY_FIELDS) | siamese)

    @staticmethod
    def _padding_keys(sub: KVBatchMeta) -> list:
        return [k for k, t in zip(sub.keys, sub.tags, strict=True) if _is_padding(t)]

    def _hidden_size(self) -> int:
        if getattr(self, "_popo_hidden", None) is None:
            from transformers import AutoConfig

            path = self.config.actor_rollout_ref.model.path
            self._popo_hidden = int(AutoConfig.from_pretrained(path, trust_remote_code=True).hidden_size)
        return self._popo_hidden

    # ------------------------------------------------------------------ actor update
    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        updated = False
        try:
            updated = self._update_positives(batch, metrics)
        finally:
            self._clear_padding_rows(batch, metrics)
        if not updated:  # no update brought the step's stats back
            stats = self.actor_rollout_wg.popo_stats(self._with_drift())
            metrics.update(stats[0] if isinstance(stats, list) else stats)
        metrics["popo/skipped_steps_total"] = float(self.popo_skipped_steps)
        return batch

    def _due(self, interval) -> bool:
        """Whether a diagnostic run every `interval` steps (0 = off) runs at this step."""
        every = int(interval)
        return every > 0 and self.global_steps % every == 0

    def _with_drift(self) -> bool:
        return self._due(self.popo.drift_interval)

    def _update_positives(self, batch: KVBatchMeta, metrics: dict) -> bool:
        """The actor update on the step's positives (all rows without positives_only_update); False if skipped."""
        n_pos = int(self._popo_positive.sum()) if self._popo_positive is not None else 0
        if n_pos == 0:
            self.popo_skipped_steps += 1
            msg = f"POPO step {self.global_steps}: no positive rollout in the batch; actor update skipped"
            warnings.warn(msg, stacklevel=1)
            logger.warning(msg)
            lr = self.actor_rollout_wg.popo_skipped_step()  # the LR schedule keeps pace with the training steps
            metrics.update({"popo/skipped_step": 1.0, "popo/rows_updated": 0.0, "actor/lr": float(lr[0] if isinstance(lr, list) else lr)})
            return False
        if self.popo.positives_only_update:
            sub = self._popo_update_batch
            # one verl mini-batch per optimizer step, over the positives only
            self._run_update(sub, metrics, mini_rows=len(sub) // self._popo_n_mini)
            rows = n_pos
        else:
            mini_rows = self.config.actor_rollout_ref.actor.ppo_mini_batch_size * self.config.actor_rollout_ref.rollout.n
            step_fields = batch.fields
            batch.fields = self._update_fields(batch.fields)
            try:
                self._run_update(batch, metrics, mini_rows=mini_rows)
            finally:
                batch.fields = step_fields
            rows = sum(not _is_padding(t) for t in batch.tags)
        metrics.update({"popo/skipped_step": 0.0, "popo/rows_updated": float(rows)})
        self._maybe_log_prob_deltas(batch, metrics)
        return True

    def _clear_padding_rows(self, batch: KVBatchMeta, metrics: dict) -> None:
        """The positives' update batch added padding rows under keys of their own, which verl's `fit` (it clears
        the step batch's keys) never frees: clear them here, every step, failed or not. `popo/tq_rows_held` is
        what the partition holds afterwards: the step batch's rows alone."""
        sub, self._popo_update_batch = self._popo_update_batch, None
        pad_keys = self._padding_keys(sub) if sub is not None else []
        if pad_keys:
            tq.kv_clear(keys=pad_keys, partition_id=sub.partition_id)
        held = tq.kv_list(batch.partition_id) or {}
        metrics["popo/tq_rows_held"] = float(len(held.get(batch.partition_id, {})))

    def _run_update(self, batch: KVBatchMeta, metrics: dict, mini_rows: int) -> None:
        """verl's `_update_actor` with the mini-batch size set to the positives' (verl/trainer/ppo/v1/trainer_base.py)."""
        from verl.utils.metric import reduce_metrics
        from verl.utils.py_functional import rename_dict

        actor = self.config.actor_rollout_ref.actor
        batch.extra_info.update(
            {
                "calculate_entropy": self.popo.beta > 0,
                "distillation_use_topk": False,
                "distillation_only": False,
                "global_batch_size": mini_rows,
                "mini_batch_size": mini_rows,
                "epochs": actor.ppo_epochs,
                "seed": actor.data_loader_seed,
                "dataloader_kwargs": {"shuffle": actor.shuffle},
                "temperature": self.config.actor_rollout_ref.rollout.temperature,
                WITH_DRIFT_KEY: self._with_drift(),  # the worker returns the step's POPO stats with the update
            }
        )
        output = self.actor_rollout_wg.update_actor(batch)
        output = rename_dict(output["metrics"], "actor/")
        output["perf/mfu/actor"] = output.pop("actor/mfu")
        actor_metrics = reduce_metrics(output)
        for k in list(actor_metrics):  # POPO's own keys keep their names (popo/*, timing_s/ema_update, ...)
            if k.startswith(("actor/popo/", "actor/timing_s/")):
                actor_metrics[k[len("actor/") :]] = actor_metrics.pop(k)
        metrics.update(actor_metrics)

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
