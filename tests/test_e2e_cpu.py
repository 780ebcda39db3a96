"""End to end on the CPU: `scripts/run_tiny_cpu.sh` -> `python -m verl.trainer.main_ppo` with verl's real
trainer, workers, FSDP2 engines and Ray, on the tiny task. Each run happens once per session.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from popo_verl import checkpoint
from popo_verl.tiny.summary import parse_steps

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_tiny_cpu.sh"
ROWS_PER_STEP = 8 * 8  # TRAIN_BATCH prompts x ROLLOUT_N responses (script defaults)
TAU = 0.9  # a fast EMA so three steps move the siamese measurably


def run_tiny(tmp: Path, tiny_dir: str, algo: str, *overrides: str, ranks: int = 1, steps: int = 3, save_freq: int = -1,
             test_freq: int = -1, ckpt: Path | None = None, expect_ok: bool = True, env_extra: dict | None = None,
             ctrl_c_at_step: int | None = None):
    """scripts/run_tiny_cpu.sh with small steps. ctrl_c_at_step: a terminal's Ctrl-C (SIGINT to the script's whole
    process group) once the console shows that step's line."""
    ckpt = ckpt or tmp / "ckpt"
    env = dict(os.environ)
    env.update(
        ALGO=algo, TINY_DIR=tiny_dir, N_GPUS_PER_NODE=str(ranks), TOTAL_STEPS=str(steps), SAVE_FREQ=str(save_freq),
        TEST_FREQ=str(test_freq), CKPT_DIR=str(ckpt), LOG_FILE=str(tmp / f"{algo}.log"), LR="1e-3",
        TRAIN_BATCH="8", VAL_N="1",  # small steps: these tests check the plumbing, test_learning checks learning
    )
    env.update(env_extra or {})
    log_file = Path(env["LOG_FILE"])
    before = log_file.stat().st_size if log_file.exists() else 0  # the console appends: this run's part only
    cmd = ["bash", str(SCRIPT), "trainer.val_before_train=false", *overrides]
    if ctrl_c_at_step is None:
        r = subprocess.run(cmd, cwd=str(tmp), env=env, capture_output=True, text=True, timeout=900)
    else:
        r = _interrupted(cmd, tmp, env, ctrl_c_at_step)
    # the console shows verl's step lines short; the log file keeps them whole (popo_verl/tiny/console.py)
    full = ""
    if log_file.exists():
        with open(log_file, errors="replace") as f:
            f.seek(before)
            full = f.read()
    log = r.stdout + r.stderr + full
    if expect_ok:
        assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return {"rc": r.returncode, "log": log, "stdout": r.stdout, "steps": dict(parse_steps(full)), "ckpt": ckpt}


