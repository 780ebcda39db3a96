"""algorithm.popo.reward_mode through the real script (scripts/run_tiny_cpu.sh -> verl's trainer), with a reward that
gives partial credit (tests/fixtures/partial_credit_reward.py: 1.0 right, 0.5 off by one, 0.25 off by two).

Before reward_mode existed, a positive was `reward > tau_r` with tau_r = 0: every near miss was trained on as a
correct answer, positive_ratio near 1, no warning.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from test_e2e_cpu import ROWS_PER_STEP, run_tiny

PARTIAL_CREDIT = str(Path(__file__).resolve().parent / "fixtures" / "partial_credit_reward.py")
TAU_R = 0.3  # between the two partial credits: 0.5 is a positive, 0.25 is not


def test_a_threshold_without_a_mode_stops_the_script_at_start(tmp_path, tiny_dir):
    """tau_r under the default binary mode is refused in the driver, before Ray starts, naming the keys to set."""
    out = run_tiny(tmp_path, tiny_dir, "popo", "algorithm.popo.tau_r=0.5", steps=1, expect_ok=False)
    assert out["rc"] == 2, out["log"][-3000:]
    assert "popo-verl: invalid configuration: algorithm.popo.tau_r=0.5 is a reward threshold" in out["log"]
    assert "algorithm.popo.reward_mode=threshold" in out["log"] and "algorithm.popo.reward_mode=graded" in out["log"]
    assert "Started a local Ray instance" not in out["log"]


@pytest.mark.e2e
def test_partial_credit_stops_the_default_mode_at_step_1(tmp_path, tiny_dir):
    t0 = time.monotonic()
    out = run_tiny(tmp_path, tiny_dir, "popo", steps=1, expect_ok=False, env_extra={"REWARD_FILE": PARTIAL_CREDIT})
    elapsed = time.monotonic() - t0
    log = out["log"]
    assert out["rc"] != 0, log[-3000:]
    assert not out["steps"], "no training step may complete on partial-credit rewards in binary mode"
    lines = out["stdout"].rstrip().splitlines()
    error = [i for i, line in enumerate(lines) if line.startswith("ValueError: POPO step 1: ")]
    assert error, log[-3000:]
    message = lines[error[-1]]
    # it names the rewards it refused and the keys that accept them
    assert "outside {0, 1} (0.25, 0.5)" in message
    for key in ("algorithm.popo.reward_mode=binary", "algorithm.popo.reward_mode=threshold", "algorithm.popo.tau_r=<x>",
                "algorithm.popo.reward_mode=graded"):
        assert key in message, key
    # not buried: the Ray traceback ends with it, and only the hydra hint and the script's summary follow
    assert len(lines) - error[-1] <= 8, lines[error[-1]:]
    print(f"stopped after {elapsed:.0f} s")


def _dumped_rewards(dump: Path, step: int) -> dict[str, list[float]]:
    """The step's rewards by group, from verl's own rollout dump (trainer.rollout_data_dir; uid = group_rollout_output)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for line in (dump / f"{step}.jsonl").read_text().splitlines():
        row = json.loads(line)
        groups[row["uid"].rsplit("_", 2)[0]].append(float(row["score"]))
    return groups


@pytest.mark.e2e
def test_graded_mode_trains_on_rewards_above_tau_r_only(tmp_path, tiny_dir):
    dump = tmp_path / "rollouts"
    out = run_tiny(tmp_path, tiny_dir, "popo", "algorithm.popo.reward_mode=graded", f"algorithm.popo.tau_r={TAU_R}",
                   f"trainer.rollout_data_dir={dump}", steps=2, env_extra={"REWARD_FILE": PARTIAL_CREDIT})
    assert sorted(out["steps"]) == [1, 2]
    for step, m in out["steps"].items():
        groups = _dumped_rewards(dump, step)
        rewards = [r for g in groups.values() for r in g]
        assert len(rewards) == ROWS_PER_STEP
        # the batch holds both kinds of partial credit: above tau_r (a positive) and at or below it (not one)
        assert any(0 < r <= TAU_R for r in rewards) and any(TAU_R < r < 1 for r in rewards), sorted(set(rewards))
        n_above = sum(r > TAU_R for r in rewards)
        assert m["popo/positive_ratio"] == pytest.approx(n_above / ROWS_PER_STEP, abs=1e-12)
        assert m["popo/positive_ratio"] < sum(r > 0 for r in rewards) / ROWS_PER_STEP  # what tau_r = 0 would count
        assert m["popo/rows_updated"] == n_above and m["popo/skipped_step"] == 0 and m["actor/grad_norm"] > 0
        # r~ = (r - tau_r) / (best of the group - tau_r) over the positives, from the dumped rewards
        r_tilde = [(r - TAU_R) / (max(g) - TAU_R) for g in groups.values() for r in g if r > TAU_R]
        assert m["popo/normalised_reward_mean"] == pytest.approx(sum(r_tilde) / len(r_tilde), rel=1e-9)
        assert all(v == v for v in m.values()), "no NaN in the logged metrics"
