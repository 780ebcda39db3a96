"""benchmarks/learning.py's bookkeeping: curves read from verl's console log, the summary table and verdict."""

import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _log(vals):
    """verl's console logger lines (np.float64 reprs included) with the validation metrics at some steps."""
    lines = []
    for step, (p1, p8) in vals.items():
        lines.append(f"step:{step} - val-core/tiny_arith/acc/mean@8:np.float64({p1}) - "
                     f"val-core/tiny_arith/acc/best@8/mean:np.float64({p8}) - val-core/tiny_arith/acc/best@8/std:0.1")
        lines.append(f"step:{step + 1} - actor/pg_loss:0.5 - critic/score/mean:0.25 - popo/neg_logprob_delta:-0.01 - "
                     f"popo/pos_logprob_delta:0.02")
    return "\n".join(lines)


def test_curves_come_from_verls_validation_and_step_keys(learning):
    curves = learning.curves_from_log(_log({0: (0.25, 0.4), 10: (0.3, 0.5)}))
    assert curves == {"pass@1": {0: 0.25, 10: 0.3}, "pass@8": {0: 0.4, 10: 0.5}, "reward": {1: 0.25, 11: 0.25},
                      "neg_delta": {1: -0.01, 11: -0.01}, "pos_delta": {1: 0.02, 11: 0.02}, "step_s": {},
                      "gen_rounds": {}, "groups_without_positive": {}, "entropy": {}}


def _run(variant, seed, start, end, neg=-0.01):
    return {"variant": variant, "seed": seed, "steps": 20, "wall_s": 100.0, "overrides": [], "warm_start": "w",
            "curves": {"pass@1": {"0": start, "20": end}, "pass@8": {"0": 0.7, "20": 0.8},
                       "reward": {"1": 0.3, "2": 0.4}, "neg_delta": {"1": neg, "2": neg}, "pos_delta": {"1": 0.02}}}


def _fake_runs(learning, monkeypatch) -> list:
    """Every run ends 0.30 -> 0.40 on this machine's build "w"; returns the list of (variant, seed) run."""
    ran = []

    def fake_run(name, seed, args, workdir):  # the training run itself is what tests/test_learning.py covers
        ran.append((name, seed))
        return _run(name, seed, 0.30, 0.40)

    monkeypatch.setattr(learning, "run_variant", fake_run)
    monkeypatch.setattr(learning, "warm_start_id", lambda seed: "w")
    return ran


