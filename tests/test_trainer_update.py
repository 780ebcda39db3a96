"""The driver's actor-update phase: one round trip to the workers per update.

The worker's `update_actor` returns POPO's step stats (drift, G_max bound, device timings) in the update's metrics;
the driver asks for them separately (`popo_stats`) only on a step with no update. The workers here are a recorder
(the real ones run in tests/test_e2e_cpu.py, which checks the same metrics end to end)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transfer_queue import KVBatchMeta

from popo_verl import trainer as trainer_mod
from popo_verl.protocol import WITH_DRIFT_KEY
from popo_verl.trainer import PopoTrainer

STATS = {"popo/drift": 0.5, "popo/drift_bound": 2.0, "timing_s/ema_update": 0.01, "timing_s/popo_noise": 0.002}


class RecordingWorkers:
    def __init__(self):
        self.calls = []

    def update_actor(self, batch):
        self.calls.append(("update_actor", batch.extra_info[WITH_DRIFT_KEY]))
        metrics = {"pg_loss": [1.0], "mfu": [0.0], "popo/cos_sim": [0.9]}
        if batch.extra_info[WITH_DRIFT_KEY]:
            metrics.update(STATS)
        return {"metrics": metrics}

    def popo_stats(self, with_drift):
        self.calls.append(("popo_stats", with_drift))
        return [dict(STATS)]

    def popo_skipped_step(self):
        self.calls.append(("popo_skipped_step",))
        return [1e-3]


def _trainer(monkeypatch, n_pos: int, step: int, drift_interval: int = 1) -> PopoTrainer:
    monkeypatch.setattr(trainer_mod.tq, "kv_list", lambda partition_id: {partition_id: {}})
    t = object.__new__(PopoTrainer)
    t.popo = SimpleNamespace(drift_interval=drift_interval, positives_only_update=True, beta=0.01,
                             implicit_negative_interval=0, anchor="cosine")
    t.config = SimpleNamespace(actor_rollout_ref=SimpleNamespace(
        actor=SimpleNamespace(ppo_epochs=1, data_loader_seed=0, shuffle=False),
        rollout=SimpleNamespace(temperature=1.0)))
    t.global_steps, t.popo_skipped_steps = step, 0
    t.actor_rollout_wg = RecordingWorkers()
    t._popo_positive = torch.tensor([True] * n_pos + [False] * (4 - n_pos))
    t._popo_update_batch = KVBatchMeta(keys=[f"k{i}" for i in range(n_pos)], tags=[{}] * n_pos, partition_id="train")
    t._popo_n_mini = 1
    return t


def test_an_update_brings_the_step_stats_back_in_one_round_trip(monkeypatch):
    t, metrics = _trainer(monkeypatch, n_pos=2, step=3), {}
    t._update_actor(KVBatchMeta(keys=["a"], tags=[{}], partition_id="train"), metrics)
    assert t.actor_rollout_wg.calls == [("update_actor", True)]
    # POPO's keys keep their names; verl's own get its actor/ prefix
    assert {k: metrics[k] for k in STATS} == pytest.approx(STATS)
    assert metrics["popo/cos_sim"] == pytest.approx(0.9) and metrics["actor/pg_loss"] == pytest.approx(1.0)
    assert not any(k.startswith(("actor/popo/", "actor/timing_s/")) for k in metrics)


def test_drift_interval_reaches_the_update(monkeypatch):
    t, metrics = _trainer(monkeypatch, n_pos=2, step=3, drift_interval=2), {}
    t._update_actor(KVBatchMeta(keys=["a"], tags=[{}], partition_id="train"), metrics)
    assert t.actor_rollout_wg.calls == [("update_actor", False)] and "popo/drift" not in metrics


def test_a_step_without_positives_asks_for_the_stats(monkeypatch):
    t, metrics = _trainer(monkeypatch, n_pos=0, step=4), {}
    with pytest.warns(UserWarning, match="no positive rollout"):
        t._update_actor(KVBatchMeta(keys=["a"], tags=[{}], partition_id="train"), metrics)
    assert t.actor_rollout_wg.calls == [("popo_skipped_step",), ("popo_stats", True)]
    assert metrics["popo/drift"] == pytest.approx(0.5) and metrics["popo/skipped_step"] == 1.0
