"""POPO on a real two-node Ray cluster: `ray start --head` and a second `ray start --address`, each node with its own
CPUs and one GPU slot, on this machine; the tiny task trains with trainer.nnodes=2 trainer.n_gpus_per_node=1 (two
FSDP2 ranks, one per node) and checkpoints; the head's GCS is killed mid-step, the run stops with that step saved;
the same command resumes on a new cluster. The same two-rank runs cover the padded layout with padding rows and
positive-aware dynamic sampling (one 2-rank POPO run in the suite, not two).

Ray 2.60 turns token authentication on for local clusters; a second `ray start` on the same machine then fails with
`AuthenticationError: InvalidAuthToken` unless the token reaches it. The fixture runs the cluster with
RAY_AUTH_MODE=disabled (the README's multi-node section says what a real cluster does instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from test_e2e_cpu import POPO_ARGS, ROWS_PER_STEP, model_state, run_tiny, siamese_state

from popo_verl import checkpoint

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


class Cluster:
    """A head and a second node, `ray start` each, 8 CPUs and one GPU slot apiece. Its processes' command lines name
    its temp dir, so they are found and killed without `ray stop`, which would stop every Ray on the machine."""

    def __init__(self):
        # short, under /tmp: Ray's socket paths (temp dir + session + sockets/plasma_store) must fit 107 characters,
        # which pytest's own temp dirs under xdist (/tmp/pytest-of-root/pytest-N/popen-gwK/...) do not leave room for
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.env: dict[str, str] = {}

    def start(self) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        port = _free_port()
        _ray_start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}", env=env)
        _ray_start(f"--address=127.0.0.1:{port}", env=env)
        self.env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled"}

    def kill(self, name: str = "") -> list[int]:
        """SIGKILL the cluster's processes whose command line holds `name` (all of them by default)."""
        killed = []
        for pid in _cluster_pids(self.temp_dir):
            try:
                if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            except (OSError, ProcessLookupError):
                pass
        return killed

    def restart(self) -> None:
        self.kill()
        time.sleep(1)
        self.start()


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster()
    try:
        cluster.start()  # in the try: a second node that fails to start must not leave the head running
        yield cluster
    finally:
        cluster.kill()
        time.sleep(1)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _manifests(ckpt: Path, step: int) -> list[dict]:
    folder = ckpt / f"global_step_{step}" / "actor" / "popo_siamese"
    return [json.loads((folder / f"manifest_rank_{r}_of_2.json").read_text()) for r in range(2)]


EVEN_PROMPTS_WRONG = """\
from popo_verl.reward import compute_score as tiny_reward


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    # every response to an even-numbered prompt is wrong: about half the groups have no positive
    wrong = int(extra_info["index"]) % 2 == 0
    return 0.0 if wrong else tiny_reward(data_source, solution_str, ground_truth, extra_info, **kwargs)
"""
ROUNDS = 3


def _check_dynamic_sampling_and_padding(steps: dict) -> None:
    """Positive-aware dynamic sampling with K = the batch's 8 groups, under a reward that fails every response to half
    of the prompts: the groups without a positive are regenerated, within max_gen_rounds x 8 prompts per step. The
    padded layout (use_remove_padding=false; the 1-rank runs cover the packed one) with micro-batches of 4 rows: a
    rank's positives are padded up to a multiple of 4 whenever their count is not one of dp x 4 = 8."""
    budget = (ROUNDS - 1) * 8 // 2  # groups regenerated at most: 2 new prompts each, (rounds - 1) x 8 prompts
    for m in steps.values():
        assert 1 <= m["popo/gen_rounds"] <= ROUNDS
        # 2 new prompts per regenerated group, less the ones still owed when the batch filled up
        assert 1 + (m["popo/groups_regenerated"] > 0) / 8 <= m["popo/gen_rounds"] <= 1 + 2 * m["popo/groups_regenerated"] / 8
        assert m["popo/groups_regenerated"] <= budget
        # the batch holds 8 groups with a positive, unless the budget ran out first
        assert m["popo/groups_without_positive"] == 0 or m["popo/groups_regenerated"] == budget, m
        assert m["training/rollout_probs_diff_max"] < 1e-4, "padded forward gives the rollout's log-probs"
        assert m["popo/rows_updated"] == round(m["popo/positive_ratio"] * ROWS_PER_STEP)
        # the update batch's padding rows were cleared: no row of an earlier step stays in TransferQueue
        assert m["popo/tq_rows_held"] == ROWS_PER_STEP, m["popo/tq_rows_held"]
        assert m["popo/skipped_step"] == 1 or -1 <= m["popo/cos_sim"] <= 1
    # a round of 8 prompts without an even-numbered one has odds 1/256: some step regenerated groups
    assert any(m["popo/groups_regenerated"] > 0 for m in steps.values())
    assert any(m["popo/rows_updated"] % 8 for m in steps.values()), "padding rows at dp = 2 in some step"


