"""The CPU-checkable parts of the GPU path (issue 16): the sized random models (popo_verl/bench/sized_models.py), the
synthetic verifier (popo_verl/bench/synthetic_reward.py), benchmarks/cost.py's GPU options and report, and
scripts/gpu_check.sh with its Python half (popo_verl/bench/gpu_check.py). What needs a GPU is run by scripts/gpu_check.sh
on one; here the script must fail fast and clearly."""

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from popo_verl.bench import gpu_check, sized_models, synthetic_reward
from popo_verl.bench.synthetic_reward import compute_score, is_positive, positives_per_group, verl_overrides

ROOT = Path(__file__).resolve().parents[1]


# ================================================================================================ sized models
def _closed_form_params(spec, vocab: int) -> int:
    """Qwen3 parameter count from its shapes: tied embedding, per layer q/k/v/o projections, q/k norms (head_dim),
    gated MLP, two RMSNorms; the final norm."""
    h, i, hd = spec.hidden, spec.intermediate, spec.head_dim
    attn = h * spec.heads * hd + 2 * h * spec.kv_heads * hd + spec.heads * hd * h + 2 * hd
    layer = attn + 3 * h * i + 2 * h
    return vocab * h + spec.layers * layer + h


@pytest.fixture(scope="module")
def vocab():
    from popo_verl.tiny import build_tokenizer

    return len(build_tokenizer())


@pytest.mark.parametrize("size", ["tiny", "20m", "0.5b", "1.5b"])
def test_each_size_has_about_the_parameters_its_name_says(size, vocab):
    """Counted on the meta device (no weights allocated) and from the shapes by hand: the two agree, and the count
    is within 2 % of the size named (the tiny size is exactly the tiny task's model)."""
    spec = sized_models.SIZES[size]
    n = sized_models.count_params(size)
    assert n == _closed_form_params(spec, vocab)
    assert abs(n - spec.target_params) / spec.target_params < 0.02, (size, n)
    if size == "tiny":
        assert n == 105_280


def test_tiny_size_is_the_tiny_tasks_architecture():
    from popo_verl.tiny import TinySpec

    t, s = TinySpec(), sized_models.SIZES["tiny"]
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads) == (t.hidden_size, t.intermediate, t.layers,
                                                                          t.heads, t.kv_heads)
    assert s.head_dim == t.hidden_size // t.heads


def test_larger_sizes_use_qwen3_widths():
    """0.5b: Qwen3-0.6B's widths; 1.5b: Qwen3-1.7B's (the docstring's table)."""
    half, big = sized_models.SIZES["0.5b"], sized_models.SIZES["1.5b"]
    assert (half.hidden, half.intermediate, half.heads, half.kv_heads, half.head_dim) == (1024, 3072, 16, 8, 128)
    assert (big.hidden, big.intermediate, big.heads, big.kv_heads, big.head_dim) == (2048, 6144, 16, 8, 128)
    assert half.dtype == big.dtype == "bfloat16" and sized_models.SIZES["tiny"].dtype == "float32"


@pytest.fixture(scope="module")
def built_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sized") / "tiny"
    logs = []
    path = sized_models.build("tiny", str(out), log=logs.append)
    return Path(path), logs


