"""The Ray head's GCS, asked after each step, and the driver kept quiet while it is gone (POPO_RAY_HEAD_TIMEOUT_S > 0).

Nothing of verl's: the stop that saves and ends the run is popo_verl/stop.py, which asks `ray_head_answers`.
"""

from __future__ import annotations

import os

HEAD_TIMEOUT_ENV = "POPO_RAY_HEAD_TIMEOUT_S"
#: how long the driver's log and error polls wait after a poll the GCS did not answer
PAUSE_S = 1.0


def head_timeout_s() -> float | None:
    """POPO_RAY_HEAD_TIMEOUT_S in seconds; None (no check) when unset, empty or 0."""
    value = float(os.environ.get(HEAD_TIMEOUT_ENV) or 0)
    return value if value > 0 else None


def ray_head_answers(timeout_s: float) -> bool:
    """Whether this process's Ray GCS answers one call within timeout_s (True outside Ray: no head to lose).
    Ray's private GcsClient (ray/_raylet.pyx `GcsClient.internal_kv_get`, ray 2.60): the public API has no call
    that takes a timeout; tests/test_verl_pins.py pins it against a GCS it kills."""
    import ray
    from ray.exceptions import RpcError

    if not ray.is_initialized():
        return True
    try:
        ray._private.worker.global_worker.gcs_client.internal_kv_get(b"alive", b"popo_verl", timeout=timeout_s)
    except RpcError:
        return False
    return True


def gcs_address() -> str:
    import ray

    try:
        return ray._private.worker.global_worker.gcs_client.address
    except Exception:  # only for the message
        return "?"


def _unanswered(answer) -> bool:
    """A poll that brought nothing: the error subscriber's (key, None), the log subscriber's None or batch without
    lines (what Ray 2.60 returns at once while the GCS is unreachable)."""
    data = answer[1] if isinstance(answer, tuple) else answer
    return data is None or (isinstance(data, dict) and "lines" in data and not data["lines"])


def _pausing(subscriber: type) -> type:
    import ray._private.worker as ray_worker

    class Pausing(subscriber):
        def poll(self, timeout=None):
            answer = super().poll(timeout)
            if _unanswered(answer):
                # set by ray.shutdown: the pause ends at once, and the thread with it
                ray_worker.global_worker.threads_stopped.wait(PAUSE_S)
            return answer

    Pausing.__name__ = Pausing.__qualname__ = subscriber.__name__
    Pausing._popo_pausing = True
    return Pausing


def register() -> None:
    """The driver (ray.init in `python -m verl.trainer.main_ppo`) forwards the workers' output and errors in two
    threads, each a loop of GCS polls (ray/_private/worker.py `Worker.print_logs`, `listen_error_messages`). In
    Ray 2.60 a poll the GCS cannot answer returns at once, and both loops go straight to the next: with the head
    gone the driver spins two cores at normal priority, against Ray's workers at nice 15. On the CPU cluster of
    tests/test_multinode.py that made the step in flight 6 times slower, past Ray's 60 s, so that the stop never
    came. The subscribers that ray.init creates (`ray._raylet.GcsLogSubscriber`, `GcsErrorSubscriber`) are
    subclassed: after a poll that brought nothing, a pause of PAUSE_S. Only where POPO_RAY_HEAD_TIMEOUT_S asks for
    the stop; tests/test_verl_pins.py pins it against a GCS it kills. Idempotent."""
    if head_timeout_s() is None:
        return
    import ray._raylet as raylet

    for name in ("GcsLogSubscriber", "GcsErrorSubscriber"):
        subscriber = getattr(raylet, name)
        if not getattr(subscriber, "_popo_pausing", False):
            setattr(raylet, name, _pausing(subscriber))
