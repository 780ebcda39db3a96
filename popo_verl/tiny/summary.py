"""Summarise a verl console log: steps, step time and held-out pass@1 start -> end (`python -m popo_verl.tiny.summary LOG`)."""

from __future__ import annotations

import math
import re
import sys

_STEP = re.compile(r"step:(\d+) - (.*)")
_PAIR = re.compile(r"([\w/@\-\.]+):(?:np\.\w+\()?([-+0-9.eE]+|nan)\)?")


def parse_steps(text: str) -> list[tuple[int, dict[str, float]]]:
    steps = []
    for line in text.splitlines():
        m = _STEP.search(line)
        if not m:
            continue
        metrics = {k: float(v) for k, v in _PAIR.findall(m.group(2))}
        steps.append((int(m.group(1)), metrics))
    return steps


def held_out_curve(steps) -> tuple[str, dict[int, float]] | None:
    """(key, {step: value}) of the held-out pass@1: verl's `val-core/<source>/acc/mean@N` (mean over the N
    samples of each prompt), else its `val-core/<source>/reward/mean@N`."""
    for pattern in (re.compile(r"val-core/.+/acc/mean@\d+$"), re.compile(r"val-core/.+/reward/mean@\d+$")):
        keys = sorted({k for _, m in steps for k in m if pattern.match(k)})
        if keys:
            key = keys[0]
            return key, {step: m[key] for step, m in steps if key in m}
    return None


def held_out_best_of_n(steps) -> tuple[int, dict[int, float]] | None:
    """(N, {step: value}) of verl's `val-core/<source>/acc/best@N/mean` (pass@N), N the largest logged."""
    pattern = re.compile(r"val-core/.+/acc/best@(\d+)/mean$")
    keys = {k: int(pattern.match(k).group(1)) for _, m in steps for k in m if pattern.match(k)}
    if not keys:
        return None
    key = max(keys, key=keys.get)
    return keys[key], {step: m[key] for step, m in steps if key in m}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m popo_verl.tiny.summary LOG", file=sys.stderr)
        return 2
    with open(argv[0], errors="replace") as f:
        steps = parse_steps(f.read())
    if not steps:
        print("no training step was logged")
        return 1
    last_step = max(s for s, _ in steps)
    step_times = [m["timing_s/step"] for _, m in steps if not math.isnan(m.get("timing_s/step", math.nan))]
    if step_times:
        print(f"trained {last_step} steps; median step {sorted(step_times)[len(step_times) // 2]:.1f} s")
    curve = held_out_curve(steps)
    if curve is None:
        print("held-out pass@1: not measured (set trainer.test_freq > 0)")
        return 0
    best = held_out_best_of_n(steps)
    if best is not None:
        n, values = best
        first, last = min(values), max(values)
        print(f"held-out pass@{n}: {values[first]:.3f} -> {values[last]:.3f}")
    key, values = curve
    first, last = min(values), max(values)
    print(f"held-out pass@1: {values[first]:.3f} -> {values[last]:.3f} ({last - first} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