def test_tiny_builds_and_loads_with_transformers(built_tiny, vocab):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, logs = built_tiny
    assert path.is_dir() and not Path(str(path) + ".building").exists()
    assert any("built in" in line for line in logs)
    manifest = json.loads((path / "manifest.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.vocab_size == vocab == len(tok)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == manifest["n_params"] == 105_280
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    # reads the tiny task's prompts: its chat template, "\n" one token
    ids = tok.apply_chat_template([{"role": "user", "content": "37+5"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert len(tok("\n")["input_ids"]) == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), vocab) and torch.isfinite(logits).all()


def test_build_is_cached_by_digest(built_tiny, cost):
    path, _ = built_tiny
    weights = next(path.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    spec = sized_models.SIZES["tiny"]
    assert sized_models.is_built(path, spec)
    logs = []
    assert sized_models.build("tiny", str(path), log=logs.append) == str(path)
    assert logs == [f"tiny model already built in {path} (cached)"] and weights.stat().st_mtime_ns == mtime
    # another spec (or another build version) is another digest: not this directory's model
    from dataclasses import replace

    assert replace(spec, seed=1).digest() != spec.digest()
    assert not sized_models.is_built(path, replace(spec, seed=1))
    assert not sized_models.is_built(path.parent / "nowhere", spec)
    # the benchmark's count from the safetensors headers (the tied embedding stored once)
    assert cost.model_params(str(path)) == 105_280


def test_build_refuses_an_unknown_size_and_honours_the_cache_dir(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="model size must be one of"):
        sized_models.build("7b", str(tmp_path))
    monkeypatch.setenv("POPO_SIZED_MODEL_DIR", str(tmp_path))
    assert sized_models.default_dir("0.5b") == str(tmp_path / "0.5b")


# ================================================================================================ synthetic verifier
FRACTIONS = [0, 0.05, 0.1, 0.125, 0.15, 0.25, 0.271, 1 / 3, 0.5, 0.6, 0.75, 0.9, 1]


@pytest.mark.parametrize("p", FRACTIONS)
def test_exactly_round_p_n_positives_in_every_group(p):
    for n in range(1, 65):
        marked = [k for k in range(n) if is_positive(k, p)]
        expected = math.floor(Fraction(repr(p)).limit_denominator(10**6) * n + Fraction(1, 2))
        assert len(marked) == positives_per_group(n, p) == expected, (p, n, marked)


def test_counts_at_familiar_sizes_and_halves_round_up():
    assert positives_per_group(8, 0.25) == 2 and positives_per_group(8, 0.5) == 4
    assert positives_per_group(10, 0.1) == 1, "0.1 is 1/10, not the float just above it"
    assert positives_per_group(10, 0.15) == 2 and positives_per_group(10, 0.05) == 1, "halves round up"
    assert positives_per_group(16, 0) == 0 and positives_per_group(16, 1) == 16
    assert [k for k in range(8) if is_positive(k, 0.25)] == [1, 5]


def test_the_same_samples_whatever_the_call_or_the_group_size():
    """A sample's mark depends on its index and p only: repeated calls agree, and a larger group keeps the smaller
    one's marks (POPO and GRPO runs, or a resumed run, see the same positives)."""
    for p in (0.25, 0.3, 0.5):
        first = [compute_score("s", "any text", "1", {"session_id": k}, positive_fraction=p) for k in range(32)]
        again = [compute_score("t", "other text", "2", {"session_id": k, "x": 1}, positive_fraction=p) for k in range(32)]
        assert first == again and set(first) <= {0.0, 1.0}
        assert first == [1.0 if is_positive(k, p) else 0.0 for k in range(32)]
        for n in (4, 8, 16):
            assert sum(first[:n]) == positives_per_group(n, p)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "half", None, True])
def test_bad_fractions_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match="positive_fraction must"):
        positives_per_group(8, bad)
    with pytest.raises(ValueError, match="positive_fraction must"):
        verl_overrides(bad)
    with pytest.raises(ValueError, match="positive_fraction must"):
        synthetic_reward.check_fraction(bad)


def test_compute_score_is_loud_without_its_inputs():
    with pytest.raises(ValueError, match="reward_kwargs.positive_fraction"):
        compute_score("s", "x", "1", {"session_id": 0})
    with pytest.raises(KeyError, match="SessionRewardManager"):
        compute_score("s", "x", "1", {}, positive_fraction=0.5)
    with pytest.raises(ValueError, match="sample index"):
        is_positive(-1, 0.5)


def _agent_loop_row(tok, session_id: int, extra_info: dict):
    """One reward-loop request as verl 0.9.1's agent loop builds it (experimental/agent_loop/agent_loop.py
    `_compute_score`: the agent loop's kwargs, `session_id` among them, become the non-tensor fields)."""
    import numpy as np
    import torch
    from tensordict import TensorDict
    from verl import DataProto

    prompt, response = torch.tensor(tok("7+5=")["input_ids"]), torch.tensor(tok("\\boxed{12}")["input_ids"])
    ids = torch.cat([prompt, response])
    batch = TensorDict({"prompts": prompt[None], "responses": response[None], "input_ids": ids[None],
                        "attention_mask": torch.ones_like(ids)[None], "position_ids": torch.arange(len(ids))[None]},
                       batch_size=1)
    kwargs = {"data_source": "tiny_arith", "reward_model": {"ground_truth": "12"}, "extra_info": extra_info,
              "uid": "u0", "session_id": session_id}
    non_tensor = {k: np.array([v], dtype=object) for k, v in kwargs.items()}
    non_tensor.update({"__num_turns__": np.array([2]), "tool_extra_fields": np.array([{}], dtype=object)})
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


def test_session_reward_manager_through_verls_own_loaders():
    """verl loads both pieces from the file the overrides name (reward.py `get_custom_reward_fn`,
    `resolve_reward_manager_cls`), and the manager hands the reward function each sample's index."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.import_utils import load_extern_object

    from popo_verl.tiny import build_tokenizer

    over = dict(o.lstrip("+").split("=", 1) for o in verl_overrides(0.25))
    assert over["reward.custom_reward_function.path"] == over["reward.reward_manager.module.path"] == synthetic_reward.__file__
    cls = load_extern_object(over["reward.reward_manager.module.path"], over["reward.reward_manager.name"])
    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": over["reward.custom_reward_function.path"], "name": over["reward.custom_reward_function.name"],
        "reward_kwargs": {"positive_fraction": float(over["reward.custom_reward_function.reward_kwargs.positive_fraction"])}}}})
    score_fn = get_custom_reward_fn(cfg)
    tok = build_tokenizer()
    shared = {"index": 3}  # the rows of a group share one extra_info dict: the manager must not write into it

    async def score_group():
        manager = cls(config=cfg, tokenizer=tok, compute_score=score_fn)
        return [await manager.run_single(_agent_loop_row(tok, k, shared)) for k in range(8)]

    results = asyncio.run(score_group())
    assert [r["reward_score"] for r in results] == [1.0 if is_positive(k, 0.25) else 0.0 for k in range(8)]
    assert sum(r["reward_score"] for r in results) == 2
    assert shared == {"index": 3}


@pytest.fixture(scope="module")
def composed():
    """verl's real command line composes the run script's CPU settings, then the GPU overrides and the synthetic
    verifier's (benchmarks/cost.py puts them in that order)."""
    script_like = [  # the relevant part of scripts/run_tiny_cpu.sh's arguments
        "algorithm=popo", "trainer.device=cpu", "actor_rollout_ref.rollout.name=hf",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32",
        "reward.custom_reward_function.path=/somewhere/reward.py", "reward.custom_reward_function.name=compute_score",
    ]
    args = script_like + gpu_check.gpu_overrides("hf") + verl_overrides(0.25)
    r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *args, "--cfg", "job"],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    import yaml

    return yaml.safe_load(r.stdout)


