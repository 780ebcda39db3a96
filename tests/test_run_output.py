"""What a user of the run scripts sees: the console view of verl's output, the run summary, early config errors."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popo_verl.tiny import console, summary

ROOT = Path(__file__).resolve().parents[1]
RAY = "\x1b[36m(TaskRunnerV1 pid=2873)\x1b[0m "


def _step(n: int, **metrics) -> str:
    pairs = " - ".join(f"{k}:{v}" for k, v in {"training/global_step": n, "timing_s/step": 2.5, **metrics}.items())
    return f"{RAY}step:{n} - {pairs}\n"


# ------------------------------------------------------------------------------------------ console view
class Terminal(io.StringIO):
    def isatty(self):
        return True


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _view(lines: list[str], out=None) -> tuple[str, str]:
    """(the log file, the console) of `lines`; the console a terminal unless `out` is given."""
    log, out = io.StringIO(), Terminal() if out is None else out
    console.filter_stream(lines, log, out, "/runs/x/train.log")
    return log.getvalue(), out.getvalue()


def test_colour_codes_reach_a_terminal_only_and_transfer_queue_statistics_the_log_only():
    storage = "\x1b[36m(SimpleStorageUnit pid=9)\x1b[0m "
    stats = [f"{storage}storage_unit: [Performance] Total success requests: 52, Total req/min: 10.40, Total avg "
             "process time: 0.0010s; \n", f"{storage}Time range: last 5.00 minutes; \n",
             f"{storage}Per-operation statistics: put: req_count=26, req/min=5.20, avg_time=0.001s\n"]
    lines = [*stats, _step(1)]
    log, captured = _view([*lines, f"{RAY}\x1b[33mWARNING\x1b[0m x\n"], out=io.StringIO())
    assert captured == "step 1: step_s 2.5\n(TaskRunnerV1 pid=2873) WARNING x\n"
    assert "\x1b" not in log and log.startswith(plain("".join(lines)))
    assert _view(lines)[1] == "step 1: step_s 2.5\n" and _view([f"{RAY}\x1b[33mW\x1b[0m\n"])[1] == f"{RAY}\x1b[33mW\x1b[0m\n"


def test_the_console_shows_verls_step_line_short_and_the_log_keeps_it_whole():
    step = _step(20, **{"critic/rewards/mean": "np.float64(0.40625)", "popo/positive_ratio": 0.328,
                        "popo/cos_sim": 0.9123, "actor/entropy": 0.8534, "actor/lr": 0.000987,
                        "val-core/tiny_arith/acc/mean@8": "np.float64(0.451)",
                        **{f"perf/other_{i}": i for i in range(200)}})
    log, out = _view([step])
    assert log == plain(step) and len(step) > 3000
    assert out == ("step 20: reward 0.406, positives 0.328, cos_sim 0.912, entropy 0.853, lr 9.87e-04, step_s 2.5, "
                   "held-out pass@1 0.451 (tiny_arith, 8 samples each)\n")
    assert summary.parse_steps(log)[0][1]["popo/cos_sim"] == pytest.approx(0.9123)  # the tools read the log file
    assert summary.parse_steps(out) == []
    full = io.StringIO()
    console.filter_stream([step], io.StringIO(), full, "x", full_steps=True)  # POPO_CONSOLE_FULL_STEPS=1
    assert full.getvalue() == plain(step)


def test_console_collapses_the_config_dump_and_keeps_everything_in_the_log():
    dump = [f"{RAY}{{'actor_rollout_ref': {{'actor': {{\n"] + [f"{RAY}                  'key_{i}': {i},\n" for i in range(40)]
    lines = ["ray init kwargs: {...}\n", *dump, f"{RAY}INFO: actor and ref model engine initialized\n", _step(1)]
    log, out = _view(lines)
    assert log == plain("".join(lines))
    assert out.splitlines() == ["ray init kwargs: {...}", "[configuration: 41 lines, in /runs/x/train.log]",
                                f"{RAY}INFO: actor and ref model engine initialized", "step 1: step_s 2.5"]


def test_console_keeps_a_dump_that_ray_cut_mid_line_collapsed():
    """Ray's log monitor cuts a pretty-printed line where it read the worker's unbuffered stdout mid-line: the
    pieces come unindented (`'nsys': {...`, `: `, `'popo_tiny_cpu',`, `300,`), as in this excerpt of a real run,
    and another process's line may come in between. Before: each piece ended the block, the rest of the dump
    reached the console."""
    worker = "\x1b[36m(WorkerDict pid=22230)\x1b[0m "
    dump = [f"{RAY}{{'actor_rollout_ref': {{'actor': {{\n"] + [f"{RAY}                  'key_{i}': {i},\n" for i in range(8)]
    dump += [f"{RAY}                      'global_tool_config': {{\n",
             f"{RAY}'nsys': {{'_target_': 'verl.utils.profiler.config.NsightToolConfig',\n",
             f"{RAY}                                'discrete': False,\n",
             f"{RAY} 'model_engine': 'dp',\n", f"{RAY} 'reward': \n",
             f"{RAY}{{'_target_': 'verl.workers.config.RewardConfig',\n",
             f"{RAY}              'project_name'\n", f"{RAY}: \n", f"{RAY}'popo_tiny_cpu',\n", f"{RAY}              \n",
             f"{RAY}'ray_wait_register_center_timeout': \n", f"{RAY}300,\n", f"{RAY}False}}}}\n"]
    other = f"{worker}Qwen3ForCausalLM contains 105.28K parameters\n"
    lines = [*dump[:12], other, *dump[12:], f"{RAY}Using dataset class: RLHFDataset\n", f"{RAY}2026-12-02 INFO x\n"]
    log, out = _view(lines)
    assert log == plain("".join(lines))
    assert out.splitlines() == [other.rstrip("\n"), f"[configuration: {len(dump)} lines, in /runs/x/train.log]",
                                f"{RAY}Using dataset class: RLHFDataset", f"{RAY}2026-12-02 INFO x"]


def test_console_drops_known_noise_with_its_source_line_but_never_errors():
    noise = [
        "(pid=7) /site-packages/verl/workers/engine/__init__.py:32: UserWarning: torchtitan engine is not available: "
        "ModuleNotFoundError(\"No module named 'torchtitan'\")\n",
        '(pid=7)   warnings.warn(f"torchtitan engine is not available: {e!r}", stacklevel=1)\n',
        "/site-packages/verl/trainer/main_ppo.py:180: UserWarning: Disabled critic as algorithm.adv_estimator != gae.\n",
        "  use_critic=need_critic(config),\n",
        f"{RAY}\rLoading weights:   0%|          | 0/24\rLoading weights: 100%|\n",
        "2026-12-02 05:43:51,861\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled\n",
    ]
    kept = [
        f"{RAY}Traceback (most recent call last):\n",
        f'{RAY}  File "/x/trainer.py", line 3, in step\n',
        f"{RAY}ValueError: algorithm.popo.reward_mode: a reward of 0.5 is not 0 or 1\n",
        f"{RAY}/x/trainer.py:9: UserWarning: POPO step 3: no positive rollout in the batch; actor update skipped\n",
        f"{RAY}  warnings.warn(msg, stacklevel=1)\n",
        f"{RAY}Training Progress:  50%|█████     | 1/2 [00:09<00:09,  9.75s/it]\n",
    ]
    log, out = _view(noise + kept)
    assert out == "".join(kept)
    assert log == plain("".join(noise + kept))


def test_console_collapses_validation_metric_dumps_and_survives_a_closed_console():
    block = [f"{RAY}(\"Final validation metrics: {{'val-core/tiny_arith/acc/mean@8': \"\n"]
    block += [f"{RAY} \"np.float64(0.5), 'val-aux/x/{i}': \"\n" for i in range(10)]
    _, out = _view(block + [f"{RAY}done\n"])
    assert out.splitlines() == ["[final validation metrics: 11 lines, in /runs/x/train.log]", f"{RAY}done"]

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError

    log = io.StringIO()
    console.filter_stream([_step(1), _step(2)], log, Closed(), "x")  # `| head` closed the console: the log goes on
    assert log.getvalue() == plain(_step(1) + _step(2))


# ------------------------------------------------------------------------------------------ summary
def _dump(dirpath: Path, step: int, rows: list[tuple[str, float]] | list[tuple[str, float, float]]) -> None:
    dirpath.mkdir(parents=True, exist_ok=True)
    with open(dirpath / f"{step}.jsonl", "w") as f:
        for row in rows:
            sample = {"input": row[0], "output": "...", "score": row[1], "step": step}
            if len(row) == 3:
                sample["acc"] = row[2]
            f.write(json.dumps(sample) + "\n")


def test_summary_counts_correct_samples_not_partial_credit(tmp_path):
    """A graded reward of 0.5 on a wrong answer raises verl's logged acc (the mean reward) but not pass@1."""
    val = tmp_path / "validation"
    _dump(val, 0, [("p1", 1.0), ("p1", 0.5), ("p2", 0.5), ("p2", 0.0)])  # 1 correct of 4; p1 solved
    _dump(val, 20, [("p1", 1.0), ("p1", 1.0), ("p2", 1.0), ("p2", 0.5)])
    log = "".join([f"{RAY}step:0 - val-core/tiny_arith/acc/mean@2:np.float64(0.5)\n"]
                  + [_step(i) for i in range(1, 21)])
    lines = summary.report(log, "train.log", validation_dir=val)
    assert lines[-2:] == ["held-out pass@2: 0.500 -> 1.000", "held-out pass@1: 0.250 -> 0.750 (20 steps)"]
    assert "trained 20 steps; median step 2.5 s" in lines
    # a reward function that reports acc is believed over its score
    _dump(val, 20, [("p1", 0.9, 1.0), ("p1", 0.9, 0.0), ("p2", 0.9, 0.0), ("p2", 0.9, 0.0)])
    assert summary.report(log, "train.log", validation_dir=val)[-1] == "held-out pass@1: 0.250 -> 0.250 (20 steps)"


