"""POPO on a real two-node Ray cluster: `ray start --head` and a second `ray start --address`, each node with its own
CPUs and one GPU slot, on this machine; the tiny task trains with trainer.nnodes=2 trainer.n_gpus_per_node=1 (two
FSDP2 ranks, one per node), checkpoints, and resumes on the same cluster.

Ray 2.60 turns token authentication on for local clusters; a second `ray start` on the same machine then fails with
`AuthenticationError: InvalidAuthToken` unless the token reaches it. The fixture runs the cluster with
RAY_AUTH_MODE=disabled (the README's multi-node section says what a real cluster does instead).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_e2e_cpu import run_tiny

pytestmark = pytest.mark.e2e


#: the `ray` command of this interpreter's environment
RAY = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(*args: str, env: dict) -> None:
    r = subprocess.run([RAY, "start", "--disable-usage-stats", "--num-cpus=8", "--num-gpus=1", *args],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def _cluster_pids(temp_dir: str) -> list[int]:
    """The cluster's processes (GCS, raylets, monitors): their command lines name its temp dir. `ray stop` would stop
    every Ray on the machine, a parallel test's too."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


@pytest.fixture(scope="module")
def two_nodes():
    # short, under /tmp: Ray's socket paths (temp dir + session + sockets/plasma_store) must fit 107 characters, which
    # pytest's own temp dirs under xdist (/tmp/pytest-of-root/pytest-N/popen-gwK/...) do not leave room for
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = _free_port()
    _ray_start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}", env=env)
    try:
        _ray_start(f"--address=127.0.0.1:{port}", env=env)
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled"}
    finally:
        for pid in _cluster_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _manifests(ckpt: Path, step: int) -> list[dict]:
    folder = ckpt / f"global_step_{step}" / "actor" / "popo_siamese"
    return [json.loads((folder / f"manifest_rank_{r}_of_2.json").read_text()) for r in range(2)]


def test_popo_trains_checkpoints_and_resumes_on_two_ray_nodes(two_nodes, tmp_path, tiny_dir):
    ckpt = tmp_path / "ckpt"
    multi = ("trainer.nnodes=2",)
    first = run_tiny(tmp_path, tiny_dir, "popo", *multi, steps=2, save_freq=2, ckpt=ckpt,
                     env_extra={**two_nodes, "NNODES": "2", "N_GPUS_PER_NODE": "1"})
    assert sorted(first["steps"]) == [1, 2]
    saved = _manifests(ckpt, 2)
    # each rank wrote its own siamese shard and head/optimizer shards, on its own Ray node
    assert {m["written_by"]["ray_node"] for m in saved} and len({m["written_by"]["ray_node"] for m in saved}) == 2
    for r, m in enumerate(saved):
        assert f"popo_siamese/rank_{r}_of_2.pt" in m["files"] and f"model_world_size_2_rank_{r}.pt" in m["files"]
        assert f"optim_world_size_2_rank_{r}.pt" in m["files"]

    resumed = run_tiny(tmp_path, tiny_dir, "popo", *multi, "trainer.total_training_steps=3", steps=3, save_freq=3,
                       ckpt=ckpt, env_extra={**two_nodes, "NNODES": "2", "N_GPUS_PER_NODE": "1"})
    assert sorted(resumed["steps"]) == [3], "the rerun resumes after step 2 and trains step 3 only"
    # the siamese's EMA state came back on both ranks: its step count goes on from the saved run's
    assert resumed["steps"][3]["popo/ema_steps"] > first["steps"][2]["popo/ema_steps"] > 0
    assert "no siamese state" not in resumed["log"]
    assert len({m["written_by"]["ray_node"] for m in _manifests(ckpt, 3)}) == 2