def test_gpu_and_verifier_overrides_compose_with_verls_config(composed):
    reward = composed["reward"]
    assert reward["custom_reward_function"] == {"path": synthetic_reward.__file__, "name": "compute_score",
                                                "reward_kwargs": {"positive_fraction": 0.25}}
    assert reward["reward_manager"]["source"] == "importlib"
    assert reward["reward_manager"]["name"] == "SessionRewardManager"
    assert reward["reward_manager"]["module"]["path"] == synthetic_reward.__file__
    arr = composed["actor_rollout_ref"]
    assert arr["actor"]["fsdp_config"]["mixed_precision"]["param_dtype"] == "bf16"
    assert arr["ref"]["fsdp_config"]["mixed_precision"]["param_dtype"] == "bf16"
    assert arr["rollout"]["name"] == "hf" and composed["trainer"]["device"] == "cuda"


# ================================================================================================ benchmarks/cost.py
def test_parse_gpu_apps_sums_per_pid_in_gb(cost):
    text = "1234, 2048\n1234, 1024\n  99 , 512 \n777, [N/A]\npid, used_memory\n\n"
    assert cost.parse_gpu_apps(text) == {1234: 3.0, 99: 0.5}
    assert cost.parse_gpu_apps("") == {}


def test_gpu_overrides(cost):
    assert cost.gpu_overrides("hf") == [
        "trainer.device=cuda",
        "++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16",
        "++actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=bf16",
        "actor_rollout_ref.rollout.name=hf",
    ]
    assert cost.gpu_overrides("vllm")[-1] == "actor_rollout_ref.rollout.name=vllm"
    with pytest.raises(ValueError, match="hf or vllm"):
        cost.gpu_overrides("sglang")
    with pytest.raises(ValueError, match="engine must be one of fsdp, fsdp2, megatron"):
        cost.gpu_overrides("hf", "torchtitan")


