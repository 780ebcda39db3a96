"""Positive-aware dynamic sampling: verl's sync replay buffer, regenerating the groups without a positive.

DAPO's `filter_groups` (verl's FILTER_GROUPS_REWARD_METRIC path) evicts every group whose rewards are all equal,
all-correct groups included. POPO trains on an all-correct group (its weights spread over the positives), so only
a group without a positive is dead weight. `algorithm.popo.min_groups_with_positive=K` keeps generating until the
step's batch holds at least K groups with a positive, within `max_gen_rounds` x train_batch_size prompts per step.

`PositiveGroupsReplayBuffer` subclasses verl's `ReplayBuffer` (verl/trainer/ppo/v1/replay_buffer.py) and reuses its
sync DAPO loop unchanged (evict k finished groups -> 2k refill credit, bounded in-flight prompts, drain, discard the
surplus): it replaces only the choice of groups to evict (`_dapo_filtered_keys`) and orders the groups with a
positive first when the batch is selected (`_select_prompt_uids`). tests/test_dynamic_sampling.py pins both hooks.
"""

from __future__ import annotations

from collections import Counter

import transfer_queue as tq

from verl.trainer.ppo.v1.replay_buffer import FILTER_GROUPS_REWARD_METRIC, ReplayBuffer

from popo_verl import core
from popo_verl.protocol import padded

#: prompts verl's sync DAPO loop dispatches for each evicted group (replay_buffer.py: `refill_credit += 2 * k`)
REFILL_PER_EVICTED_GROUP = 2


def groups_to_regenerate(without_positive: set[str], n_with_positive: int, target: int, budget_left: int) -> set[str]:
    """The finished groups without a positive to evict (and regenerate) at one poll.

    None once `target` groups with a positive are in; otherwise as many as the step's generation budget still pays
    for (each costs REFILL_PER_EVICTED_GROUP new prompts). A group kept at one poll is never evicted later (the count
    of groups with a positive and the spent budget only grow), so verl's drained batch never shrinks under its feet.
    """
    if n_with_positive >= target or not without_positive:
        return set()
    affordable = max(0, budget_left) // REFILL_PER_EVICTED_GROUP
    return set(sorted(without_positive)[:affordable])


class PositiveGroupsReplayBuffer(ReplayBuffer):
    """verl's sync ReplayBuffer whose group filter evicts the groups without a positive, until K groups have one.

    Built with `filter_groups_metric="reward"` so that verl's sync DAPO loop runs; the rewards are the canonical
    `rm_scores` that loop reads. `popo` is the PopoConfig (its positive rule, K and the round budget).
    """

    def __init__(self, *args, popo, **kwargs):
        kwargs["filter_groups_metric"] = FILTER_GROUPS_REWARD_METRIC
        super().__init__(*args, **kwargs)
        self.popo = popo
        self._has_positive: dict[str, bool] = {}
        self._step_batch_size = int(self.train_batch_size)
        self._dispatched = 0
        self._evicted = 0
        refill = self.refill_fn

        def counting_refill(num_prompts: int):
            self._dispatched += int(num_prompts)
            return refill(num_prompts)

        self.refill_fn = counting_refill

    # ------------------------------------------------------------------ verl hooks
    def _dapo_filtered_keys(self, partition_id: str) -> tuple[set[str], Counter]:
        if partition_id == "val":
            return set(), Counter()
        finished = self.finished_keys[partition_id]
        for uid in self._has_positive.keys() - finished:
            del self._has_positive[uid]
        self._classify(partition_id, finished - self._has_positive.keys())
        n_with = sum(self._has_positive[uid] for uid in finished)
        without = {uid for uid in finished if not self._has_positive[uid]}
        budget = int(self.popo.max_gen_rounds) * self._step_batch_size - self._step_batch_size
        budget_left = budget - REFILL_PER_EVICTED_GROUP * self._evicted
        # a step samples batch_size groups: train_batch_size, or its share when verl splits the step
        target = min(int(self.popo.min_groups_with_positive), self._step_batch_size)
        evict = groups_to_regenerate(without, n_with, target, budget_left)
        self._evicted += len(evict)
        # no {reward: count} breakdown: verl's DAPO diagnostic is about groups with all-equal rewards
        return evict, Counter()

    def _select_prompt_uids(self, partition_id: str, sampleable_keys: set[str], batch_size: int):
        """verl's oldest-first order, with the groups with a positive ahead of those without (verl discards the
        surplus past batch_size)."""
        steps = self.prompt_global_steps[partition_id]
        ordered = sorted(sampleable_keys, key=lambda uid: (not self._has_positive.get(uid, False), steps.get(uid, 0)))
        selected, partition_snapshot, steps_snapshot = super()._select_prompt_uids(
            partition_id, set(ordered[:batch_size]), batch_size
        )
        order = {uid: i for i, uid in enumerate(ordered)}
        return sorted(selected, key=order.__getitem__), partition_snapshot, steps_snapshot

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        if partition_id == "val":
            return super().sample(global_steps, partition_id, batch_size)
        self._step_batch_size, self._dispatched, self._evicted = int(batch_size), 0, 0
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        metrics["popo/gen_rounds"] = (batch_size + self._dispatched) / batch_size
        metrics["popo/groups_regenerated"] = self._evicted
        return batch, metrics

    # ------------------------------------------------------------------ helpers
    def _classify(self, partition_id: str, uids: set[str]) -> None:
        """Record for each newly finished group whether one of its responses is a positive (POPO's own rule)."""
        if not uids:
            return
        self._has_positive.update(dict.fromkeys(uids, False))  # a group without trajectories has no positive
        keys = [key for key in self.partitions[partition_id] if key.split("_")[0] in uids]
        if not keys:
            return
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["rm_scores"])
        rewards = padded(data["rm_scores"]).sum(dim=-1).float()  # a response's reward, as the trainer reads it
        try:
            positive = core.positive_mask(rewards, self.popo.reward_threshold, self.popo.reward_mode)
        except core.NonBinaryRewardError:
            # the trainer stops on these rewards with its own message at the step's "ref" phase; here only the
            # rewards that are exactly 1 count as positives
            positive = rewards == core.CORRECT_SCORE
        for key, is_positive in zip(keys, positive.tolist(), strict=True):
            if is_positive:
                self._has_positive[key.split("_")[0]] = True
