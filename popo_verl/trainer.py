"""POPO trainer: verl 0.9.1's v1 sync trainer with POPO's weights, siamese and positives-only update.

Subclass of `PPOTrainerSync` (verl/trainer/ppo/v1/trainer_sync.py, base in trainer_base.py), registered
as trainer mode "popo", which `algorithm=popo` selects (trainer.v1.trainer_mode). Per step:
  gen -> rewards -> old_log_prob (verl) -> siamese forward on the positives ("ref" phase) ->
  POPO weights per uid from the old log-probs ("adv") -> actor update on the positives ->
  EMA of the siamese after every optimizer step (inside the worker) -> the update batch's padding rows
  cleared from TransferQueue. A step without positives skips the update but still steps the LR schedule.
Overrides (each mirrors the verl method of the same name): `_init_resource_pool_mgr` (POPO's worker),
`_build_replay_buffer` (positive-aware dynamic sampling, replay_buffer.py), `_compute_ref_log_prob`,
`_compute_advantage`, `_update_actor`. tests/test_verl_pins.py pins them.
"""

from __future__ import annotations

import logging
import os
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
from popo_verl.diagnostics import PopoDiagnostics
from popo_verl.protocol import (POOLED_KEY, POOLED_ONLY_KEY, SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY, WITH_DRIFT_KEY,
                                padded, row_to_tokens)
from popo_verl.update_batch import (as_object_array, is_padding, padding_keys, positive_and_real, positive_layout, select,
                                    spread_padding_order, update_fields)

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

TRAINER_NAME = "popo"