#: what the GPU overrides follow: scripts/run_tiny_cpu.sh's ENGINE blocks (their dtype and engine keys), and for plain
#: fsdp (no block of the script's) verl's own config alone
ENGINE_ARGS = {
    "fsdp": ["actor_rollout_ref.actor.strategy=fsdp", "actor_rollout_ref.ref.strategy=fsdp"],
    "fsdp2": ["actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
              "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
              "+actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32"],
    "megatron": ["model_engine=megatron", "actor_rollout_ref.actor.megatron.vanilla_mbridge=true",
                 "actor_rollout_ref.ref.megatron.vanilla_mbridge=true"],
}


def test_gpu_overrides_compose_with_verls_config_for_every_engine():
    """`bash scripts/gpu_check.sh megatron` passed FSDP's dtype key to the Megatron actor, which has no fsdp_config:
    hydra refused the run. Each engine's overrides compose with verl's real config (hydra's compose API, verl's
    config directory) and its engine config accepts them (verl's own dataclass, which checks the dtype)."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        for engine, script in ENGINE_ARGS.items():
            cfg = compose("ppo_trainer", overrides=script + gpu_check.gpu_overrides("hf", engine))
            arr = cfg.actor_rollout_ref
            assert (arr.actor.strategy, arr.rollout.name, cfg.trainer.device) == (engine, "hf", "cuda")
            for role in (arr.actor, arr.ref):
                if engine == "megatron":
                    assert "fsdp_config" not in role and role.megatron.dtype == "bfloat16"
                    assert omega_conf_to_dataclass(role.megatron).dtype == "bfloat16"
                else:
                    assert role.fsdp_config.mixed_precision.param_dtype == "bf16"
                    assert omega_conf_to_dataclass(role.fsdp_config).mixed_precision["param_dtype"] == "bf16"


def test_help_and_the_default_cpu_arguments_are_unchanged(cost):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for opt in ("--quick", "--rounds", "--steps", "--seed", "--gpu", "--rollout", "--model-size", "--positive-fraction",
                "--response-length", "--micro-batch", "--out", "--workdir"):
        assert opt in r.stdout
    args = cost.build_parser().parse_args([])
    assert (args.quick, args.rounds, args.steps, args.seed, args.gpu, args.overrides) == (False, 3, 8, 1, False, [])
    assert args.out == str(ROOT / "benchmarks" / "results") and args.workdir is None
    assert not cost.extended(args) and cost.result_stem(args, {}) == "cost"
    quick = cost.build_parser().parse_args(["--quick", "trainer.foo=1"])
    assert quick.quick and quick.overrides == ["trainer.foo=1"] and not cost.extended(quick)


def test_setup_for_a_sized_model_and_the_synthetic_verifier(cost, built_tiny, monkeypatch):
    """The sized model replaces the tiny task's (its path last wins), the verifier's overrides follow; on the CPU
    the environment is left alone; with --gpu the run leaves the CPU platform (POPO_VERL_CPU=0)."""
    path, _ = built_tiny
    monkeypatch.setenv("POPO_SIZED_MODEL_DIR", str(path.parent))
    for var in ("TRAIN_BATCH", "ROLLOUT_N", "NNODES", "N_GPUS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    args = cost.build_parser().parse_args(["--model-size", "tiny", "--positive-fraction", "0.25"])
    env, overrides, info = cost.setup(args)
    assert env == {}
    assert overrides == [f"actor_rollout_ref.model.path={path}"] + verl_overrides(0.25)
    assert info["n_params"] == 105_280 and info["rows_per_step"] == 128 and info["ranks"] == 1
    assert cost.result_stem(args, info) == "cost_cpu_tiny_p0.25"

    args = cost.build_parser().parse_args(["--gpu", "--rollout", "hf", "--model-size", "tiny", "--response-length", "64",
                                           "--micro-batch", "32"])
    env, overrides, info = cost.setup(args)
    assert env == {"POPO_VERL_CPU": "0", "MICRO": "32"}
    assert overrides == cost.gpu_overrides("hf") + [f"actor_rollout_ref.model.path={path}", "data.max_response_length=64"]
    assert info["rollout"] == "hf" and info["gpu"]  # "unknown GPU" where nvidia-smi is missing
    assert cost.result_stem(args, info) == "cost_gpu_tiny_hf_r64_mb32"

    with pytest.raises(SystemExit, match="needs --gpu"):
        cost.setup(cost.build_parser().parse_args(["--rollout", "vllm"]))


def test_a_bad_fraction_fails_before_anything_runs(cost, tmp_path):
    t0 = time.time()
    with pytest.raises(ValueError, match="positive_fraction must lie in"):
        cost.main(["--positive-fraction", "1.5", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert time.time() - t0 < 5 and not (tmp_path / "o").exists()


def test_targets(cost):
    met = cost.targets(update_ratio=0.3, step_ratio=0.9, pos=0.25, popo_mem_gb=10.0, grpo_mem_gb=8.0, siamese_gb=2.5)
    assert [t["met"] for t in met] == [True, True, True]
    assert met[0]["limit"] == pytest.approx(0.35) and met[2]["limit"] == pytest.approx(10.5)
    missed = cost.targets(update_ratio=0.5, step_ratio=1.2, pos=0.25, popo_mem_gb=11.0, grpo_mem_gb=8.0, siamese_gb=2.5)
    assert [t["met"] for t in missed] == [False, False, False]
    unknown = cost.targets(float("nan"), 0.9, 0.25, float("nan"), 8.0, 2.5)
    assert [t["met"] for t in unknown] == [None, True, None]


def _fake_run(algo, update, step, mem, pos=None, tput=1000.0):
    """A run as run_once returns it: per-step metrics parsed from verl's console (step 1 is warm-up)."""
    steps = {}
    for s in (1, 2, 3):
        m = {"timing_s/gen": 1.0, "timing_s/update_actor": update * (5 if s == 1 else 1), "timing_s/step": step,
             "actor/perf/max_memory_allocated_gb": mem + s * 0.1, "actor/perf/max_memory_reserved_gb": mem + 1,
             "perf/throughput": tput, "response_length/mean": 20.0}
        if pos is not None:
            m["popo/positive_ratio"] = pos
        steps[s] = m
    return {"algo": algo, "steps": steps, "wall_s": 10.0, "peak_rss_gb": {"driver": 0.5, "ray::WorkerDict": 1.0},
            "peak_gpu_gb": {"ray::WorkerDict": mem + 2}}