def test_summary_says_resumed_skipped_and_where_the_policy_is(tmp_path):
    log = "".join([_step(4, **{"popo/skipped_step": 1.0}), _step(5, **{"popo/skipped_step": 0.0}),
                   _step(6, **{"popo/skipped_step": 1.0, "timing_s/step": "nan"})])
    hf = tmp_path / "ckpt" / "global_step_6" / "actor" / "huggingface"
    hf.mkdir(parents=True)
    (hf / "model.safetensors").write_bytes(b"w")
    lines = summary.report(log, "train.log", checkpoint_dir=tmp_path / "ckpt", test_data="/d/test.parquet")
    assert lines[0] == "full log: train.log"
    assert "resumed at step 3, trained 3 steps in this run; median step 2.5 s" in lines
    assert "2 of 3 steps skipped: no positive rollout" in lines
    assert f"evaluate it: python -m popo_verl.evaluate --preset tiny --model {hf} --data /d/test.parquet" in lines
    assert lines[-1] == "held-out pass@1: not measured (set trainer.test_freq > 0)"
    allskipped = summary.report("".join(_step(i, **{"popo/skipped_step": 1.0, "timing_s/step": "nan"}) for i in (1, 2, 3)), "l")
    assert "3 steps, all skipped: no positive rollout (POPO learns from correct responses only)" in allskipped
    assert not any("nan" in line for line in allskipped)