def test_mean_ci_is_the_t_interval(learning):
    m, lo, hi = learning.mean_ci([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and hi - m == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert learning.mean_ci([0.5])[1] == float("-inf")


def test_summary_tables_paired_difference_and_verdicts(learning, tmp_path):
    runs = [_run("popo", 0, 0.2, 0.5), _run("popo", 1, 0.3, 0.5), _run("popo", 2, 0.25, 0.5),
            _run("grpo", 0, 0.2, 0.4), _run("grpo", 1, 0.3, 0.45), _run("grpo", 2, 0.25, 0.4),
            _run("popo_alpha0", 0, 0.2, 0.3), _run("popo_alpha0", 1, 0.3, 0.35), _run("popo_alpha0", 2, 0.25, 0.31)]
    text = learning.summarise(runs, tmp_path)
    assert "| popo | 3 | 20 | 0.250 ± 0.050 | 0.500 ± 0.000 | 0.250 ± 0.050 | +0.200 |" in text
    assert "it learns on every seed" in text
    # POPO - GRPO gains per seed: 0.1, 0.05, 0.1
    assert "gain difference +0.083" in text and "target POPO >= GRPO - 0.02: met" in text
    assert "| popo_alpha0 | 3 | -0.180 |" in text and "the component helps here" in text
    # alpha 0 - GRPO per seed: -0.1, -0.1, -0.09 (the last column, paired with GRPO instead)
    assert "the component helps here | -0.097 [-0.111, -0.082], 3 seeds |" in text
    assert "Target neg_logprob_delta < 0 on average: met" in text
    assert (tmp_path / "learning.md").read_text().strip() == text.strip()
    assert (tmp_path / "learning.png").stat().st_size > 1000
    runs[3:6] = [_run("grpo", s, 0.3, 0.2) for s in (0, 1, 2)]
    assert "does NOT improve on every seed" in learning.summarise(runs, tmp_path)


def test_dynamic_sampling_is_compared_per_step_and_per_training_second(learning, tmp_path):
    """popo_dynamic against POPO, paired by seed: the gain per step, and per 1000 s of verl's timing_s/step."""
    def timed(variant, seed, end, step_s, rounds=None):
        run = _run(variant, seed, 0.3, end)
        run["curves"]["step_s"] = {"1": step_s, "2": step_s}
        run["curves"]["pass@1"] = {"0": 0.3, "2": end}
        if rounds:
            run["curves"]["gen_rounds"] = {"1": rounds, "2": rounds}
        return run

    runs = [timed("popo", s, 0.4, 50.0) for s in (0, 1, 2)] + [timed("popo_dynamic", s, e, 100.0, 1.5)
                                                               for s, e in ((0, 0.45), (1, 0.46), (2, 0.44))]
    text = learning.summarise(runs, tmp_path)
    # seed 0: POPO gains 0.1 in 100 s (1.0 per 1000 s), dynamic 0.15 in 200 s (0.75 per 1000 s)
    assert "| 0 | popo_dynamic | 1.500 | nan | 0.300 -> 0.450 | +0.150 | 200 | +0.750 |" in text
    assert "| 0 | popo | 1.000 | nan | 0.300 -> 0.400 | +0.100 | 100 | +1.000 |" in text
    assert "gain difference (dynamic - POPO) +0.050" in text and "took 2.00x POPO's training time" in text
    assert "difference -0.250" in text and (tmp_path / "dynamic_sampling.png").stat().st_size > 1000


def test_resume_keeps_finished_runs_and_skips_them(learning, tmp_path, monkeypatch, capsys):
    done = _run("popo", 1, 0.3, 0.5)
    other = _run("grpo", 7, 0.2, 0.3)
    (tmp_path / "learning.json").write_text(json.dumps([done, other]))
    ran = _fake_runs(learning, monkeypatch)
    learning.main(["--variants", "popo", "grpo", "--seeds", "1", "--out", str(tmp_path), "--resume"])
    assert ran == [("grpo", 1)], "popo seed 1 was already measured with these settings"
    stored = json.loads((tmp_path / "learning.json").read_text())
    assert {(r["variant"], r["seed"]) for r in stored} == {("popo", 1), ("grpo", 1), ("grpo", 7)}, "nothing lost"
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == "held-out pass@1 gain: POPO=0.200 GRPO=0.100 (1 seed)"
    assert "(min +0.100) over 1 seed: it learns" in out, "singular in the baseline line too"


def test_without_resume_the_asked_runs_are_redone_and_the_others_kept(learning, tmp_path, monkeypatch):
    """Before: a run without --resume wrote learning.json with its own runs only, losing every other one."""
    (tmp_path / "learning.json").write_text(json.dumps([_run("popo", 1, 0.2, 0.25), _run("grpo", 7, 0.2, 0.3)]))
    ran = _fake_runs(learning, monkeypatch)
    learning.main(["--variants", "popo", "--seeds", "1", "--out", str(tmp_path)])
    assert ran == [("popo", 1)]
    stored = {(r["variant"], r["seed"]): r for r in json.loads((tmp_path / "learning.json").read_text())}
    assert set(stored) == {("popo", 1), ("grpo", 7)} and stored[("popo", 1)]["curves"]["pass@1"]["20"] == 0.40


def test_quick_is_20_steps_at_constant_lr_kept_apart_from_the_full_benchmark(learning, tmp_path, monkeypatch, capsys):
    full = tmp_path / "benchmarks" / "results"
    full.mkdir(parents=True)
    (full / "learning.json").write_text(json.dumps([_run("popo", 0, 0.3, 0.55)]))
    monkeypatch.setattr(learning, "ROOT", tmp_path)
    seen = []

    def fake_run(name, seed, args, workdir):
        seen.append((name, seed, args.steps, args.test_freq, list(args.overrides)))
        return _run(name, seed, 0.3, 0.4)

    monkeypatch.setattr(learning, "run_variant", fake_run)
    monkeypatch.setattr(learning, "warm_start_id", lambda seed: "w")
    learning.main(["--quick"])
    constant = ["actor_rollout_ref.actor.optim.lr_scheduler_type=constant"]
    assert seen == [(v, s, 20, 20, constant) for s in (0, 1, 2) for v in ("popo", "grpo")]
    assert json.loads((full / "learning.json").read_text()) == [_run("popo", 0, 0.3, 0.55)], "the full results untouched"
    assert len(json.loads((full / "quick" / "learning.json").read_text())) == 6
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "held-out pass@1 gain: POPO=0.100 GRPO=0.100 (3 seeds)"


def test_resume_reruns_what_was_measured_from_another_build_of_the_task(learning, tmp_path, monkeypatch):
    """The tiny build is deterministic per machine, not across machines: a stored run whose warm start differs
    from this machine's build must be rerun, never paired with a fresh one."""
    stale = {**_run("grpo", 0, 0.29, 0.45), "warm_start": "other-machine"}
    fresh = _run("popo", 0, 0.30, 0.47)
    (tmp_path / "learning.json").write_text(json.dumps([stale, fresh, {**_run("grpo", 5, 0.2, 0.3), "warm_start": "x"}]))
    ran = _fake_runs(learning, monkeypatch)
    learning.main(["--variants", "popo", "grpo", "--seeds", "0", "--out", str(tmp_path), "--resume"])
    assert ran == [("grpo", 0)]
    stored = json.loads((tmp_path / "learning.json").read_text())
    assert sorted((r["variant"], r["seed"], r["warm_start"]) for r in stored) == [
        ("grpo", 0, "w"), ("grpo", 5, "x"), ("popo", 0, "w")], "the stale run replaced; a seed not asked for kept"


def test_warm_start_id_hashes_the_built_weights(learning, monkeypatch, tmp_path):
    import popo_verl.tiny as tiny

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-a")
    monkeypatch.setattr(tiny, "ensure_built", lambda out, spec, log=None: {"model": str(model)})
    a = learning.warm_start_id(3)
    (model / "model.safetensors").write_bytes(b"weights-b")
    assert learning.warm_start_id(3) != a and len(a) == 16


def test_summary_without_grpo_says_no_baseline_comparison(learning, tmp_path):
    runs = [_run("popo", s, 0.3, 0.5) for s in (0, 1)] + [_run("popo_nll_sequence", s, 0.3, 0.52) for s in (0, 1)]
    text = learning.summarise(runs, tmp_path)
    assert "GRPO was not run in this set" in text and "POPO - GRPO" not in text


def test_a_whole_pair_from_another_build_is_kept_and_its_ablations_not_run_here(learning, tmp_path, monkeypatch, capsys):
    """Seed 0's POPO/GRPO pair came from another machine's build: kept (it pairs with itself), and its ablation,
    which would need that build, is not run; seed 1 had only POPO there, so it is redone here, pair first."""
    theirs = [{**_run(v, 0, 0.3, 0.5), "warm_start": "theirs"} for v in ("popo", "grpo")]
    half = {**_run("popo", 1, 0.3, 0.5), "warm_start": "theirs"}
    (tmp_path / "learning.json").write_text(json.dumps(theirs + [half]))
    ran = _fake_runs(learning, monkeypatch)
    learning.main(["--variants", "popo", "grpo", "popo_alpha0", "--seeds", "0", "1", "--out", str(tmp_path), "--resume"])
    assert ran == [("popo", 1), ("grpo", 1), ("popo_alpha0", 1)]
    out = capsys.readouterr().out
    assert "seed 0: kept the POPO/GRPO runs of another machine's build (warm start theirs" in out
    stored = {(r["variant"], r["seed"], r["warm_start"]) for r in json.loads((tmp_path / "learning.json").read_text())}
    assert stored == {("popo", 0, "theirs"), ("grpo", 0, "theirs"), ("popo", 1, "w"), ("grpo", 1, "w"),
                      ("popo_alpha0", 1, "w")}
    assert out.rstrip().splitlines()[-1] == "held-out pass@1 gain: POPO=0.150 GRPO=0.150 (2 seeds)"


def test_runs_pair_only_within_one_build_of_a_seed(learning):
    popo = [_run("popo", 0, 0.3, 0.5)]
    assert learning.paired(popo, [_run("grpo", 0, 0.3, 0.4)]) == [pytest.approx(0.1)]
    assert learning.paired(popo, [{**_run("grpo", 0, 0.3, 0.4), "warm_start": "elsewhere"}]) == []


def test_report_summarises_the_stored_runs_and_runs_nothing(learning, tmp_path, monkeypatch, capsys):
    runs = [_run("popo", 0, 0.3, 0.5), _run("grpo", 0, 0.3, 0.45), _run("popo_alpha0", 0, 0.3, 0.35)]
    (tmp_path / "learning.json").write_text(json.dumps(runs))
    monkeypatch.setattr(learning, "run_variant", lambda *a: pytest.fail("--report must not run anything"))
    monkeypatch.setattr(learning, "warm_start_id", lambda seed: pytest.fail("--report must not build anything"))
    assert learning.main(["--report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| popo_alpha0 | 1 | -0.150 |" in out and "- seed 0, warm start `w`: popo, grpo, popo_alpha0" in out
    assert out.rstrip().splitlines()[-1] == "held-out pass@1 gain: POPO=0.200 GRPO=0.150 (1 seed)"
    assert (tmp_path / "learning.md").exists()
    with pytest.raises(SystemExit):
        learning.main(["--report", "--variants", "popo_tau0.9", "--out", str(tmp_path)])


def test_two_seeds_of_an_ablation_give_no_verdict(learning, tmp_path):
    """Two seeds with the same difference make a zero-width t interval: that is no evidence of a direction."""
    runs = [_run("popo", s, 0.3, 0.5) for s in (0, 1)] + [_run("popo_noise0", s, 0.3, 0.502) for s in (0, 1)]
    text = learning.summarise(runs, tmp_path)
    assert "| popo_noise0 | 2 | +0.002 | [+0.002, +0.002] | 2 seeds: no verdict" in text
    assert "does not help here" not in text


# ------------------------------------------------------------------------------------------ rollout engines
def _rollout_run(method, rollout, start, end, diff=1e-6):
    return {"method": method, "rollout": rollout, "steps": 100, "wall_s": 600.0,
            "pass@1": {"0": start, "20": (start + end) / 2, "100": end}, "pass@8": {"0": 0.9, "100": 0.95},
            "rollout_probs_diff_max": diff, "median_step_s": 3.5}


def test_rollout_learning_report_sets_each_difference_against_the_seed_spread(rollout_learning, tmp_path, monkeypatch):
    rl = rollout_learning
    monkeypatch.setattr(rl, "seed_spread", lambda method: 0.05)
    runs = [_rollout_run("popo", "vllm", 0.30, 0.58), _rollout_run("popo", "hf", 0.30, 0.55),
            _rollout_run("grpo", "vllm", 0.30, 0.40), _rollout_run("grpo", "hf", 0.30, 0.62)]
    text = rl.report(runs, tmp_path)
    assert "| POPO | +0.030 | 0.050 | no (within 2 s.d.) |" in text
    assert "| GRPO | -0.220 | 0.050 | yes (> 2 s.d.) |" in text
    assert "verl's GRPO learns through both engines" in text
    stored = json.loads((tmp_path / "rollout_learning.json").read_text())
    assert stored["verdicts"]["grpo"]["beyond_noise"] is True and (tmp_path / "rollout_learning.png").exists()
    flat = [_rollout_run("grpo", "vllm", 0.30, 0.31), _rollout_run("grpo", "hf", 0.30, 0.45)]
    assert "verl's GRPO does NOT learn through both engines" in rl.report(flat, tmp_path)


def test_cost_rollout_report_puts_vllm_and_hf_side_by_side(cost, tmp_path):
    def run(rollout, gen, wall):
        steps = {s: {"timing_s/gen": gen, "timing_s/step": gen + 1.0, "timing_s/update_actor": 0.5,
                     "training/rollout_probs_diff_max": 1e-6 if rollout == "vllm" else 2e-7} for s in (1, 2, 3)}
        return {"algo": rollout, "steps": steps, "wall_s": wall, "peak_rss_gb": {"ray::WorkerDict": 1.0, "driver": 0.5},
                "peak_gpu_gb": {}}

    runs = [run("hf", 2.0, 100.0), run("vllm", 3.0, 172.0), run("hf", 2.0, 100.0), run("vllm", 3.0, 172.0)]
    result = cost.rollout_report(runs, tmp_path)
    assert result["gen_ratio"] == pytest.approx(1.5) and result["step_ratio"] == pytest.approx(4.0 / 3.0)
    assert result["startup_s"] == {"hf": pytest.approx(91.0), "vllm": pytest.approx(160.0)}  # wall less 3 steps
    md = (tmp_path / "cost_cpu_rollout_vllm_vs_hf.md").read_text()
    assert "| gen | 2.0000 | 3.0000 | 1.500 |" in md and "start-up s" in md and "rollout processes" in md


def test_rollout_learning_report_lays_out_popo_by_rollout_seed(rollout_learning, tmp_path, monkeypatch):
    rl = rollout_learning
    monkeypatch.setattr(rl, "seed_spread", lambda method: 0.05)
    control = [dict(_rollout_run("popo", "hf", 0.30, 0.50), rollout_seed=7),
               dict(_rollout_run("popo", "vllm", 0.30, 0.65), rollout_seed=7)]
    runs = [_rollout_run("popo", "vllm", 0.30, 0.58), _rollout_run("popo", "hf", 0.30, 0.70)] + control
    text = rl.report(runs, tmp_path)
    assert "| 42 | +0.400 | +0.280 | -0.120 |" in text and "| 7 | +0.200 | +0.350 | +0.150 |" in text
    assert "Same engine, seed 7 - seed 42: vllm +0.070, hf -0.200" in text
    assert "| POPO | vllm, rollout seed 7 |" in text


def _cost_run(algo, kl_at=None):
    """A run as cost.run_once returns it: steps 1-4 of verl's metrics (POPO's KL metric at kl_at)."""
    steps = {}
    for step in (1, 2, 3, 4):
        m = {"timing_s/gen": 1.0, "timing_s/ref": 0.5, "timing_s/update_actor": 0.4, "timing_s/step": 2.0}
        if algo == "popo":
            m["popo/positive_ratio"] = 0.25
            if step == kl_at:
                m["popo/kl_policy_siamese"] = 0.001
        steps[step] = m
    return {"algo": algo, "steps": steps, "wall_s": 60.0, "peak_rss_gb": {"driver": 0.5}, "peak_gpu_gb": {},
            "rollout_peak_gb": float("nan")}


def test_cost_quick_writes_its_own_files_and_measures_the_kl_monitor(cost, tmp_path, monkeypatch, capsys):
    """--quick wrote over the full run's cost.{md,json,png}; its runs (4 steps) never reached the KL monitor's
    default interval (20), so no measured step paid for its siamese forward."""
    import popo_verl.tiny

    out = tmp_path / "results"
    for suffix in ("md", "json", "png"):
        (out / f"cost.{suffix}").parent.mkdir(exist_ok=True)
        (out / f"cost.{suffix}").write_text("the full run's")
    calls = []

    def fake_run_once(algo, steps, workdir, seed, gpu, extra, env_extra=None):  # the training runs: many minutes
        calls.append((algo, steps, list(extra)))
        interval = [int(o.split("=")[1]) for o in extra if o.startswith("algorithm.popo.kl_monitor_interval=")]
        return _cost_run(algo, kl_at=interval[-1] if interval else None)

    monkeypatch.setattr(cost, "run_once", fake_run_once)
    monkeypatch.setattr(popo_verl.tiny, "ensure_built", lambda *a, **k: {"model": str(tmp_path)})
    assert cost.main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "w"), "trainer.foo=1"]) == 0
    assert calls == [("popo", 4, ["algorithm.popo.kl_monitor_interval=4", "trainer.foo=1"]), ("grpo", 4, ["trainer.foo=1"])] * 2
    assert all((out / f"cost.{suffix}").read_text() == "the full run's" for suffix in ("md", "json", "png"))
    assert {f.name for f in out.iterdir()} == {f"cost{q}.{x}" for q in ("", "_quick") for x in ("md", "json", "png")}
    text = (out / "cost_quick.md").read_text()
    assert "POPO's KL monitor (an extra siamese forward over the whole batch, in the `ref` phase): at measured step 4 " in text
    assert json.loads((out / "cost_quick.json").read_text())["kl_monitor_steps"] == [4]

    parser = cost.build_parser()
    gpu = parser.parse_args(["--quick", "--gpu", "--model-size", "0.5b"])
    assert cost.result_stem(gpu, {"device": "gpu", "rollout": "hf"}) == "cost_gpu_0.5b_hf_quick"
    assert cost.result_stem(parser.parse_args([]), {}) == "cost", "the full run keeps its names"
    assert cost.rollout_stem(parser.parse_args(["--rollout", "vllm", "--quick"])) == "cost_cpu_rollout_vllm_vs_hf_quick"
    assert cost.rollout_stem(parser.parse_args(["--rollout", "vllm"])) == "cost_cpu_rollout_vllm_vs_hf"
    assert cost.kl_monitor_overrides("popo", 1) == [], "a one-step run has no measured step"


def test_rollout_rss_counts_each_rollout_process_once(cost):
    """Ray renames a process per task it runs; the sampler keeps a peak per name. The rollout engine's RSS takes
    each process's largest and leaves the trainer's processes out."""
    peaks = {"ray::HFRolloutServer": 0.90, "ray::HFRolloutServer.generate": 0.92, "ray::WorkerDict": 1.0,
             "ray::vllm_server_0_0:CPUvLLMHttpServer.__init__": 0.98, "ray::CPUvLLMHttpServer.launch_server": 1.0,
             "VLLM::EngineCore": 0.88, "VLLM::Worker": 2.07, "driver": 0.5}
    assert cost.rollout_rss_gb(peaks) == pytest.approx(0.92 + 1.0 + 0.88 + 2.07)


def test_cost_own_work_amortises_the_kl_monitor_over_its_default_interval(cost):
    """POPO's own work per step: the every-step parts at their medians, the KL monitor's forward divided by
    algorithm.popo.kl_monitor_interval's default (read from PopoConfig, so the report follows the default)."""
    from popo_verl.config import PopoConfig

    run = _cost_run("popo")
    for step, m in run["steps"].items():
        m.update({"timing_s/ema_update": 0.01, "timing_s/popo_drift": 0.002, "timing_s/popo_noise": 0.001})
    run["steps"][4]["timing_s/popo_kl_monitor"] = 0.8
    own = cost.own_work([run, _cost_run("grpo")])
    every = PopoConfig().kl_monitor_interval
    assert own["parts_s"]["popo_kl_monitor"] == pytest.approx(0.8 / every)
    assert own["total_s"] == pytest.approx(0.013 + 0.8 / every)
    assert own["share"] == pytest.approx((0.013 + 0.8 / every) / 2.0)
def test_compare_plots_runs_of_your_own_from_their_logs(learning, tmp_path, capsys):
    """`learning.py --compare NAME=LOG ...`: any two runs of the script, from their full logs, as a table and a plot."""
    popo, grpo = tmp_path / "popo.log", tmp_path / "grpo.log"
    popo.write_text(_log({0: (0.3, 0.9), 20: (0.45, 0.95)}))
    grpo.write_text(_log({0: (0.3, 0.9), 20: (0.4, 0.9)}))
    assert learning.main(["--compare", f"popo={popo}", f"grpo={grpo}", "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert f"| popo | {popo} | 20 | 0.300 -> 0.450 | 0.900 -> 0.950 |" in out
    assert f"| grpo | {grpo} | 20 | 0.300 -> 0.400 | 0.900 -> 0.900 |" in out
    assert (tmp_path / "plots" / "compare.png").stat().st_size > 10_000
    (tmp_path / "empty.log").write_text("step:1 - actor/pg_loss:0.5\n")
    with pytest.raises(SystemExit, match="has no held-out validation"):
        learning.main(["--compare", f"x={tmp_path / 'empty.log'}"])
    with pytest.raises(SystemExit, match="NAME=LOG"):
        learning.main(["--compare", str(popo)])


# ------------------------------------------------------------------------------ benchmarks/exploration.py (issue #36)
def _xrun(method, seed, start, end, entropy=0.15):
    """A run's record as exploration.py stores it: pass@k at the warm start and at the end (k = 1, 2, 4)."""
    return {"variant": method, "seed": seed, "warm_start": "w", "n": 4, "final_step": 200,
            "train_s": 400.0, "overrides": [], "curves": {"entropy": {str(s): entropy for s in range(1, 21)}},
            "pass_at_k": {"start": {"1": start[0], "2": start[1], "4": start[2]},
                          "end": {"1": end[0], "2": end[1], "4": end[2]}}}


def test_exploration_report_pairs_gains_by_seed_and_reads_pass_at_k_against_the_warm_start(exploration, tmp_path):
    start = (0.30, 0.50, 0.90)
    runs = [_xrun("grpo", s, start, (0.40 + 0.01 * s, 0.55, 0.85 - 0.01 * s)) for s in (0, 1, 2)]
    runs += [_xrun("popo", s, start, (0.45, 0.60, 0.91 + 0.01 * s), entropy=0.2) for s in (0, 1, 2)]
    runs += [_xrun("psr", s, start, (0.50, 0.55, 0.80 + 0.01 * s)) for s in (0, 1, 2)]
    text = exploration.summarise(runs, tmp_path)
    assert "| popo | 3 | 200 | 0.300 -> 0.450 | 0.150 ± 0.000 | 0.900 -> 0.920 | 0.020 ± 0.010 | 0.200 -> 0.200 | 400 |" in text
    # POPO - GRPO per seed, pass@1: 0.05, 0.04, 0.03; pass@2: 0.05 each; pass@4: 0.06, 0.08, 0.10 (half-width
    # 4.303 x 0.02 / sqrt 3); k = 1, the middle k (max(2, 4 / 8)), the largest
    assert ("| popo | +0.040 [+0.015, +0.065], 3 seeds | +0.050 [+0.050, +0.050], 3 seeds | "
            "+0.080 [+0.030, +0.130], 3 seeds |") in text
    assert exploration.report_ks(64) == [1, 8, 64]
    assert "GRPO gains held-out pass@1 on every seed (3): the comparison stands." in text
    assert "- grpo: -0.060 [-0.085, -0.035], 3 seeds (warm start 0.900): below the warm start" in text
    assert "- popo: +0.020 [-0.005, +0.045], 3 seeds (warm start 0.900): not distinguishable from the warm start" in text
    assert "- psr: -0.090 [-0.115, -0.065], 3 seeds (warm start 0.900): below the warm start" in text
    assert "## pass@2 against the warm start" in text and "- psr: +0.050 [+0.050, +0.050], 3 seeds (warm start 0.500): above" in text
    assert "| popo | 400 | 267 |" in text  # 400 s for +0.15: 267 s per +0.1
    assert (tmp_path / "exploration.md").read_text() == text and (tmp_path / "exploration.png").stat().st_size > 1000
    runs[0] = _xrun("grpo", 0, start, (0.29, 0.5, 0.8))
    assert "does NOT gain held-out pass@1 on every seed: the comparison against it means nothing" in \
        exploration.summarise(runs, tmp_path)


def test_exploration_pass_at_k_curve_samples_the_model(exploration):
    """The unbiased pass@k from popo_verl.evaluate on the tiny warm start (4 samples on 8 held-out prompts)."""
    tiny = exploration._tiny_dir(0)
    curve = exploration.pass_at_k_curve(tiny / "model", tiny / "data" / "test.parquet", n=4, limit=8)
    assert sorted(curve) == [1, 2, 4]
    assert 0 <= curve[1] <= curve[2] <= curve[4] <= 1 and curve[4] > 0