@register_trainer(TRAINER_NAME)
class PopoTrainer(PopoDiagnostics, PPOTrainerSync):
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
            if self.popo.min_groups_with_positive > 0:
                # exact refills fetch one prompt at a time, as verl sets for its own filter_groups (trainer_base.py
                # `_init_dataloader`), which it does not know POPO's dynamic sampling needs
                config.data.gen_batch_size = 1
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

        # verl maps LoRA runs to Role.ActorRollout (ref log-probs from the actor without its adapters); POPO's
        # worker keeps the ref role, which under LoRA is the actor's engine with the siamese's adapters (workers.py)
        for role in (Role.ActorRollout, Role.Actor, Role.RefPolicy, Role.ActorRolloutRef):
            self.role_worker_mapping.pop(role, None)
            self.mapping.pop(role, None)
        self.role_worker_mapping[Role.ActorRolloutRef] = ray.remote(PopoActorRolloutRefWorker)
        self.mapping[Role.ActorRolloutRef] = "global_pool"
        self.resource_pool_manager = ResourcePoolManager(
            resource_pool_spec=self.resource_pool_manager.resource_pool_spec, mapping=self.mapping
        )

    def _build_replay_buffer(self):
        """verl's replay buffer, or with algorithm.popo.min_groups_with_positive > 0 POPO's positive-aware one
        (replay_buffer.py), built with the arguments verl's `_build_replay_buffer` (trainer_base.py) gives its sync
        buffer under filter_groups. verl's base __init__ calls this before trainer_mode is "sync"; __init__ rebuilds."""
        if self.popo.min_groups_with_positive <= 0 or self.trainer_mode != "sync":
            return super()._build_replay_buffer()
        from popo_verl.replay_buffer import PositiveGroupsReplayBuffer

        sampler = self.config.trainer.v1.sampler
        return PositiveGroupsReplayBuffer(
            trainer_mode="sync",
            trainer_config=self.config.trainer.v1.get("sync", {}),
            max_off_policy_threshold=sampler.max_off_policy_threshold,
            max_off_policy_strategy=sampler.max_off_policy_strategy,
            sampler_kwargs=sampler.sampler_kwargs,
            refill_fn=self._add_prompts_to_generate,
            train_batch_size=self.config.data.train_batch_size,
            gen_batch_size=1,
            max_inflight_gen_batches=1,
            sync_refill_failed_groups=bool(sampler.get("sync_refill_failed_groups", False)),
            popo=self.popo,
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

    # ------------------------------------------------------------------ siamese forward ("ref" phase)
    def _compute_ref_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """verl's "ref" phase, where POPO decides the step's positives (once: the weights phase and the metrics reuse
        them), lays out the update batch on them and runs the siamese forward over it."""
        # Rewards the verifier failed on are 0s, not wrong answers: count them, and stop past the allowed share.
        from popo_verl.reward import verifier_error_metrics

        metrics.update(verifier_error_metrics(batch, self.config, self.global_steps))
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
        positive, real, rewards = positive_and_real(data["rm_scores"], batch.tags, self.popo, self.global_steps)
        self._popo_positive, self._popo_real, self._popo_rewards = positive, real, rewards
        self._maybe_kl_monitor(batch, real, metrics)
        self._popo_update_batch = self._build_update_batch(batch, positive)
        if self._popo_update_batch is not None:
            self._put_siamese_targets(self._popo_update_batch)
        return batch

    def _build_update_batch(self, batch: KVBatchMeta, positive: torch.Tensor) -> KVBatchMeta | None:
        """The positives' rows, padded and ordered for verl's dp x mini-batch x micro-batch split (update_batch.py);
        None without a positive. Sets `_popo_n_mini`, the update's optimizer steps."""
        pos_idx = np.flatnonzero(positive.numpy())
        if len(pos_idx) == 0:
            return None
        sub = select(batch, pos_idx)
        dp = self._dp_size()
        n_mini, rows_per_cell, micro = positive_layout(len(pos_idx), dp, self._n_optimizer_steps(),
                                                      self.config.actor_rollout_ref.actor)
        sub = upsample_batch_to_divisible_size(sub, dp * n_mini * rows_per_cell, self.tokenizer.eos_token_id)
        sub = select(sub, spread_padding_order(len(pos_idx), len(sub), dp, n_mini))
        if micro is not None:
            sub.extra_info["micro_batch_size_per_gpu"] = micro
        self._popo_n_mini = n_mini
        return sub

    def _put_siamese_targets(self, sub: KVBatchMeta) -> None:
        """The siamese forward over the update batch: its pooled states (+ log-probs for the KL anchor) join the rows."""
        with_log_probs = self.popo.anchor == "kl"  # the cosine anchor reads the pooled states alone
        ref_lp, siamese = self._siamese_forward(sub, with_log_probs=with_log_probs)
        fields = {SIAMESE_KEY: siamese, **({"ref_log_prob": ref_lp} if with_log_probs else {})}
        tq.kv_batch_put(keys=sub.keys, partition_id=sub.partition_id, fields=TensorDict(fields, batch_size=len(sub)))

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

    # ------------------------------------------------------------------ POPO weights ("adv" phase)
    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        cfg = self.popo
        fields = ["uid", "response_mask", "old_log_probs"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        mask = padded(response_mask_nested, 0).float()
        old_lp = padded(response_from_nested(data["old_log_probs"], response_mask_nested))
        uid = as_object_array(data["uid"])
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
            pad_keys = padding_keys(sub)
            if pad_keys:
                pm = tq.kv_batch_get(keys=pad_keys, partition_id=sub.partition_id, select_fields=["response_mask"])["response_mask"]
                zeros = row_to_tokens(torch.zeros(len(pad_keys)), pm)
                # (old_log_probs too: verl's padding template copied the first row's, of another length)
                pad_fields = {k: zeros for k in ("advantages", "returns", "old_log_probs")}
                pad_fields.update({k: torch.zeros(len(pad_keys)) for k in (SIM_WEIGHT_KEY, TOKEN_SCALE_KEY)})
                tq.kv_batch_put(keys=pad_keys, partition_id=sub.partition_id, fields=TensorDict(pad_fields, batch_size=len(pad_keys)))
            sub.fields = update_fields(batch.fields, self.popo.anchor)

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
            batch.fields = update_fields(batch.fields, self.popo.anchor)
            try:
                self._run_update(batch, metrics, mini_rows=mini_rows)
            finally:
                batch.fields = step_fields
            rows = sum(not is_padding(t) for t in batch.tags)
        metrics.update({"popo/skipped_step": 0.0, "popo/rows_updated": float(rows)})
        self._maybe_log_prob_deltas(batch, metrics)
        return True

    def _clear_padding_rows(self, batch: KVBatchMeta, metrics: dict) -> None:
        """The positives' update batch added padding rows under keys of their own, which verl's `fit` (it clears
        the step batch's keys) never frees: clear them here, every step, failed or not. `popo/tq_rows_held` is
        what the partition holds afterwards: the step batch's rows alone."""
        sub, self._popo_update_batch = self._popo_update_batch, None
        pad_keys = padding_keys(sub) if sub is not None else []
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
