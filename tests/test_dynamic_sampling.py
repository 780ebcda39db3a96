"""Positive-aware dynamic sampling (popo_verl/replay_buffer.py): which groups are regenerated, within what budget,
in what order the batch is taken, and the verl 0.9.1 replay-buffer internals it rests on. The run through verl's
trainer is in tests/test_e2e_cpu.py (the 2-rank POPO run samples dynamically)."""

import inspect

import pytest
from omegaconf import OmegaConf

from verl.trainer.ppo.v1.replay_buffer import FILTER_GROUPS_REWARD_METRIC, ReplayBuffer

from popo_verl.config import PopoConfig, validate_popo_config
from popo_verl.replay_buffer import REFILL_PER_EVICTED_GROUP, PositiveGroupsReplayBuffer, groups_to_regenerate
from popo_verl.trainer import PopoTrainer


def test_groups_without_a_positive_are_regenerated_until_k_have_one():
    without = {"a", "b", "c"}
    assert groups_to_regenerate(without, n_with_positive=2, target=4, budget_left=100) == without
    assert groups_to_regenerate(without, n_with_positive=4, target=4, budget_left=100) == set(), "K reached: keep"
    assert groups_to_regenerate(set(), n_with_positive=0, target=4, budget_left=100) == set()


def test_the_budget_pays_two_prompts_per_regenerated_group():
    without = {"a", "b", "c"}
    assert len(groups_to_regenerate(without, 0, 4, budget_left=2 * REFILL_PER_EVICTED_GROUP)) == 2
    assert len(groups_to_regenerate(without, 0, 4, budget_left=REFILL_PER_EVICTED_GROUP - 1)) == 0
    assert groups_to_regenerate(without, 0, 4, budget_left=-3) == set()


def make_buffer(k=4, rounds=3, batch=4):
    dispatched = []
    buffer = PositiveGroupsReplayBuffer(
        trainer_mode="sync", trainer_config=OmegaConf.create({}), max_off_policy_threshold=None,
        max_off_policy_strategy="drop", sampler_kwargs=OmegaConf.create({}), refill_fn=dispatched.append,
        train_batch_size=batch, gen_batch_size=1, max_inflight_gen_batches=1,
        popo=PopoConfig(min_groups_with_positive=k, max_gen_rounds=rounds),
    )
    return buffer, dispatched


def test_the_buffer_runs_verls_dapo_loop_and_counts_what_it_dispatches():
    buffer, dispatched = make_buffer()
    assert buffer.filter_groups_metric == FILTER_GROUPS_REWARD_METRIC, "verl's sync DAPO loop (evict, refill, drain)"
    buffer.refill_fn(3)
    buffer.refill_fn(2)
    assert dispatched == [3, 2] and buffer._dispatched == 5


def finish(buffer, groups: dict[str, bool]):
    """Groups finished in TransferQueue's snapshot, already classified (with / without a positive)."""
    buffer.finished_keys["train"] = set(groups)
    buffer._has_positive.update(groups)


def test_evictions_stop_at_k_groups_with_a_positive_and_at_the_round_budget():
    # batch 4, 2 rounds: one extra round of 4 prompts pays for 2 regenerated groups
    buffer, _ = make_buffer(k=4, rounds=2, batch=4)
    finish(buffer, {"p1": True, "n1": False, "n2": False, "n3": False})
    evicted, counts = buffer._dapo_filtered_keys("train")
    assert len(evicted) == 2 and evicted <= {"n1", "n2", "n3"} and not counts
    finish(buffer, {"p1": True, "n3": False, "n4": False} | {u: False for u in ("n1", "n2") if u not in evicted})
    assert buffer._dapo_filtered_keys("train")[0] == set(), "budget spent: the rest stay in the batch"

    buffer, _ = make_buffer(k=2, rounds=3, batch=4)
    finish(buffer, {"p1": True, "p2": True, "n1": False})
    assert buffer._dapo_filtered_keys("train")[0] == set(), "K groups with a positive: nothing more to regenerate"
    assert buffer._dapo_filtered_keys("val")[0] == set(), "validation is never filtered"


def test_the_batch_takes_groups_with_a_positive_first_then_the_oldest():
    buffer, _ = make_buffer(k=2, batch=3)
    finish(buffer, {"n_old": False, "p_new": True, "p_old": True, "n_new": False})
    buffer.prompt_global_steps["train"] = {"n_old": 1, "p_new": 3, "p_old": 2, "n_new": 3}
    selected, _, _ = buffer._select_prompt_uids("train", {"n_old", "p_new", "p_old", "n_new"}, 3)
    assert selected == ["p_old", "p_new", "n_old"]


def base_config(**popo):
    return OmegaConf.create({
        "algorithm": {"popo": popo, "filter_groups": {"enable": False}},
        "actor_rollout_ref": {"rollout": {"n": 8}},
        "data": {"train_batch_size": 8},
        "reward": {"reward_model": {"enable": False, "enable_resource_pool": False}},
        "trainer": {"v1": {"sampler": {"custom_sampler": {"path": None, "name": None}}}},
    })


def test_settings_that_cannot_work_are_refused_naming_the_key():
    assert validate_popo_config(base_config(min_groups_with_positive=8)).min_groups_with_positive == 8
    with pytest.raises(ValueError, match=r"min_groups_with_positive must lie in \[0, data.train_batch_size=8\]"):
        validate_popo_config(base_config(min_groups_with_positive=9))
    cfg = base_config()
    cfg.algorithm.filter_groups.enable = True
    with pytest.raises(ValueError, match="drops the all-correct groups.*min_groups_with_positive"):
        validate_popo_config(cfg)
    cfg = base_config(min_groups_with_positive=4)
    cfg.reward.reward_model.enable = True
    with pytest.raises(ValueError, match="enable_resource_pool"):
        validate_popo_config(cfg)
    cfg.reward.reward_model.enable_resource_pool = True
    validate_popo_config(cfg)
    cfg = base_config(min_groups_with_positive=4)
    cfg.trainer.v1.sampler.custom_sampler = {"path": "my.py", "name": "MySampler"}
    with pytest.raises(ValueError, match="custom_sampler"):
        validate_popo_config(cfg)


def test_verls_replay_buffer_internals_we_rest_on():
    """verl 0.9.1's sync DAPO loop (verl/trainer/ppo/v1/replay_buffer.py) grants 2 refill prompts per evicted group,
    reads the groups to evict from `_dapo_filtered_keys` and the batch from `_select_prompt_uids`; PopoTrainer builds
    the buffer with every argument verl's own `_build_replay_buffer` (trainer_base.py) gives it."""
    sample = inspect.getsource(ReplayBuffer.sample)
    assert f"refill_credit += {REFILL_PER_EVICTED_GROUP} * dapo_count" in sample
    assert "self._terminal_eviction_reasons(" in sample and "self._select_prompt_uids(" in sample
    assert "self._dapo_filtered_keys(partition_id)" in inspect.getsource(ReplayBuffer._terminal_eviction_reasons)
    ours = inspect.getsource(PopoTrainer._build_replay_buffer)
    for name in inspect.signature(ReplayBuffer.__init__).parameters:
        if name not in ("self", "poll_interval", "filter_groups_metric"):
            assert f"{name}=" in ours, f"verl's ReplayBuffer takes {name}: PopoTrainer._build_replay_buffer must pass it"
