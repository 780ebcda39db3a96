"""End to end on the CPU: `scripts/run_tiny_cpu.sh` -> `python -m verl.trainer.main_ppo` with verl's real
trainer, workers, FSDP2 engines and Ray, on the tiny task. Each run happens once per session.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from popo_verl.tiny.summary import parse_steps

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_tiny_cpu.sh"
ROWS_PER_STEP = 8 * 8  # TRAIN_BATCH prompts x ROLLOUT_N responses (script defaults)
TAU = 0.9  # a fast EMA so three steps move the siamese measurably


def run_tiny(tmp: Path, tiny_dir: str, algo: str, *overrides: str, ranks: int = 1, steps: int = 3, save_freq: int = -1,
             test_freq: int = -1, ckpt: Path | None = None, expect_ok: bool = True, env_extra: dict | None = None):
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
    r = subprocess.run(
        ["bash", str(SCRIPT), "trainer.val_before_train=false", *overrides],
        cwd=str(tmp), env=env, capture_output=True, text=True, timeout=900,
    )
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


def model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full weights from verl's FSDP2 shards (Shard(0) on every parameter)."""
    files = sorted(glob.glob(str(step_dir / "actor" / "model_world_size_*_rank_*.pt")), key=lambda f: int(f.rsplit("_", 1)[1][:-3]))
    shards = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    return {k: torch.cat([getattr(s[k], "_local_tensor", s[k]).float() for s in shards], dim=0) for k in shards[0]}


def siamese_state(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    files = sorted(glob.glob(str(step_dir / "actor" / "popo_siamese" / "rank_*_of_*.pt")), key=lambda f: int(Path(f).name.split("_")[1]))
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    full = {k: torch.cat([s["siamese"][k].float() for s in states], dim=0) for k in states[0]["siamese"]}
    return full, states[0]


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


EVEN_PROMPTS_WRONG = """\
from popo_verl.reward import compute_score as tiny_reward


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    # every response to an even-numbered prompt is wrong: about half the groups have no positive
    wrong = int(extra_info["index"]) % 2 == 0
    return 0.0 if wrong else tiny_reward(data_source, solution_str, ground_truth, extra_info, **kwargs)
"""
ROUNDS = 3


def test_popo_with_two_fsdp2_ranks_padded_micro_batches_and_dynamic_sampling(tmp_path_factory, tiny_dir):
    """2 ranks, and the padded layout (use_remove_padding=false; the 1-rank runs cover the packed one).
    Positive-aware dynamic sampling (algorithm.popo.min_groups_with_positive = the batch's 8 groups) under a reward
    that fails every response to half of the prompts: the groups without a positive are regenerated, within
    max_gen_rounds x 8 prompts per step."""
    tmp = tmp_path_factory.mktemp("popo2")
    reward = tmp / "even_prompts_wrong.py"
    reward.write_text(EVEN_PROMPTS_WRONG)
    # micro-batches of 4 rows (verl's log-prob passes need the 32 rows of a rank to divide): a rank's positives are
    # padded up to a multiple of 4 whenever their count is not one of dp x 4 = 8, so the padding rows do not hang on
    # an odd positive count alone (the samples of a loaded machine vary)
    out = run_tiny(tmp, tiny_dir, "popo", *POPO_ARGS, "actor_rollout_ref.model.use_remove_padding=false",
                   "algorithm.popo.min_groups_with_positive=8", f"algorithm.popo.max_gen_rounds={ROUNDS}",
                   ranks=2, steps=3, save_freq=3, env_extra={"MICRO": "4", "REWARD_FILE": str(reward)})
    assert sorted(out["steps"]) == [1, 2, 3]
    budget = (ROUNDS - 1) * 8 // 2  # groups regenerated at most: 2 new prompts each, (rounds - 1) x 8 prompts
    for m in out["steps"].values():
        assert 1 <= m["popo/gen_rounds"] <= ROUNDS
        # 2 new prompts per regenerated group, less the ones still owed when the batch filled up
        assert 1 + (m["popo/groups_regenerated"] > 0) / 8 <= m["popo/gen_rounds"] <= 1 + 2 * m["popo/groups_regenerated"] / 8
        assert m["popo/groups_regenerated"] <= budget
        # the batch holds 8 groups with a positive, unless the budget ran out first
        assert m["popo/groups_without_positive"] == 0 or m["popo/groups_regenerated"] == budget, m
    # a round of 8 prompts without an even-numbered one has odds 1/256: some step regenerated groups
    assert any(m["popo/groups_regenerated"] > 0 for m in out["steps"].values())
    assert any(m["popo/rows_updated"] % 8 for m in out["steps"].values()), "padding rows at dp = 2 in some step"
    for m in out["steps"].values():
        assert m["training/rollout_probs_diff_max"] < 1e-4, "padded forward gives the rollout's log-probs"
        assert m["popo/rows_updated"] == round(m["popo/positive_ratio"] * ROWS_PER_STEP)
        # the update batch's padding rows were cleared: no row of an earlier step stays in TransferQueue
        assert m["popo/tq_rows_held"] == ROWS_PER_STEP, m["popo/tq_rows_held"]
        assert m["popo/skipped_step"] == 1 or -1 <= m["popo/cos_sim"] <= 1
    siamese, state = siamese_state(out["ckpt"] / "global_step_3")
    actor = model_state(out["ckpt"] / "global_step_3")
    assert state["ema_steps"] == 3
    assert any(not torch.allclose(siamese[k], actor[k]) for k in siamese)


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
    from popo_verl import checkpoint

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
    assert checkpoint.problem(str(ckpt / "global_step_3"), 0, 1) is None
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


def test_a_step_without_positives_then_the_kl_anchor_without_predictor(tmp_path, tiny_dir):
    """Two steps of one run (start-up is most of a run's time):
    (f) step 1's rewards are all 0: no crash, no NaN, a warning, the step logged as skipped, and the LR schedule
    still advances once per training step (a 4-step linear warm-up: lr/4 after step 1, lr/2 after step 2);
    then step 2 trains with anchor=kl (k3 KL to the siamese instead of L_sim) and predictor_layers=0 (no head),
    logging the Theorem 3.1 metrics."""
    reward = tmp_path / "first_batch_zero.py"
    reward.write_text(FIRST_BATCH_ZERO.format(n=ROWS_PER_STEP, counter=str(tmp_path / "reward_calls")))
    out = run_tiny(tmp_path, tiny_dir, "popo", "actor_rollout_ref.actor.optim.lr_warmup_steps=4", "algorithm.popo.anchor=kl",
                   "algorithm.popo.predictor_layers=0", "algorithm.popo.implicit_negative_interval=1", steps=2,
                   save_freq=2, env_extra={"REWARD_FILE": str(reward)})
    steps = out["steps"]
    assert sorted(steps) == [1, 2]
    for s, m in steps.items():
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
    state, initial = model_state(out["ckpt"] / "global_step_2"), initial_state(tiny_dir)
    assert not [k for k in state if "popo_predictor" in k]
    assert any(not torch.equal(v, initial[k]) for k, v in state.items() if k in initial)
