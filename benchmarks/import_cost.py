"""What installing popo-verl costs a verl user who does not use it: `import verl`, with the plugin and without it.

    python benchmarks/import_cost.py [--pairs 10]

Runs `python -c "import verl"` in fresh interpreters, with the plugin (A) and with verl's own switch that skips
plugins, VERL_USE_EXTERNAL_PLUGINS=none (B), in turn A B A B, and takes the ratio A/B pair by pair (the machine's
drift cancels within a pair). CPU seconds are the operating system's accounting of each finished child. Target:
median CPU ratio <= 1.10 (issue 33). Writes results/import_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from popo_verl.plugin import ENV_SWITCHES, WITHOUT_POPO_VERL

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.10
CODE = "import sys, verl; print(len(sys.modules))"


def one(plugin: bool) -> dict:
    # a verl user's environment, without any of popo-verl's switches
    env = {k: v for k, v in os.environ.items() if k not in ENV_SWITCHES and k not in WITHOUT_POPO_VERL}
    if not plugin:
        env.update(WITHOUT_POPO_VERL)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, cwd="/", check=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu": cpu, "wall": wall, "modules": int(r.stdout.split()[-1]), "stderr_bytes": len(r.stderr)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args(argv)
    one(True), one(False)  # warm the page cache for both
    pairs = []
    for i in range(args.pairs):
        a, b = one(True), one(False)
        pairs.append({"with": a, "without": b, "cpu_ratio": a["cpu"] / b["cpu"], "wall_ratio": a["wall"] / b["wall"]})
        print(f"pair {i + 1}/{args.pairs}: cpu {a['cpu']:.2f} s vs {b['cpu']:.2f} s = {pairs[-1]['cpu_ratio']:.3f}",
              flush=True)
    med = lambda key, side=None: statistics.median(p[side][key] if side else p[key] for p in pairs)  # noqa: E731
    summary = {
        "pairs": args.pairs, "target_cpu_ratio": TARGET,
        "cpu_s": {"with": med("cpu", "with"), "without": med("cpu", "without")},
        "wall_s": {"with": med("wall", "with"), "without": med("wall", "without")},
        "cpu_ratio": med("cpu_ratio"), "wall_ratio": med("wall_ratio"),
        "cpu_ratio_range": [min(p["cpu_ratio"] for p in pairs), max(p["cpu_ratio"] for p in pairs)],
        "modules": {"with": pairs[0]["with"]["modules"], "without": pairs[0]["without"]["modules"]},
        "stderr_bytes": {"with": pairs[0]["with"]["stderr_bytes"], "without": pairs[0]["without"]["stderr_bytes"]},
        "cores": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "import_cost.json").write_text(json.dumps({"summary": summary, "pairs": pairs}, indent=1) + "\n")
    lines = [
        f"# `import verl` with popo-verl installed vs without ({args.pairs} pairs, A B A B, {os.cpu_count()} cores)",
        "",
        "| | with the plugin | without (VERL_USE_EXTERNAL_PLUGINS=none) | ratio (median of pairs) |",
        "|---|---|---|---|",
        f"| CPU s (median) | {summary['cpu_s']['with']:.2f} | {summary['cpu_s']['without']:.2f} | {summary['cpu_ratio']:.3f} "
        f"(range {summary['cpu_ratio_range'][0]:.3f}-{summary['cpu_ratio_range'][1]:.3f}) |",
        f"| wall s (median) | {summary['wall_s']['with']:.2f} | {summary['wall_s']['without']:.2f} | {summary['wall_ratio']:.3f} |",
        f"| modules loaded | {summary['modules']['with']} | {summary['modules']['without']} | |",
        f"| bytes on stderr | {summary['stderr_bytes']['with']} | {summary['stderr_bytes']['without']} | |",
        "",
    ]
    (RESULTS / "import_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))
    verdict = "met" if summary["cpu_ratio"] <= TARGET else "NOT met"
    print(f"import verl CPU with/without popo-verl = {summary['cpu_ratio']:.3f} (target <= {TARGET}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
