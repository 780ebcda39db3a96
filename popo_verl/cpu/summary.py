"""Summarise a verl console log: last step and the final held-out accuracy (`python -m popo_verl.cpu.summary LOG`)."""

from __future__ import annotations

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


def held_out_accuracy(steps) -> tuple[int, str, float] | None:
    for step, metrics in reversed(steps):
        keys = sorted(k for k in metrics if k.startswith("val-core/") and "/acc/" in k or k.startswith("val-core/") and k.endswith("/reward/mean@1"))
        if keys:
            return step, keys[0], metrics[keys[0]]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m popo_verl.cpu.summary LOG", file=sys.stderr)
        return 2
    with open(argv[0], errors="replace") as f:
        steps = parse_steps(f.read())
    if not steps:
        print("no training step was logged")
        return 1
    last_step, last = steps[-1]
    print(f"trained {last_step} steps; last step took {last.get('timing_s/step', float('nan')):.1f} s")
    acc = held_out_accuracy(steps)
    if acc is None:
        print("held-out accuracy: not measured (set trainer.test_freq > 0)")
    else:
        step, key, value = acc
        print(f"held-out accuracy ({key}) at step {step}: {value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