def test_summary_without_dumps_says_when_the_logged_value_is_a_reward():
    log = (f"{RAY}step:0 - val-core/tiny_arith/reward/mean@8:np.float64(0.6)\n" + _step(1)
           + f"{RAY}step:1 - val-core/tiny_arith/reward/mean@8:np.float64(0.7)\n")
    lines = summary.report(log, "l")
    assert lines[-2:] == ["(held-out pass@1 below is verl's mean reward: the reward function reports no acc)",
                          "held-out pass@1: 0.600 -> 0.700 (1 steps)"]


def test_summary_cli_exit_status_and_no_steps(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("Traceback (most recent call last):\nValueError: boom\n")
    r = subprocess.run([sys.executable, "-m", "popo_verl.tiny.summary", str(log)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"full log: {log}",
                                     "no training step was logged: see the errors above or in the full log"]


def test_summary_of_a_failed_run_says_so_last(tmp_path):
    """A run that ended with an error (a killed vLLM engine, say) after some steps: the summary's last line says it
    failed, and a held-out value measured once is not shown as a change over 0 steps."""
    log = tmp_path / "train.log"
    log.write_text(
        "step:0 - val-core/tiny_arith/acc/mean@1:0.25\n"
        "step:1 - training/global_step:1 - timing_s/step:2.0\n"
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n")
    lines = summary.report(log.read_text(), "train.log", exit_status=1)
    measured = "held-out pass@1: 0.250 at step 0 (no later validation; not measured after step 0, the run trained to step 1)"
    assert lines[-2:] == [measured, "the run FAILED (exit status 1): its error is above and in train.log"]
    assert summary.report(log.read_text(), "train.log")[-1] == measured
    r = subprocess.run([sys.executable, "-m", "popo_verl.tiny.summary", str(log), "--exit-status", "137"],
                       capture_output=True, text=True)
    assert r.stdout.splitlines()[-1].startswith("the run FAILED (exit status 137)")


def test_summary_of_a_run_that_ray_ended_when_its_head_died(tmp_path):
    """The Ray head's GCS gone and no POPO stop (a step longer than POPO_RAY_HEAD_TIMEOUT_S, or the check off): Ray
    ends every process 60 s later. The summary says so, that the console missed the last steps' lines, and where
    the same command resumes (tests/test_multinode.py runs the stop that saves first, on a real cluster)."""
    fatal = ("[2026-12-07 22:09:00,907 E 8839 8857] rpc_client.h:204: Failed to connect to GCS within 60 seconds. GCS "
             "may have been killed. The program will terminate.\n")
    text = "step:1 - training/global_step:1 - timing_s/step:2.0\n" + fatal
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    lines = summary.report(text, "train.log", checkpoint_dir=ckpt, exit_status=1)
    assert lines[-2] == ("the Ray head stopped answering and Ray ended the run 60 s later; the step lines after it went "
                         "did not reach this console (Ray forwards them through the head); no checkpoint was saved "
                         "yet: the same command starts over")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4")
    lines = summary.report(text, "train.log", checkpoint_dir=ckpt, exit_status=1)
    assert lines[-2].endswith("the steps after step 4 are lost; once the cluster is up again, the same command "
                              "resumes from there (trainer.resume_mode=auto)")
    assert lines[-1].startswith("the run FAILED (exit status 1)")


# ------------------------------------------------------------------------------------------ early errors
def test_bad_popo_key_fails_in_the_driver_before_ray_starts(tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "algorithm=popo", "algorithm.popo.tau=2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    elapsed = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.rstrip().splitlines()[-1] == "popo-verl: invalid configuration: algorithm.popo.tau must lie in [0, 1], got 2.0"
    assert "ray init" not in r.stdout + r.stderr, "the error must come before Ray starts"
    print(f"bad key reported after {elapsed:.1f} s")


def test_bad_popo_key_through_the_run_script(tmp_path):
    """The script checks its overrides before it builds the task or starts a log: one line, exit status 2."""
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), CKPT_DIR=str(tmp_path / "ckpt"))
    for override, said in (("algorithm.popo.weight_mode=best",
                            "popo-verl: invalid configuration: algorithm.popo.weight_mode must be one of"),
                           ("algorithm.popo.alpah=0.1",
                            "popo-verl: unknown config key algorithm.popo.alpah: did you mean algorithm.popo.alpha?")):
        t0 = time.time()
        r = subprocess.run(["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh"), override],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        print(f"{override}: refused after {time.time() - t0:.1f} s")
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.rstrip().splitlines()[-1].startswith(said), r.stderr[-2000:]
        assert r.stdout == "" and not (tmp_path / "run").exists(), "no log is promised for a run that never started"


def test_a_setting_that_is_not_a_number_is_refused_first(tmp_path):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), TINY_SEED="abc")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh")], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: TINY_SEED must be a whole number, got 'abc'"