def _interrupted(cmd: list[str], cwd: Path, env: dict, step: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            # as from a terminal: a SIGINT ignored on entry (inherited from this process once an
                            # earlier test has made it ignore SIGINT) could not be trapped by the script (POSIX)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, deadline = [], time.time() + 400
    for line in proc.stdout:
        out.append(line)
        if line.startswith(f"step {step}: "):  # the console's short step line
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.time() < deadline, "".join(out[-40:])
    out += proc.stdout.readlines()
    return subprocess.CompletedProcess(cmd, proc.wait(timeout=300), "".join(out), "")


def model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full weights from verl's FSDP2 shards (Shard(0) on every parameter)."""
    return checkpoint.full_model_state(step_dir / "actor")


def siamese_state(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return checkpoint.full_siamese_state(step_dir / "actor")


def initial_state(tiny_dir: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(os.path.join(tiny_dir, "model", "model.safetensors")).items()}


# ------------------------------------------------------------------------------------------------ GRPO
@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_dir):
    """verl's GRPO on 2 FSDP2 ranks (gloo), validated and checkpointed: one run, start-up is most of its time.
    Packed micro-batches here (the script's default is padded; the 2-rank POPO run covers that layout)."""
    tmp = tmp_path_factory.mktemp("grpo")
    return run_tiny(tmp, tiny_dir, "grpo", "actor_rollout_ref.model.use_remove_padding=true", ranks=2, steps=3,
                    save_freq=3, test_freq=3)


def test_grpo_trains_validates_and_checkpoints_on_two_ranks(grpo_run, tiny_dir):
    steps = grpo_run["steps"]
    assert sorted(steps) == [1, 2, 3]
    for s in (1, 2, 3):
        m = steps[s]
        for key in ("actor/pg_loss", "actor/grad_norm", "timing_s/gen", "timing_s/update_actor", "critic/score/mean"):
            assert key in m, (s, key)
        # the rollout generated with the weights synced after the previous update (fp32 on both sides)
        assert m["training/rollout_probs_diff_max"] < 1e-4, m["training/rollout_probs_diff_max"]
    assert any(k.startswith("val-core/tiny_arith/") for k in steps[3]), "validation after the last step"
    step3 = grpo_run["ckpt"] / "global_step_3"
    assert len(list((step3 / "actor").glob("model_world_size_2_rank_*.pt"))) == 2
    before, after = initial_state(tiny_dir), model_state(step3)
    changed = [k for k in before if not torch.allclose(before[k], after[k])]
    assert len(changed) >= len(before) // 2, "the actor's weights must have been trained"
    assert grpo_run["stdout"].rstrip().splitlines()[-1].startswith("held-out pass@1: ")  # the script's last line


# ------------------------------------------------------------------------------------------------ POPO
POPO_ARGS = (f"algorithm.popo.tau={TAU}", "algorithm.popo.kl_monitor_interval=1")
PACKED = "actor_rollout_ref.model.use_remove_padding=true"  # the script's default is padded


@pytest.fixture(scope="module")
def popo_1rank(tmp_path_factory, tiny_dir):
    """Also logs to tensorboard and to wandb (offline): test_trackers_record_popos_metrics reads them back."""
    tmp = tmp_path_factory.mktemp("popo1")
    trackers = {"LOGGER": "[console,tensorboard,wandb]", "TENSORBOARD_DIR": str(tmp / "tensorboard"),
                "WANDB_MODE": "offline", "WANDB_DIR": str(tmp)}
    out = run_tiny(tmp, tiny_dir, "popo", *POPO_ARGS, PACKED, steps=3, save_freq=1, env_extra=trackers)
    return {**out, "dir": tmp}


def test_popo_runs_through_verl(popo_1rank):
    steps = popo_1rank["steps"]
    assert sorted(steps) == [1, 2, 3]
    for s, m in steps.items():
        for key in ("popo/positive_ratio", "popo/groups_without_positive", "popo/weight_entropy", "popo/nll_loss",
                    "popo/sim_loss", "popo/cos_sim", "popo/ent_loss", "popo/drift", "popo/drift_bound",
                    "popo/kl_policy_siamese", "popo/rows_updated", "actor/pg_loss", "timing_s/update_actor", "timing_s/ref",
                    "actor/grad_norm", "popo/predictor_grad_norm", "popo/tq_rows_held"):
            assert key in m, (s, key)
        assert m["popo/kl_policy_siamese"] >= 0, "k3 is never negative"
        assert m["popo/tq_rows_held"] == ROWS_PER_STEP, "TransferQueue holds this step's rows and nothing else"
        assert m["training/rollout_probs_diff_max"] < 1e-4
        assert m["popo/ema_steps"] == s, "one optimizer step per training step here, one EMA update each"
        # (e) exactly the positives reach update_actor
        assert m["popo/rows_updated"] == round(m["popo/positive_ratio"] * ROWS_PER_STEP)
        assert 0 < m["popo/drift"] <= m["popo/drift_bound"] * 1.0001 + 1e-12


def test_trackers_record_popos_metrics(popo_1rank):
    """LOGGER=[console,tensorboard,wandb] (verl's trainer.logger): tensorboard's event file holds POPO's metrics per
    step with the values the console logged; wandb's offline run file names them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keys = ("popo/cos_sim", "popo/positive_ratio", "popo/drift", "popo/kl_policy_siamese", "actor/pg_loss",
            "timing_s/update_actor")
    events = EventAccumulator(str(popo_1rank["dir"] / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in keys:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert sorted(logged) == [1, 2, 3], key
        for step, value in logged.items():
            assert value == pytest.approx(popo_1rank["steps"][step][key], rel=1e-5, abs=1e-6), (key, step)
    (run_file,) = (popo_1rank["dir"] / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = run_file.read_bytes()  # wandb's record log (protobuf): the metric names appear verbatim
    assert all(key.encode() in recorded for key in keys), [k for k in keys if k.encode() not in recorded]


def test_siamese_is_the_ema_of_the_actor(popo_1rank, tiny_dir):
    """(b) the siamese equals an offline EMA replay of the actor's per-optimizer-step weights; (c) it never
    takes a gradient step, while the predictor does."""
    ckpt = popo_1rank["ckpt"]
    theta = [initial_state(tiny_dir)] + [model_state(ckpt / f"global_step_{s}") for s in (1, 2, 3)]
    xi = {k: v.double().clone() for k, v in theta[0].items()}
    for t in (1, 2, 3):
        for k in xi:
            xi[k] = TAU * xi[k] + (1 - TAU) * theta[t][k].double()
    siamese, state = siamese_state(ckpt / "global_step_3")
    assert state["ema_steps"] == 3
    assert set(siamese) == set(theta[0])
    for k, v in siamese.items():
        assert torch.allclose(v.double(), xi[k], atol=2e-6, rtol=1e-5), k
    moved = sum(not torch.allclose(siamese[k], theta[0][k]) for k in siamese)
    assert moved >= len(siamese) // 2, "the siamese moved away from its initial weights"
    assert any(not torch.allclose(siamese[k], theta[3][k]) for k in siamese), "the siamese lags the actor"
    pred1 = {k: v for k, v in theta[1].items() if k.startswith("popo_predictor.")}
    pred3 = {k: v for k, v in theta[3].items() if k.startswith("popo_predictor.")}
    assert pred1 and any(not torch.equal(pred1[k], pred3[k]) for k in pred1), "L_sim trains the predictor"


def resume_override(root: Path, step: int) -> str:
    return f"trainer.resume_mode=resume_path trainer.resume_from_path={root / f'global_step_{step}'}"


def test_killed_mid_step_then_while_saving_the_reruns_resume_from_the_last_complete_checkpoint_exactly(
        popo_1rank, tmp_path_factory, tiny_dir):
    """(d) From the uninterrupted run's step-2 checkpoint, the same command three times, then once more:
    1. its training worker is SIGKILLed in the middle of step 3's update (tests/kill_mid_step.py: after the optimizer
       step, before the EMA): the run ends within 60 s, non-zero, naming the lost worker and where a rerun resumes;
    2. the rerun dies in the middle of saving global_step_3, after verl's shards and halfway through POPO's siamese
       file (tests/kill_during_save.py makes the worker os._exit there: a timed SIGKILL would land anywhere). verl's
       tracker still names step 2 (it is written after every rank's save returned);
    3. resuming from the unfinished global_step_3 by path is refused by the driver before Ray starts, naming the
       missing manifest and printing the override for global_step_2;
    4. the same command resumes from step 2 again, and its step 3 equals the uninterrupted run's, feature noise
       included (seeded by the restored optimizer-step count, keyed by each row's tokens), with the siamese, the actor
       and the predictor head saved after it equal to 1e-6: the dead attempts left nothing behind, and global_step_3
       is complete. (Equality needs the same checkpoint: two fresh runs of the same command already differ by ~1e-6
       in the weights after one step, CPU kernels' run-to-run noise.)
    A truncated file behind the same refusal (resume_mode=auto picking it) is tests/test_checkpoints.py's part."""

    tmp = tmp_path_factory.mktemp("popo_killed")
    ckpt, stamp = tmp / "ckpt", tmp / "killed_at"
    ckpt.mkdir()
    for name in ("global_step_1", "global_step_2"):
        shutil.copytree(popo_1rank["ckpt"] / name, ckpt / name)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    hooks = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    lost = ("the steps after step 2 are lost; the same command resumes from there (trainer.resume_mode=auto)")

    def died_line(run):
        return [line for line in run["stdout"].splitlines() if line.startswith("a Ray worker died: WorkerDict_0:0 (pid ")]

    kill = {"VERL_USE_EXTERNAL_MODULES": "kill_mid_step", "POPO_TEST_KILL_AT_EMA_STEP": "2",
            "POPO_TEST_KILL_STAMP": str(stamp), "PYTHONPATH": hooks}
    killed = run_tiny(tmp, tiny_dir, "popo", *POPO_ARGS, PACKED, steps=3, save_freq=1, ckpt=ckpt, expect_ok=False,
                      env_extra=kill)
    ended = time.time()
    assert killed["rc"] != 0 and stamp.exists(), killed["log"][-4000:]
    assert ended - float(stamp.read_text()) < 60, "the run ends within a minute of losing its worker"
    assert not killed["steps"] and (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (ckpt / "global_step_3").exists()
    died = died_line(killed)
    assert died and died[0].endswith(lost), killed["stdout"][-3000:]

    in_save = {"VERL_USE_EXTERNAL_MODULES": "kill_during_save", "POPO_TEST_KILL_IN_SAVE": "global_step_3",
               "PYTHONPATH": hooks}
    killed = run_tiny(tmp, tiny_dir, "popo", *POPO_ARGS, PACKED, steps=3, save_freq=1, ckpt=ckpt, expect_ok=False,
                      env_extra=in_save)
    step3 = ckpt / "global_step_3" / "actor"
    siamese = "popo_siamese/rank_0_of_1.pt"
    assert killed["rc"] != 0 and (step3 / "model_world_size_1_rank_0.pt").exists(), killed["log"][-4000:]
    assert (step3 / f"{siamese}.tmp").exists() and not (step3 / siamese).exists(), "died halfway through the siamese"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    died = died_line(killed)
    assert died and died[0].endswith(lost), killed["stdout"][-3000:]

    refused = run_tiny(tmp, tiny_dir, "popo", *POPO_ARGS, PACKED, *resume_override(ckpt, 3).split(), steps=3,
                       ckpt=ckpt, expect_ok=False)
    assert refused["rc"] == 2, "an unfinished checkpoint must not be resumed from"
    assert "Started a local Ray instance" not in refused["log"], "refused by the driver, before Ray starts"
    assert f"cannot resume from checkpoint {ckpt / 'global_step_3'}: {step3}/popo_siamese/manifest_rank_0_of_1.json " \
           "is missing" in refused["log"], refused["log"][-4000:]
    override = re.search(r"^\s*(trainer\.resume_mode=resume_path trainer\.resume_from_path=\S+)$", refused["log"], re.M)
    assert override and override.group(1) == resume_override(ckpt, 2)

    out = run_tiny(tmp, tiny_dir, "popo", *POPO_ARGS, PACKED, steps=3, save_freq=1, ckpt=ckpt)
    assert sorted(out["steps"]) == [3], "the resumed run starts at step 3"
    assert (ckpt / "global_step_3" / "actor" / checkpoint.POPO_DIR).is_dir()
    assert checkpoint.problem(str(ckpt / "global_step_3" / "actor"), 0, 1) is None
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    a, b = popo_1rank["steps"][3], out["steps"][3]
    for key in ("popo/positive_ratio", "popo/rows_updated", "critic/score/mean", "popo/ema_steps"):
        assert a[key] == b[key], key
    for key in ("actor/pg_loss", "popo/nll_loss", "popo/sim_loss", "popo/drift"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    sa, _ = siamese_state(popo_1rank["ckpt"] / "global_step_3")
    sb, _ = siamese_state(ckpt / "global_step_3")
    ma, mb = model_state(popo_1rank["ckpt"] / "global_step_3"), model_state(ckpt / "global_step_3")
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k
    for k in ma:  # actor and predictor
        assert torch.allclose(ma[k], mb[k], atol=1e-6), k


def test_hf_export_drops_the_predictor(popo_1rank, tmp_path):
    """verl's model merger, through popo_verl.model_merger: an HF model without the predictor head."""
    import sys

    from transformers import AutoModelForCausalLM

    target = tmp_path / "hf"
    r = subprocess.run(
        [sys.executable, "-m", "popo_verl.model_merger", "merge", "--backend", "fsdp",
         "--local_dir", str(popo_1rank["ckpt"] / "global_step_3" / "actor"), "--target_dir", str(target)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    exported = {}
    for f in target.glob("*.safetensors"):
        exported.update(load_file(str(f)))
    assert exported and not any(k.startswith("popo_predictor.") for k in exported)
    actor = model_state(popo_1rank["ckpt"] / "global_step_3")
    for k, v in exported.items():
        assert torch.allclose(v.float(), actor[k], atol=1e-2), k  # verl's merger exports bf16
    AutoModelForCausalLM.from_pretrained(str(target))


# ------------------------------------------------------------------------------------- the ablations' options
FIRST_BATCH_ZERO = """\
import fcntl

from popo_verl.reward import compute_score as tiny_reward


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    # 0 for the first {n} calls (step 1's rollouts: validation is off), the tiny task's reward after; the count
    # is kept in a file, whatever process or thread verl's reward loop calls from
    with open({counter!r}, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("x")
        f.flush()
        calls = f.tell()
    return 0.0 if calls <= {n} else tiny_reward(data_source, solution_str, ground_truth, extra_info, **kwargs)
"""


def test_a_step_without_positives_then_the_kl_anchor_without_predictor_then_ctrl_c(tmp_path, tiny_dir):
    """One run of 40 steps (start-up is most of a run's time), stopped by Ctrl-C after step 2:
    (f) step 1's rewards are all 0: no crash, no NaN, a warning, the step logged as skipped, and the LR schedule
    still advances once per training step (a 4-step linear warm-up: lr/4 after step 1, lr/2 after step 2);
    then step 2 trains with anchor=kl (k3 KL to the siamese instead of L_sim) and predictor_layers=0 (no head),
    logging the Theorem 3.1 metrics.
    The run script's first Ctrl-C (SIGINT to its whole process group, as a terminal sends it) lets the trainer
    finish its step, save a checkpoint with the HF policy and end normally; the summary names the policy."""
    reward = tmp_path / "first_batch_zero.py"
    reward.write_text(FIRST_BATCH_ZERO.format(n=ROWS_PER_STEP, counter=str(tmp_path / "reward_calls")))
    out = run_tiny(tmp_path, tiny_dir, "popo", "actor_rollout_ref.actor.optim.lr_warmup_steps=4", "algorithm.popo.anchor=kl",
                   "algorithm.popo.predictor_layers=0", "algorithm.popo.implicit_negative_interval=1", steps=40,
                   save_freq=-1, env_extra={"REWARD_FILE": str(reward)}, ctrl_c_at_step=2)
    text = out["stdout"]
    stopped = [int(s) for s in re.findall(r"stop requested: checkpoint saved at step (\d+)", text)]
    # say whether the script took the Ctrl-C, to tell a lost signal from a missed stop
    took = "Ctrl-C: stopping after this step" in text
    assert len(stopped) == 1 and 2 <= stopped[0] < 40, (
        f"script acknowledged the Ctrl-C: {took}; stop file present: {any(tmp_path.glob('runs/*/*/stop_requested'))}"
        f"\n{text[-3000:]}")
    stop = stopped[0]
    hf = out["ckpt"] / f"global_step_{stop}" / "actor" / "huggingface"
    assert any(hf.glob("*.safetensors")), f"no HF policy in {hf}"
    assert (out["ckpt"] / "latest_checkpointed_iteration.txt").read_text().strip() == str(stop)
    lines = text.rstrip().splitlines()
    assert f"policy at step {stop}: {hf}" in lines
    assert any(line.startswith(f"evaluate it: python -m popo_verl.evaluate --preset tiny --model {hf}") for line in lines)

    steps = out["steps"]
    assert sorted(steps) == list(range(1, stop + 1))
    for s, m in steps.items():
        if s <= 4:  # the warm-up's steps
            assert m["actor/lr"] == pytest.approx(1e-3 * s / 4, rel=1e-6), m["actor/lr"]
        assert all(v == v for v in m.values()), f"NaN in step {s}'s metrics"
    first, second = steps[1], steps[2]
    assert first["popo/positive_ratio"] == 0 and first["popo/skipped_step"] == 1 and first["popo/rows_updated"] == 0
    assert "no positive rollout" in out["log"]
    assert second["popo/positive_ratio"] > 0 and second["popo/skipped_step"] == 0
    assert second["popo/kl_loss"] >= 0 and "popo/sim_loss" not in second
    # one step's sign is noise here (tests/test_learning.py checks the averages over a learning run)
    assert abs(second["popo/pos_logprob_delta"]) < 1 and abs(second["popo/neg_logprob_delta"]) < 1
    # no predictor head anywhere in the actor's weights, and the actor trained
    state, initial = model_state(out["ckpt"] / f"global_step_{stop}"), initial_state(tiny_dir)
    assert not [k for k in state if "popo_predictor" in k]
    assert any(not torch.equal(v, initial[k]) for k, v in state.items() if k in initial)