def test_report_default_and_extended(cost, tmp_path, capsys):
    runs = [_fake_run("popo", 0.3, 3.0, 5.0, pos=0.25), _fake_run("grpo", 1.0, 4.0, 4.5)]
    default = cost.report(runs, tmp_path)  # the default CPU run: same table, same files as always
    text = (tmp_path / "cost.md").read_text()
    assert text.startswith("| phase | POPO median s | GRPO median s | POPO/GRPO |\n|---|---|---|---|\n| gen |")
    assert "| update_actor | 0.3000 | 1.0000 | 0.300 |" in text and "| step | 3.0000 | 4.0000 | 0.750 |" in text
    assert "Setup:" not in text and "target" not in text
    assert {p.name for p in tmp_path.iterdir()} == {"cost.md", "cost.json", "cost.png"}
    assert set(json.loads((tmp_path / "cost.json").read_text())) == set(default)
    assert capsys.readouterr().out.rstrip().endswith("update_actor POPO/GRPO = 0.300 at positive fraction 0.250")

    info = {"device": "gpu", "gpu": "1 x NVIDIA H100", "rollout": "hf", "model_size": "0.5b", "n_params": 2**28,
            "ranks": 1, "rows_per_step": 128, "positive_fraction_requested": 0.25, "response_length": 256}
    out = tmp_path / "ext"
    result = cost.report(runs, out, info, "cost_gpu_0.5b_hf_p0.25")
    md = (out / "cost_gpu_0.5b_hf_p0.25.md").read_text()
    assert "Setup: 1 x NVIDIA H100; model 0.5b (268,435,456 parameters); rollout hf" in md
    assert result["siamese_fp32_share_gb"] == pytest.approx(1.0)  # 2^28 parameters x 4 bytes
    # peaks over the measured steps 2..3: POPO 5.3, GRPO 4.8 <= 4.8 + 1.0
    assert result["memory_gb"]["popo"]["actor/perf/max_memory_allocated_gb"] == pytest.approx(5.3)
    assert "| trainer worker `actor/perf/max_memory_allocated_gb` (actor + siamese/reference) | 5.30 | 4.80 |" in md
    assert "| GPU, nvidia-smi, `ray::WorkerDict` | 7.00 | 6.50 |" in md
    assert result["gen_tokens_per_s"]["popo"] == pytest.approx(128 * 20.0 / 1.0)
    assert [t["met"] for t in result["targets"]] == [True, True, True]
    assert "| update_actor POPO/GRPO <= positive fraction + 0.10 | 0.300 | 0.350 | yes |" in md
    assert (out / "cost_gpu_0.5b_hf_p0.25.png").is_file()


