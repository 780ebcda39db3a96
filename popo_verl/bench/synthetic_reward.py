"""A synthetic verifier for cost benchmarks: it marks a fixed share of every rollout group correct.

A randomly initialised model (benchmarks/cost.py `--model-size 0.5b`) never answers right, so the real verifier
would leave POPO with no positive and nothing to update: the cost of its update could not be measured. This
verifier ignores the answer. In each group of n responses to one prompt it marks round(p * n) correct (halves
rounded up), always the same sample indices: response k of a group (verl's `session_id`, 0 <= k < n) is correct
when floor((k + 1) p + 1/2) - floor(k p + 1/2) = 1, which holds for exactly round(p * n) of k = 0 .. n - 1,
whatever n is. So POPO and GRPO runs with the same prompts see the same positives, and POPO's positive fraction
is p itself (exactly, when p * n is a whole number). For cost measurements only: it teaches nothing.

Two pieces, both in this module, for verl's reward loop:

    reward.custom_reward_function.path=<this file>  reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.positive_fraction=0.5
    reward.reward_manager.source=importlib  reward.reward_manager.name=SessionRewardManager
    reward.reward_manager.module.path=<this file>

A verl reward function sees the prompt's data and the response text but not which of the group's samples it
scores; `SessionRewardManager` (verl's naive reward manager) hands it the sample index, which verl's v1 agent
loop passes along as `session_id` (verl/trainer/ppo/v1/agent_loop_tq.py).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Optional

#: the key under which SessionRewardManager puts the sample's index in its group into `extra_info`
SESSION_KEY = "session_id"


def _fraction(p: float) -> Fraction:
    if isinstance(p, bool):
        raise ValueError(f"positive_fraction must be a number in [0, 1], got {p!r}")
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"positive_fraction must be a number in [0, 1], got {p!r}") from None
    if not 0 <= value <= 1:  # NaN fails this too
        raise ValueError(f"positive_fraction must lie in [0, 1], got {p!r}")
    return Fraction(repr(value)).limit_denominator(10**6)  # 0.1 is 1/10, not the float just above it


def check_fraction(p: float) -> float:
    """p as a float, or a ValueError naming the bad value (a number in [0, 1] is required)."""
    _fraction(p)
    return float(p)


def positives_per_group(n: int, p: float) -> int:
    """How many of a group of n responses the verifier marks correct: round(p * n), halves rounded up."""
    return math.floor(_fraction(p) * n + Fraction(1, 2))


def is_positive(sample_index: int, p: float) -> bool:
    """Whether response `sample_index` (0-based, within its group) is marked correct at fraction p."""
    if sample_index < 0:
        raise ValueError(f"sample index must be >= 0, got {sample_index}")
    p, half = _fraction(p), Fraction(1, 2)
    return math.floor((sample_index + 1) * p + half) - math.floor(sample_index * p + half) == 1


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Optional[dict] = None,
                  positive_fraction: Optional[float] = None, **kwargs) -> float:
    """verl's custom reward function signature; 1.0 for the marked responses, 0.0 for the others."""
    if positive_fraction is None:
        raise ValueError("synthetic verifier: set +reward.custom_reward_function.reward_kwargs.positive_fraction=P")
    index = (extra_info or {}).get(SESSION_KEY)
    if index is None:
        # Loud: without the index the verifier cannot keep its per-group count, and a guess would make POPO's
        # positive fraction (the benchmark's P) something other than what was asked for.
        raise KeyError(f"synthetic verifier: extra_info has no {SESSION_KEY!r}: run it with "
                       "reward.reward_manager.source=importlib reward.reward_manager.name=SessionRewardManager "
                       f"reward.reward_manager.module.path={__file__}")
    return 1.0 if is_positive(int(index), positive_fraction) else 0.0


def _session_reward_manager():
    import numpy as np
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    class SessionRewardManager(NaiveRewardManager):
        """verl's naive reward manager that also puts the sample's index in its group into `extra_info`.

        verl/experimental/reward_loop/reward_manager/naive.py passes the reward function the row's `extra_info`
        only; the index is in the row's `session_id` (set per sample by verl's v1 agent loop)."""

        async def run_single(self, data):
            sessions = data.non_tensor_batch.get(SESSION_KEY)
            if sessions is not None:
                infos = data.non_tensor_batch.get("extra_info")
                infos = [None] * len(data) if infos is None else list(infos)
                # a copy per row: the rows of a group may share one extra_info dict
                data.non_tensor_batch["extra_info"] = np.array(
                    [{**(info or {}), SESSION_KEY: int(s)} for info, s in zip(infos, sessions)], dtype=object)
            return await super().run_single(data)

    return SessionRewardManager


def __getattr__(name: str):
    # Built on first use, so that importing this module (the reward function's process) needs no verl.
    if name == "SessionRewardManager":
        cls = _session_reward_manager()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def verl_overrides(positive_fraction: float) -> list[str]:
    """The hydra overrides that make verl score with this verifier at the given fraction."""
    _fraction(positive_fraction)
    return [
        f"reward.custom_reward_function.path={__file__}",
        "reward.custom_reward_function.name=compute_score",
        f"+reward.custom_reward_function.reward_kwargs.positive_fraction={positive_fraction}",
        "reward.reward_manager.source=importlib",
        "reward.reward_manager.name=SessionRewardManager",
        f"reward.reward_manager.module.path={__file__}",
    ]
