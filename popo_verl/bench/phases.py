"""The step phases of a verl run, as its `timing_s/<phase>` metrics time them, and how the reports read them: the
steps after the first (the first is warm-up; a one-step run keeps it rather than report nothing), by median."""

from __future__ import annotations

import math
import statistics

#: the phases the reports compare (verl's timing_s/<phase>; `ref` is POPO's siamese forward, GRPO's reference)
PHASES = ("gen", "old_log_prob", "ref", "adv", "update_actor", "ema_update", "update_weights", "step")


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else float("nan")


def measured(steps: dict[int, dict]) -> list[dict]:
    """The metrics of the steps that count, in step order: step 1 dropped unless it is the only one."""
    return [m for s, m in sorted(steps.items()) if s != 1] or [m for _, m in sorted(steps.items())]


def phase_series(steps: dict[int, dict], phases=PHASES) -> dict[str, list[float]]:
    """phase -> seconds per measured step."""
    rows = measured(steps)
    return {ph: [m[f"timing_s/{ph}"] for m in rows if f"timing_s/{ph}" in m] for ph in phases}


def phase_medians(steps: dict[int, dict], phases=PHASES) -> dict[str, float]:
    """phase -> median seconds over the measured steps."""
    return {ph: median(xs) for ph, xs in phase_series(steps, phases).items()}