def test_a_cpu_run_has_no_allocator_peak_and_no_memory_verdict(cost, tmp_path):
    """On the CPU torch keeps no allocator statistics and verl's max_memory_* read 0: the report says nan and
    leaves the memory target unjudged (before: 0.000 <= limit, "yes")."""
    runs = []
    for algo, pos in (("popo", 0.25), ("grpo", None)):
        r = _fake_run(algo, 0.3 if pos else 1.0, 3.0, 0.0, pos=pos)
        for m in r["steps"].values():
            m.update({"actor/perf/max_memory_allocated_gb": 0.0, "actor/perf/max_memory_reserved_gb": 0.0})
        runs.append(r)
    info = {"device": "cpu", "rollout": "hf", "model_size": "20m", "n_params": 20_000_000, "ranks": 1,
            "rows_per_step": 128, "positive_fraction_requested": 0.25}
    result = cost.report(runs, tmp_path, info, "cost_cpu_20m_p0.25")
    md = (tmp_path / "cost_cpu_20m_p0.25.md").read_text()
    assert "| trainer worker `actor/perf/max_memory_allocated_gb` (actor + siamese/reference) | nan | nan |" in md
    assert [t["met"] for t in result["targets"]] == [True, True, None]
    assert "| POPO peak memory <= GRPO's + fp32 siamese share (GB) | nan | nan | n/a |" in md


def test_gpu_memory_falls_back_to_torch_where_nvidia_smi_names_no_process(cost, tmp_path):
    """In a container nvidia-smi lists host PIDs: the per-process table came out empty. Then each role's
    torch.cuda.max_memory_allocated is shown: the trainer worker's from verl's metric, the hf rollout server's from the
    line popo_verl/rollout/hf_gpu.py prints (parsed from the run's log)."""
    log = "\n".join(["(TaskRunner pid=1) step:1 - x:1", "(HFGPURolloutServer pid=9) popo-verl hf rollout: "
                     "max_memory_allocated_gb=3.250", "(HFGPURolloutServer pid=9) popo-verl hf rollout: "
                     "max_memory_allocated_gb=3.500"])
    assert cost.rollout_peak_gb(log) == 3.5 and cost.rollout_peak_gb("no such line") != cost.rollout_peak_gb("no such line")
    runs = [_fake_run("popo", 0.3, 3.0, 5.0, pos=0.25), _fake_run("grpo", 1.0, 4.0, 4.5)]
    for r, peak in zip(runs, (3.5, 2.75)):
        r["peak_gpu_gb"], r["rollout_peak_gb"] = {}, peak  # nvidia-smi named none of the run's processes
    info = {"device": "gpu", "gpu": "1 x NVIDIA H100", "rollout": "hf", "model_size": "0.5b", "n_params": 2**28,
            "ranks": 1, "rows_per_step": 128, "positive_fraction_requested": 0.25, "response_length": 256}
    result = cost.report(runs, tmp_path, info, "cost_gpu")
    md = (tmp_path / "cost_gpu.md").read_text()
    assert "nvidia-smi, `" not in md and result["gpu_memory_source"] == "torch.cuda.max_memory_allocated"
    head = "| GPU, torch max_memory_allocated (nvidia-smi named no process of the run), "
    assert f"{head}trainer worker (actor + siamese/reference) | 5.30 | 4.80 |" in md
    assert f"{head}hf rollout server | 3.50 | 2.75 |" in md
    # where nvidia-smi does name them, its table; verl's vLLM rollout prints no peak: that role is left out
    rows, source = cost.gpu_memory_rows({"popo": {"ray::WorkerDict": 7.0}, "grpo": {}}, {})
    assert (rows, source) == (["| GPU, nvidia-smi, `ray::WorkerDict` | 7.00 | 0.00 |"], "nvidia-smi")
    rows, _ = cost.gpu_memory_rows({}, {"popo": {cost.TRAINER_ROLE: 5.0, cost.ROLLOUT_ROLE: float("nan")},
                                        "grpo": {cost.TRAINER_ROLE: 4.0, cost.ROLLOUT_ROLE: float("nan")}})
    assert rows == [f"{head}trainer worker (actor + siamese/reference) | 5.00 | 4.00 |"]


