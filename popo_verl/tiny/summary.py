"""Summarise a verl run from its console log (and validation dumps): what was trained, where the policy is, and
held-out pass@1 start -> end. `python -m popo_verl.tiny.summary LOG [--validation-dir DIR] [--checkpoint-dir DIR]`

The last line is `held-out pass@1: START -> END (N steps)`. Held-out pass@1 is the share of correct samples,
where a sample is correct when the reward function reports `acc` >= 1 or, if it reports none, when its
reward equals the verifier's correct score (1.0): a graded reward's partial credit never counts as correct.
It is read from verl's validation dumps (`trainer.validation_data_dir`, one `<step>.jsonl` per validation);
without them, from verl's logged `val-core/<source>/acc/mean@N`, which is the mean *reward* unless the reward
function reports `acc`, and the summary says so. Stdlib only, so that it runs at once.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from popo_verl.resume import nothing_left_message, tracked_step

CORRECT_SCORE = 1.0

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


def is_correct(sample: dict) -> bool:
    """A dumped validation sample is correct when its `acc` (else its reward) reaches the correct score."""
    value = sample.get("acc", sample.get("score"))
    try:
        return float(value) >= CORRECT_SCORE
    except (TypeError, ValueError):
        return False


def correctness_curves(validation_dir) -> tuple[dict[int, float], dict[int, float], int]:
    """From verl's validation dumps: ({step: pass@1}, {step: pass@n}, n), n the samples per prompt."""
    pass1, passn, n = {}, {}, 0
    for path in sorted(Path(validation_dir).glob("*.jsonl"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        if not path.stem.isdigit():
            continue
        by_prompt: dict[str, list[bool]] = {}
        with open(path, errors="replace") as f:
            for line in f:
                if line.strip():
                    sample = json.loads(line)
                    by_prompt.setdefault(sample.get("input", ""), []).append(is_correct(sample))
        if not by_prompt:
            continue
        flags = [c for v in by_prompt.values() for c in v]
        step = int(path.stem)
        pass1[step] = sum(flags) / len(flags)
        passn[step] = sum(map(any, by_prompt.values())) / len(by_prompt)
        n = max(n, max(map(len, by_prompt.values())))
    return pass1, passn, n


def latest_policy(checkpoint_dir) -> tuple[int, Path] | None:
    """(step, path) of the newest saved policy in HF format under a verl checkpoint directory."""
    found = []
    # FSDP saves the HF weights in actor/huggingface, Megatron in actor/model/huggingface
    for d in [*Path(checkpoint_dir).glob("global_step_*/actor/huggingface"),
              *Path(checkpoint_dir).glob("global_step_*/actor/model/huggingface")]:
        m = re.search(r"global_step_(\d+)", str(d))
        if m and any(d.glob("*.safetensors")):
            found.append((int(m.group(1)), d))
    return max(found) if found else None


NO_STEP = "no training step was logged: see the errors above or in the full log"


_ACTOR_DIED = re.compile(r"ray\.exceptions\.ActorDiedError:.*?\bpid: (\d+)\s+name: (\S+)"
                         r"(?:.*?Worker exit detail: ([^.\n]+))?", re.S)
_VERL_WORKER = re.compile(r"WorkerDict_\d+:\d+")  # verl's colocated actor/rollout/ref worker, after Ray's random prefix


def lost_worker(text: str, checkpoint_dir=None) -> str | None:
    """One line for a run that ended because a Ray worker died (killed, out of memory, a crash in native code):
    which one, what Ray says of it, and where a rerun resumes; None when no worker died."""
    died = _ACTOR_DIED.search(text)
    if not died:
        return None
    pid, name, detail = died.groups()
    verl_worker = _VERL_WORKER.search(name)
    name = verl_worker.group(0) if verl_worker else name
    why = f": {detail.strip()}" if detail else ""
    if checkpoint_dir is None:
        return f"a Ray worker died: {name} (pid {pid}){why}"
    return f"a Ray worker died: {name} (pid {pid}){why}; {_rerun(checkpoint_dir)}"


def _rerun(checkpoint_dir, first: str = "") -> str:
    """Where the same command goes on after a run that died: from the last complete checkpoint, or from the start.
    first: what must happen before it (the cluster back up)."""
    saved = tracked_step(checkpoint_dir) if checkpoint_dir is not None else None
    return (f"the steps after step {saved} are lost; {first}the same command resumes from there "
            "(trainer.resume_mode=auto)" if saved else "no checkpoint was saved yet: the same command starts over")


_HEAD_STOPPED = re.compile(r"popo-verl: the Ray head stopped answering \((.*?)\) after step (\d+)")
_GCS_FATAL = re.compile(r"Failed to connect to GCS within (\d+) seconds")
_UNSEEN = "the step lines after it went did not reach this console (Ray forwards them through the head)"


def lost_head(text: str, checkpoint_dir=None) -> str | None:
    """One line for a run that ended because the Ray head's GCS stopped answering: POPO's stop after a step, with
    that step saved (popo_verl/stop.py), or Ray's own end of every process a minute later, the steps since the last
    checkpoint lost. None when the head did not go."""
    stopped = _HEAD_STOPPED.search(text)
    if stopped:
        why, step = stopped.groups()
        return (f"the Ray head stopped answering ({why}): the run stopped after step {step}, saved; {_UNSEEN}; once "
                f"the cluster is up again, the same command resumes from step {step} (trainer.resume_mode=auto)")
    fatal = _GCS_FATAL.search(text)
    if not fatal:
        return None
    again = _rerun(checkpoint_dir, "once the cluster is up again, ")
    return f"the Ray head stopped answering and Ray ended the run {fatal.group(1)} s later; {_UNSEEN}; {again}"


def _training_steps(steps) -> list[tuple[int, dict[str, float]]]:
    return [(s, m) for s, m in steps if "training/global_step" in m]


def report(text: str, log_name: str, validation_dir=None, checkpoint_dir=None, test_data=None,
           exit_status: int = 0) -> list[str]:
    """The summary's lines (the last one is the held-out pass@1 line, or why there is none; after a failed run,
    the failure)."""
    lines = _report(text, log_name, validation_dir, checkpoint_dir, test_data, exit_status)
    if exit_status:
        if lines[-1] == NO_STEP:
            lines.pop()
            failed = f"the run FAILED (exit status {exit_status}) before its first training step: its error is " \
                     f"above and in {log_name}"
        else:
            failed = f"the run FAILED (exit status {exit_status}): its error is above and in {log_name}"
        died = lost_head(text, checkpoint_dir) or lost_worker(text, checkpoint_dir)
        lines += [died, failed] if died else [failed]
    return lines


def _report(text: str, log_name: str, validation_dir=None, checkpoint_dir=None, test_data=None,
            exit_status: int = 0) -> list[str]:
    steps = parse_steps(text)
    train = _training_steps(steps)
    lines = [f"full log: {log_name}"]
    if not train:
        saved = tracked_step(checkpoint_dir) if checkpoint_dir is not None else None
        # a run that ended well without a step: verl resumed from a checkpoint at or past the last step (a failure
        # is told by the exit status, not by words in the log: warnings name harmless ...Error classes too)
        if saved is not None and not exit_status and "Traceback (most recent call last)" not in text:
            lines.append(nothing_left_message(checkpoint_dir, saved, "no step was trained in this run"))
        else:
            lines.append(NO_STEP)
        return lines
    first, last = min(s for s, _ in train), max(s for s, _ in train)
    trained = len({s for s, _ in train})
    where = f"resumed at step {first - 1}, trained {trained} steps in this run" if first > 1 else f"trained {trained} steps"
    times = sorted(m["timing_s/step"] for _, m in train if math.isfinite(m.get("timing_s/step", math.nan)))
    lines.append(where + (f"; median step {times[len(times) // 2]:.1f} s" if times else ""))
    skipped = sum(1 for _, m in train if m.get("popo/skipped_step", 0.0) >= 1.0)
    if skipped == trained:
        lines.append(f"{trained} steps, all skipped: no positive rollout (POPO learns from correct responses only)")
    elif skipped:
        lines.append(f"{skipped} of {trained} steps skipped: no positive rollout")
    if checkpoint_dir is not None:
        policy = latest_policy(checkpoint_dir)
        if policy is None:
            lines.append(f"no policy saved under {checkpoint_dir} (trainer.save_freq > 0 saves one)")
        else:
            step, path = policy
            data = f" --data {test_data}" if test_data else " --data <verl parquet>"
            lines.append(f"policy at step {step}: {path}")
            # the protocol the run validated with (avg@8 at temperature 1, 32 new tokens): its pass@1, in ~1 min
            lines.append(f"evaluate it: python -m popo_verl.evaluate --preset tiny --model {path}{data}")

    pass1, passn, n = correctness_curves(validation_dir) if validation_dir else ({}, {}, 0)
    source = "correct samples"
    if not pass1:
        curve, best = held_out_curve(steps), held_out_best_of_n(steps)
        if curve is None:
            lines.append("held-out pass@1: not measured (set trainer.test_freq > 0)")
            return lines
        pass1 = curve[1]
        n, passn = best if best else (0, {})
        if curve[0].split("/")[-2] == "reward":
            source = "verl's mean reward: the reward function reports no acc"
    if passn:
        a, b = min(passn), max(passn)
        lines.append(f"held-out pass@{n}: {passn[a]:.3f} -> {passn[b]:.3f}")
    a, b = min(pass1), max(pass1)
    if source != "correct samples":
        lines.append(f"(held-out pass@1 below is {source})")
    after = f"; not measured after step {b}, the run trained to step {last}" if last > b else ""
    if b == a:
        lines.append(f"held-out pass@1: {pass1[a]:.3f} at step {a} (no later validation{after})")
    else:
        lines.append(f"held-out pass@1: {pass1[a]:.3f} -> {pass1[b]:.3f} ({b - a} steps{after})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.tiny.summary", description=__doc__.splitlines()[0])
    ap.add_argument("log", help="the run's full console log")
    ap.add_argument("--validation-dir", default=None, help="verl's trainer.validation_data_dir of the run")
    ap.add_argument("--checkpoint-dir", default=None, help="verl's trainer.default_local_dir of the run")
    ap.add_argument("--test-data", default=None, help="held-out parquet, shown in the evaluate command")
    ap.add_argument("--exit-status", type=int, default=0, help="the trainer's exit status (non-zero: said last)")
    args = ap.parse_args(argv)
    try:
        with open(args.log, errors="replace") as f:
            text = f.read()
    except OSError as e:
        print(f"cannot read the log {args.log}: {e}", file=sys.stderr)
        return 2
    lines = report(text, args.log, args.validation_dir, args.checkpoint_dir, args.test_data, args.exit_status)
    print("\n".join(lines))
    return 0 if _training_steps(parse_steps(text)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