def test_a_rerun_with_nothing_left_to_train_says_so_at_once(tmp_path):
    """A second run in a folder that holds its last step resumes there: the script says so in about a second, before
    the task is built or verl started (verl would start, validate and stop: a minute), and exits 0."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step_5").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), CKPT_DIR=str(ckpt), TOTAL_STEPS="5")
    script = ["bash", str(ROOT / "scripts" / "run_tiny_cpu.sh")]
    t0 = time.time()
    r = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    print(f"said after {time.time() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == (
        f"nothing to train: {ckpt} already holds step 5, at or past the last step (trainer.total_training_steps=5), "
        "and a run resumes from its folder (trainer.resume_mode=auto); train further with a larger "
        "trainer.total_training_steps, or start afresh with another CKPT_DIR (or trainer.resume_mode=disable)")
    assert not (tmp_path / "run").exists()
    from popo_verl.config.check import checked
    from popo_verl.resume import nothing_left_to_train

    def said(*overrides):
        cfg, problem = checked([f"trainer.default_local_dir={ckpt}", *overrides])
        assert problem is None, problem
        return nothing_left_to_train(cfg)

    assert said("trainer.total_training_steps=4") and said("trainer.total_training_steps=5")
    assert said("trainer.total_training_steps=6") is None, "step 6 is left to train"
    assert said("trainer.total_training_steps=4", "trainer.resume_mode=disable") is None, "starts afresh"
    assert said() is None, "verl's default: the last step follows from the epochs, unknown here"
    (ckpt / "global_step_5").rmdir()
    assert said("trainer.total_training_steps=4") is None, "a tracker naming no folder: verl trains from scratch"


def test_the_override_check_never_imports_verl():
    """`popo_verl.config check` composes verl's config from its files: verl's modules (seconds to import) stay out."""
    code = ("import sys, time; t0 = time.time(); from popo_verl.config.check import problem; "
            "said = problem(['algorithm=popo', 'algorithm.popo.alpah=0.1', 'data.train_batch_size=8']); "
            "print(said); print(round(time.time() - t0, 2)); "
            "assert not [m for m in sys.modules if m == 'verl' or m.startswith('verl.')], 'verl was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    said, seconds = r.stdout.splitlines()
    assert said.startswith("unknown config key algorithm.popo.alpah: did you mean algorithm.popo.alpha?")
    print(f"checked in {seconds} s")


@pytest.mark.parametrize("overrides, said", [
    (["data.train_bach_size=8"], "unknown config key data.train_bach_size: did you mean data.train_batch_size"),
    (["algorithm=popo", "algorithm.popo.alpah=0.1"],
     "unknown config key algorithm.popo.alpah: did you mean algorithm.popo.alpha? (POPO's keys: README"),
    (["algorithm=popo", "algorithm.popo.tau=2"], "invalid configuration: algorithm.popo.tau must lie in [0, 1], got 2.0"),
    (["+algorithm.popo.alpah=0.1", "algorithm=popo"], "invalid configuration: algorithm.popo has unknown keys ['alpah']"),
    (["algorithm=popo", "data.train_batch_size=8", "+ray_kwargs.ray_init.include_dashboard=false"], None),
    (["algorithm=pop"], "In 'ppo_trainer': Could not find 'algorithm/pop'"),
])
def test_override_check_messages(overrides, said):
    from popo_verl.config.check import problem

    found = problem(overrides)
    assert (found is None) if said is None else (found or "").startswith(said), found
    assert found is None or "\n" not in found


def test_the_check_reads_hydras_flags_as_verl_would():
    from popo_verl.config.check import launches, split_hydra_args

    args = ["algorithm=popo", "--config-name", "ppo_megatron_trainer", "x.y=1", "--cfg", "job"]
    assert split_hydra_args(args) == (["algorithm=popo", "x.y=1"], "ppo_megatron_trainer")
    assert split_hydra_args(["a=1", "--config-path=/mine"]) == (["a=1"], None)  # a config of the user's: not ours to say
    assert not launches(args) and not launches(["--help"]) and launches(["a=1", "-m"])
    r = subprocess.run([sys.executable, "-m", "popo_verl.config", "check", "algorithm=popo", "algorithm.popo.tau=2",
                        "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # `--cfg job` prints the config: its values are the driver's to check, at a run
    r = subprocess.run([sys.executable, "-m", "popo_verl.config", "check", "algorithm=popo", "algorithm.popo.tua=2",
                        "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean algorithm.popo.tau?" in r.stderr  # a key hydra itself would refuse


def test_verls_own_refusal_is_one_line_before_ray_starts(tmp_path):
    """verl's validate_config, which its main runs after POPO's driver check, refuses a batch smaller than the
    mini-batch with a traceback; the driver check runs it first and says it in one line, exit status 2."""
    r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "algorithm=popo", "data.train_batch_size=8",
                        "actor_rollout_ref.actor.ppo_mini_batch_size=16", "trainer.n_gpus_per_node=1",
                        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith("popo-verl: verl refuses this configuration: train_batch_size (8) must be >= "
                           "actor.ppo_mini_batch_size (16)"), r.stderr[-3000:]
    assert "TRAIN_BATCH" in last and "Traceback" not in r.stderr and "ray init" not in r.stdout
    # a refusal raised inside verl's config dataclasses (hydra wraps it) is one line too, naming verl's message
    r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "algorithm=popo", "trainer.n_gpus_per_node=1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.rstrip().splitlines()[-1] == (
        "popo-verl: verl refuses this configuration: [actor] Please set at least one of 'actor.ppo_micro_batch_size' "
        "or 'actor.ppo_micro_batch_size_per_gpu' if use_dynamic_bsz is not enabled."), r.stderr[-3000:]


# ------------------------------------------------------------------------------------------ the main job
@pytest.mark.e2e
def test_config_diff_lists_what_algorithm_popo_changes():
    """`python -m popo_verl.config diff` composes through verl's own command line with and without algorithm=popo."""
    from popo_verl.config import popo_defaults

    r = subprocess.run([sys.executable, "-m", "popo_verl.config", "diff", "actor_rollout_ref.rollout.n=4"],
                       capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
    assert rows["algorithm.adv_estimator"] == ["gae", "popo"]
    assert rows["actor_rollout_ref.actor.policy_loss.loss_mode"] == ["vanilla", "popo"]
    assert rows["trainer.v1.trainer_mode"] == ["sync", "popo"]
    assert "actor_rollout_ref.rollout.n" not in rows, "an override given to both is no difference"
    assert {f"algorithm.popo.{k}" for k in popo_defaults()} <= set(rows)
    assert all(v[0] == "(absent)" for k, v in rows.items() if k.startswith("algorithm.popo."))


ACTOR_DIED = """\
ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.
\tclass_name: create_colocated_worker_cls.<locals>.WorkerDict
\tactor_id: 816c8b99510b566ba5af8d8f01000000
\tpid: 7253
\tname: 67YgGkWorkerDict_0:0
\tnamespace: 119367d7-7936-4b9a-9d4e-16650b6c85bb
\tip: 192.0.2.2
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker \
unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was killed
"""


def test_summary_names_a_worker_that_died_and_where_a_rerun_resumes(tmp_path):
    """Ray's ActorDiedError, as a SIGKILLed training worker leaves it in the log (copied from a run killed at step 4),
    becomes one line before the failure line: which worker, what Ray says, and what a rerun does."""
    log = f"{RAY}step:3 - training/global_step:3 - critic/score/mean:0.5\n" + ACTOR_DIED
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    lines = summary.report(log, "l", checkpoint_dir=tmp_path, exit_status=1)
    assert lines[-2:] == [
        "a Ray worker died: WorkerDict_0:0 (pid 7253): Worker unexpectedly exits with a connection error code 2; the "
        "steps after step 2 are lost; the same command resumes from there (trainer.resume_mode=auto)",
        "the run FAILED (exit status 1): its error is above and in l"]
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()
    assert summary.report(log, "l", checkpoint_dir=tmp_path, exit_status=1)[-2].endswith(
        "no checkpoint was saved yet: the same command starts over")
    assert not any("worker died" in line for line in summary.report(log.replace("ActorDiedError", "ValueError"), "l",
                                                                       checkpoint_dir=tmp_path, exit_status=1))


def test_summary_of_a_rerun_with_nothing_left_to_train(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("60")
    log = f"{RAY}step:60 - val-core/tiny_arith/acc/mean@8:np.float64(0.5)\n"
    lines = summary.report(log, "l", checkpoint_dir=tmp_path)
    assert lines[-1].startswith(f"no step was trained in this run: {tmp_path} already holds step 60")
    assert "trainer.resume_mode=disable" in lines[-1]
    assert summary.report("Traceback (most recent call last):\n", "l", checkpoint_dir=tmp_path)[-1].startswith(
        "no training step was logged")
    # verl's harmless engine warnings name ...Error classes: they are not a failure; the exit status is
    noisy = log + "WARNING: megatron engine not registered: ModuleNotFoundError(\"No module named 'megatron'\")\n"
    assert summary.report(noisy, "l", checkpoint_dir=tmp_path)[-1].startswith("no step was trained in this run")
    failed = summary.report(noisy, "l", checkpoint_dir=tmp_path, exit_status=1)
    assert failed[-1].startswith("the run FAILED (exit status 1) before its first training step")


def test_summary_of_a_stopped_run_names_the_last_measured_step():
    """Ctrl-C at step 3 of a run that validated at step 0 only: the value is not shown as a result of the training."""
    log = (f"{RAY}step:0 - val-core/tiny_arith/acc/mean@8:np.float64(0.308)\n"
           + "".join(f"step:{s} - training/global_step:{s} - timing_s/step:2.0\n" for s in (1, 2, 3)))
    assert summary.report(log, "l")[-1] == \
        "held-out pass@1: 0.308 at step 0 (no later validation; not measured after step 0, the run trained to step 3)"
    log += f"step:2 - val-core/tiny_arith/acc/mean@8:np.float64(0.4)\n"
    assert summary.report(log, "l")[-1] == \
        "held-out pass@1: 0.308 -> 0.400 (2 steps; not measured after step 2, the run trained to step 3)"