# ================================================================================================ scripts/gpu_check.sh
def _bin_without_gpu(tmp_path, nvidia_smi: str | None = None) -> Path:
    """A PATH with only what the script needs before its GPU check (and, if given, a stand-in nvidia-smi)."""
    import shutil

    b = tmp_path / "bin"
    b.mkdir()
    (b / "python").symlink_to(sys.executable)
    for tool in ("dirname", "date", "grep", "mkdir", "tail", "cat"):
        found = shutil.which(tool)
        if found:
            (b / tool).symlink_to(found)
    if nvidia_smi is not None:
        (b / "nvidia-smi").write_text("#!/bin/sh\n" + nvidia_smi)
        (b / "nvidia-smi").chmod(0o755)
    return b


def _gpu_check(tmp_path, path: Path, *args, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("POPO_VERL_CPU", "VERL_PLATFORM")}
    e.update(PATH=str(path), OUT_DIR=str(tmp_path / "out"), **env)
    t0 = time.time()
    r = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                       env=e, timeout=120, cwd=str(tmp_path))
    return r, time.time() - t0


def test_script_without_nvidia_smi_fails_at_once(tmp_path):
    r, took = _gpu_check(tmp_path, _bin_without_gpu(tmp_path))
    assert r.returncode == 2 and took < 10, (r.returncode, took, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines == ["gpu_check: no GPU: nvidia-smi not found (this script is for a CUDA machine; on the CPU run "
                     "scripts/run_tiny_cpu.sh)"], r.stderr
    assert r.stdout == "" and not (tmp_path / "out").exists(), "nothing ran, nothing written"


def test_script_where_torch_sees_no_cuda_fails_saying_so(tmp_path):
    """nvidia-smi answers but this Python sees no CUDA device (a CPU-only torch here; CUDA_VISIBLE_DEVICES=""
    hides the GPUs where there are some)."""
    path = _bin_without_gpu(tmp_path, 'echo "GPU 0: Stand-in GPU (UUID: GPU-0)"\n')
    r, took = _gpu_check(tmp_path, path, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 2 and took < 30, (r.returncode, took, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU usable: torch ")
    assert "sees no CUDA device although nvidia-smi lists 1" in lines[0]


def test_script_where_nvidia_smi_finds_no_driver(tmp_path):
    path = _bin_without_gpu(tmp_path, 'echo "NVIDIA-SMI has failed because it could not communicate with the driver." >&2\nexit 9\n')
    r, _ = _gpu_check(tmp_path, path)
    assert r.returncode == 2
    assert r.stderr.strip() == ("gpu_check: no GPU: nvidia-smi lists none (NVIDIA-SMI has failed because it could not "
                                "communicate with the driver.)")


def test_script_refuses_an_unknown_engine(tmp_path):
    r, _ = _gpu_check(tmp_path, _bin_without_gpu(tmp_path), "tpu")
    assert r.returncode == 2 and "unknown engine 'tpu' (known: fsdp2 megatron)" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("megatron") is not None, reason="megatron-core is installed here")
def test_script_megatron_without_megatron_core(tmp_path):
    r, took = _gpu_check(tmp_path, _bin_without_gpu(tmp_path), "megatron")
    assert r.returncode == 2 and took < 10
    assert r.stderr.strip() == ("gpu_check: megatron-core is not installed: pip install -e \".[megatron]\" "
                                "(or run without 'megatron')")


def test_overrides_command_prints_the_gpu_overrides(capsys):
    assert gpu_check.main(["overrides", "--rollout", "vllm"]) == 0
    assert capsys.readouterr().out.splitlines() == gpu_check.gpu_overrides("vllm")
    assert gpu_check.main(["overrides", "--rollout", "hf", "--engine", "megatron"]) == 0
    assert capsys.readouterr().out.splitlines() == gpu_check.gpu_overrides("hf", "megatron")


def _log(steps: dict[int, dict[str, float]]) -> str:
    """verl's console lines (np.float64 reprs included) among other output."""
    lines = ["(TaskRunner pid=1) some noise"]
    for s, m in steps.items():
        lines.append(f"(TaskRunner pid=1) step:{s} - " + " - ".join(f"{k}:np.float64({v})" for k, v in m.items()))
    return "\n".join(lines) + "\n"


POPO_STEPS = {
    1: {"timing_s/update_actor": 9.0, "timing_s/step": 20.0, "timing_s/ref": 1.0, "actor/perf/max_memory_allocated_gb": 3.1},
    2: {"timing_s/update_actor": 0.5, "timing_s/step": 4.0, "timing_s/ref": 0.2, "actor/perf/max_memory_allocated_gb": 3.4,
        "popo/positive_ratio": 0.25},
    3: {"timing_s/update_actor": 0.7, "timing_s/step": 4.4, "timing_s/ref": 0.2, "actor/perf/max_memory_allocated_gb": 3.2,
        "popo/positive_ratio": 0.25},
    4: {"timing_s/update_actor": 0.6, "timing_s/step": 5.0, "timing_s/ref": 0.3, "actor/perf/max_memory_allocated_gb": 3.3,
        "popo/positive_ratio": 0.375},
}
GRPO_STEPS = {
    1: {"timing_s/update_actor": 8.0, "timing_s/step": 30.0, "timing_s/ref": 2.0, "actor/perf/max_memory_allocated_gb": 2.9},
    2: {"timing_s/update_actor": 2.0, "timing_s/step": 5.0, "timing_s/ref": 1.0, "actor/perf/max_memory_allocated_gb": 3.0},
    3: {"timing_s/update_actor": 2.4, "timing_s/step": 5.5, "timing_s/ref": 1.0, "actor/perf/max_memory_allocated_gb": 3.0},
}


def test_report_ratios_from_step_lines(tmp_path, capsys):
    popo, grpo = tmp_path / "popo.log", tmp_path / "grpo.log"
    popo.write_text(_log(POPO_STEPS))
    grpo.write_text(_log(GRPO_STEPS))
    rc = gpu_check.main(["report", "--header", "1 x Stand-in; engine fsdp2; rollout hf", "--stage", "tests=0",
                         "--stage", "popo=0", "--stage", "grpo=0", "--popo", str(popo), "--grpo", str(grpo),
                         "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    # medians over steps 2.. : POPO update 0.6, step 4.4, ref 0.2; GRPO update 2.2, step 5.25, ref 1.0
    fig = json.loads((tmp_path / "r.json").read_text())
    assert fig["phases"]["update_actor"]["ratio"] == pytest.approx(0.6 / 2.2)
    assert fig["phases"]["step"]["ratio"] == pytest.approx(4.4 / 5.25)
    assert fig["phases"]["ref"]["ratio"] == pytest.approx(0.2)
    assert fig["peak_memory_gb"] == {"popo": 3.4, "grpo": 3.0}
    assert fig["positive_fraction"] == 0.25 and fig["passed"] is True
    assert fig["stages"] == {"tests": 0, "popo": 0, "grpo": 0}
    assert out.splitlines()[0] == "gpu_check: 1 x Stand-in; engine fsdp2; rollout hf"
    assert "  update_actor      0.6000    2.2000      0.273" in out
    assert "  peak actor/perf/max_memory_allocated_gb: POPO 3.40 GB, GRPO 3.00 GB" in out
    assert "update_actor POPO/GRPO = 0.273, step POPO/GRPO = 0.838 at positive fraction 0.250" in out
    assert "gen " not in out, "phases neither run logged are left out"
    assert out.rstrip().endswith("gpu_check: PASS")


def test_report_fails_when_a_stage_failed_or_a_run_logged_nothing(tmp_path, capsys):
    popo = tmp_path / "popo.log"
    popo.write_text(_log(POPO_STEPS))
    rc = gpu_check.main(["report", "--stage", "tests=0", "--stage", "popo=0", "--stage", "grpo=1",
                         "--popo", str(popo), "--grpo", str(tmp_path / "missing.log")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "grpo   FAIL (rc 1)" in out and "tests  pass" in out
    assert "update_actor POPO/GRPO = n/a" in out and out.rstrip().endswith("gpu_check: FAIL")
    with pytest.raises(SystemExit):
        gpu_check.main(["report", "--stage", "tests"])


def test_one_step_runs_keep_their_only_step():
    from popo_verl.bench.phases import phase_medians

    assert phase_medians({1: {"timing_s/step": 2.0}})["step"] == 2.0
    assert phase_medians({1: {"timing_s/step": 9.0}, 2: {"timing_s/step": 2.0}, 3: {"timing_s/step": 4.0}})["step"] == 3.0
    assert math.isnan(phase_medians({})["step"])