def _kill_the_gcs_after_step(cluster: Cluster, tracker: Path, step: int, when: dict) -> None:
    """Kill the head's GCS as soon as verl's checkpoint tracker reads `step` (a poll every 0.1 s): mid next step."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if tracker.read_text().strip() == str(step):
                break
        except OSError:
            pass
        time.sleep(0.1)
    when["pids"] = cluster.kill("gcs_server")
    when["at"] = time.monotonic()


def test_popo_on_two_ray_nodes_stops_saved_when_the_head_dies_and_resumes_on_a_new_cluster(two_nodes, tmp_path,
                                                                                          tiny_dir):
    """Two FSDP2 ranks, one per Ray node. The head's GCS is killed (SIGKILL) during step 3, after step 2's
    checkpoint: the trainer, asking the GCS after each step (POPO_RAY_HEAD_TIMEOUT_S), saves the step it is in and
    ends the run with a message that names the head, well within Ray's own 60 s. On a new cluster the same command
    resumes from that step, the siamese and head shards back on both ranks."""
    ckpt = tmp_path / "ckpt"
    reward = tmp_path / "even_prompts_wrong.py"
    reward.write_text(EVEN_PROMPTS_WRONG)
    args = (*POPO_ARGS, "trainer.nnodes=2", "actor_rollout_ref.model.use_remove_padding=false",
            "algorithm.popo.min_groups_with_positive=8", f"algorithm.popo.max_gen_rounds={ROUNDS}")
    env = {"NNODES": "2", "N_GPUS_PER_NODE": "1", "MICRO": "4", "REWARD_FILE": str(reward),
           "POPO_RAY_HEAD_TIMEOUT_S": "5"}
    killed: dict = {}
    killer = threading.Thread(target=_kill_the_gcs_after_step,
                              args=(two_nodes, ckpt / "latest_checkpointed_iteration.txt", 2, killed), daemon=True)
    killer.start()
    first = run_tiny(tmp_path, tiny_dir, "popo", *args, steps=4, save_freq=2, ckpt=ckpt, expect_ok=False,
                     env_extra={**two_nodes.env, **env})
    ended = time.monotonic()
    killer.join(timeout=5)
    assert killed.get("pids"), "the head's GCS was found and killed"
    assert first["rc"] == 1, first["log"][-4000:]
    assert ended - killed["at"] < 60, "the run ends within a minute of the head's death"
    assert "Failed to connect to GCS" not in first["log"], "POPO's stop ended the run, not Ray's own timeout"
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved in (2, 3), saved  # the step the GCS died in (3), or 2 if it died before step 2's own check
    lines = first["stdout"].rstrip().splitlines()
    port = two_nodes.env["RAY_ADDRESS"].rsplit(":", 1)[1]  # the GCS names itself by the node's IP, not 127.0.0.1
    said = re.compile(rf"RuntimeError: popo-verl: the Ray head stopped answering \(its GCS at \S+:{port} gave no "
                      rf"reply in 5 s\) after step {saved}: checkpoint saved at step {saved}")
    assert any(said.match(line) for line in lines[-12:]), "\n".join(lines[-12:])
    # the summary says it last, before the failure line
    assert re.match(rf"the Ray head stopped answering \(its GCS at \S+:{port} .*\): the run stopped after step "
                    rf"{saved}, saved; .* resumes from step {saved} \(trainer.resume_mode=auto\)$", lines[-2]), lines[-2]
    for r, m in enumerate(_manifests(ckpt, saved)):
        assert checkpoint.problem(str(ckpt / f"global_step_{saved}" / "actor"), r, 2) is None
    # each rank wrote its own siamese shard and head/optimizer shards, on its own Ray node
    for step in (2, saved):
        written = _manifests(ckpt, step)
        assert len({m["written_by"]["ray_node"] for m in written}) == 2
        for r, m in enumerate(written):
            assert f"popo_siamese/rank_{r}_of_2.pt" in m["files"] and f"model_world_size_2_rank_{r}.pt" in m["files"]
            assert f"optim_world_size_2_rank_{r}.pt" in m["files"]

    two_nodes.restart()
    resumed = run_tiny(tmp_path, tiny_dir, "popo", *args, steps=4, save_freq=2, ckpt=ckpt,
                       env_extra={**two_nodes.env, **env})
    assert sorted(resumed["steps"]) == list(range(saved + 1, 5)), "the rerun resumes after the saved step"
    # the siamese's EMA state came back on both ranks: its step count goes on from the saved step
    assert resumed["steps"][saved + 1]["popo/ema_steps"] == saved + 1
    assert "no siamese state" not in resumed["log"]
    assert len({m["written_by"]["ray_node"] for m in _manifests(ckpt, 4)}) == 2
    _check_dynamic_sampling_and_padding({**first["steps"], **resumed["steps"]})
    siamese, state = siamese_state(ckpt / "global_step_4")
    actor = model_state(ckpt / "global_step_4")
    assert state["ema_steps"] == 4
    assert any(not torch.allclose(siamese[k], actor[k]) for k in siamese)
