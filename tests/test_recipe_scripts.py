"""The paper's run scripts, read back from `--cfg job`: each preset's values are the reference's, POPO and its GRPO
twin differ only in algorithm keys for every model and preset, ablations and sweeps change one knob each, and a
run without GPU or model fails in seconds, saying which. Also: the recipe entry composes like main_ppo."""

import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from popo_verl.config import validate_popo_config
from popo_verl.templates import chat_template

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
ALLOWED_PREFIXES = (
    "algorithm.",
    "actor_rollout_ref.actor.policy_loss.",
    "actor_rollout_ref.actor.use_kl_loss",
    "actor_rollout_ref.actor.kl_loss",
    "actor_rollout_ref.actor.entropy_coeff",
    # the paper's TRL baseline averages per sequence (GRPO_BASELINE=paper); POPO keeps token-mean (its own
    # per-sequence option is algorithm.popo.nll_norm), so this is an algorithm key of the twin
    "actor_rollout_ref.actor.loss_agg_mode",
    "actor_rollout_ref.ref.",
    "trainer.v1.trainer_mode",
    "trainer.experiment_name",
    "trainer.default_local_dir",
)
# (MODEL, SIZE) -> (hub id, prompt template); the Qwen-Math pair is composed through the historical script names
MODELS = {
    ("qwen2.5-math", "7b"): ("Qwen/Qwen2.5-Math-7B", "qwen_math"),
    ("qwen2.5-math", "1.5b"): ("Qwen/Qwen2.5-Math-1.5B", "qwen_math"),
    ("r1-distill", "1.5b"): ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1"),
    ("r1-distill", "7b"): ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "r1"),
    ("llama3.1-instruct", "8b"): ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
    ("deepseek-math", "7b"): ("deepseek-ai/deepseek-math-7b-base", "deepseek"),
}
A = "actor_rollout_ref."


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _run(script, *args, env=None, timeout=300):
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), cwd="/")  # fmt: skip


def _docs(stdout: str) -> list[dict]:
    """The configs a script prints with --cfg job (ablate.sh / sweep.sh print one per variant)."""
    docs = [d for d in re.split(r"^# variant .*\n", stdout, flags=re.M) if d.strip()]
    return [OmegaConf.to_container(OmegaConf.create(d), resolve=False) for d in docs]


@functools.lru_cache(maxsize=None)
def _cfg_job(script, env_items=(), args=()) -> tuple:
    """What the script prints with --cfg job: verl's own composition, one verl start-up per config (seconds)."""
    r = _run(script, *args, "--cfg", "job", env=dict(env_items))
    assert r.returncode == 0, r.stderr[-3000:]
    return tuple(_docs(r.stdout))


# Stands in for `python` on the scripts' PATH: records verl's command line, runs anything else for real.
PYTHON_SHIM = """#!/usr/bin/env bash
if [[ "${1:-}" == -m && "${2:-}" == verl.trainer.main_ppo ]]; then
  shift 2
  printf '%s\\0' "$@" > "$POPO_TEST_ARGS_DIR/$(printf %04d "$(ls "$POPO_TEST_ARGS_DIR" | wc -l)")"
  exit 0
fi
exec REAL_PYTHON "$@"
"""


def _hydra_compose(overrides: list[str]) -> dict:
    import verl
    from hydra import compose, initialize_config_dir

    # main_ppo's own config (hydra.main(config_path="config", config_name="ppo_trainer")), search-path plugins included
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return OmegaConf.to_container(compose("ppo_trainer", overrides=overrides), resolve=False)


@functools.lru_cache(maxsize=None)
def _compose_all(script, env_items=(), args=()) -> tuple:
    """The configs of the verl command lines the script builds, composed in this process: what --cfg job prints
    (test_shim_composes_like_cfg_job), without a verl start-up per config."""
    with tempfile.TemporaryDirectory() as d:
        shim_dir, args_dir = Path(d, "bin"), Path(d, "args")
        shim_dir.mkdir(), args_dir.mkdir()
        (shim_dir / "python").write_text(PYTHON_SHIM.replace("REAL_PYTHON", sys.executable))
        (shim_dir / "python").chmod(0o755)
        env = dict(env_items, PATH=f"{shim_dir}:{os.environ['PATH']}", POPO_TEST_ARGS_DIR=str(args_dir))
        r = _run(script, *args, "--cfg", "job", env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        calls = [f.read_bytes().decode().split("\0")[:-1] for f in sorted(args_dir.iterdir())]
    assert calls and all(c[-2:] == ["--cfg", "job"] for c in calls)  # passed last, as any user override
    return tuple(_hydra_compose(c[:-2]) for c in calls)


def _compose(script, **env) -> dict:
    (cfg,) = _compose_all(script, tuple(sorted(env.items())))
    return cfg


@pytest.mark.parametrize(
    "script,env,args",
    [
        ("run_popo_qwen7b.sh", {}, ()),
        ("run_popo_qwen1.5b.sh", {}, ()),
        # --cfg job needs neither a GPU nor the model
        ("run_grpo_qwen7b.sh", {"GRPO_BASELINE": "paper", "MODEL_PATH": "/nonexistent", "CUDA_VISIBLE_DEVICES": ""}, ()),
        ("ablate.sh", {"SCRIPT": str(SCRIPTS / "run_popo_qwen1.5b.sh")}, ("uniform",)),
        ("sweep.sh", {"VALUES": "0.99"}, ("tau",)),
    ],
)
def test_shim_composes_like_cfg_job(script, env, args):
    """The scripts compose for real with --cfg job, to the configs the other tests read faster."""
    key = (script, tuple(sorted(env.items())), args)
    assert _cfg_job(*key) == _compose_all(*key)


def _twin(algo, model, size, **env):
    if model == "qwen2.5-math":
        return _compose(f"run_{algo}_qwen{size}.sh", **env)
    return _compose(f"run_{algo}.sh", MODEL=model, SIZE=size, **env)


def _differing(a, b):
    fa, fb = _flat(a), _flat(b)
    return {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}


@pytest.mark.parametrize("preset", ["paper", "verl"])
@pytest.mark.parametrize("model,size", list(MODELS))
def test_popo_and_grpo_twins_differ_only_in_algorithm_keys(model, size, preset):
    popo, grpo = _twin("popo", model, size, PRESET=preset), _twin("grpo", model, size, PRESET=preset)
    differing = _differing(popo, grpo)
    assert differing, "the two scripts must differ somewhere"
    stray = sorted(k for k in differing if not k.startswith(ALLOWED_PREFIXES))
    assert not stray, stray
    p, g = _flat(popo), _flat(grpo)
    assert p["algorithm.adv_estimator"] == "popo" and g["algorithm.adv_estimator"] == "grpo"
    # verl's GRPO, the default baseline
    assert g[A + "actor.use_kl_loss"] is True and g[A + "actor.kl_loss_type"] == "low_var_kl"
    assert g[A + "actor.kl_loss_coef"] == 0.001 and g[A + "actor.loss_agg_mode"] == "token-mean"
    validate_popo_config(OmegaConf.create(popo))
    hub_id, template = MODELS[(model, size)]
    assert p[A + "model.path"] == hub_id
    # the hand-written prompt layout of the model's family reaches verl intact through hydra
    assert p[A + "model.custom_chat_template"] == chat_template(template)
    assert p[A + "rollout.n"] == 8 and p["data.max_prompt_length"] == 512
    if model == "r1-distill":
        assert p["data.max_response_length"] == 4096
    assert p["trainer.experiment_name"] == f"popo_{model}-{size}_{preset}"
    assert g["trainer.experiment_name"] == f"grpo-verl_{model}-{size}_{preset}"


@pytest.mark.parametrize("model,size,preset", [("qwen2.5-math", "7b", "paper"), ("r1-distill", "1.5b", "verl")])
def test_paper_grpo_baseline_is_the_trl_one(model, size, preset):
    popo = _twin("popo", model, size, PRESET=preset)
    grpo = _twin("grpo", model, size, PRESET=preset, GRPO_BASELINE="paper")
    stray = sorted(k for k in _differing(popo, grpo) if not k.startswith(ALLOWED_PREFIXES))
    assert not stray, stray
    g = _flat(grpo)
    assert (g[A + "actor.kl_loss_coef"], g[A + "actor.kl_loss_type"]) == (0.01, "k3")
    assert g[A + "actor.loss_agg_mode"] == "seq-mean-token-mean"
    assert g["trainer.experiment_name"] == f"grpo-paper_{model}-{size}_{preset}"


def _budget(c):
    f = _flat(c)
    return {
        "prompts_per_rollout": f["data.train_batch_size"],
        "prompts_per_optimizer_step": f[A + "actor.ppo_mini_batch_size"],
        "responses_per_prompt": f[A + "rollout.n"],
        "steps": f["trainer.total_training_steps"],
        "warmup_steps": f[A + "actor.optim.lr_warmup_steps"],
        "lr": f[A + "actor.optim.lr"],
        "tau": f["algorithm.popo.tau"],
        "noise": f["algorithm.popo.feature_noise_std"],
        "predictor": f["algorithm.popo.predictor_hidden_dim"],
        "alpha": f["algorithm.popo.alpha"],
        "beta": f["algorithm.popo.beta"],
        "prompt": f["data.max_prompt_length"],
        "response": f["data.max_response_length"],
    }


def test_paper_preset_is_the_reference_7b_command():
    (c,) = _cfg_job("run_popo_qwen7b.sh")  # PRESET=paper is the default
    assert _budget(c) == dict(prompts_per_rollout=8, prompts_per_optimizer_step=8, responses_per_prompt=8, steps=1500,
                              warmup_steps=150, lr=1e-7, tau=0.999, noise=0.01, predictor=4096, alpha=0.1, beta=0.01,
                              prompt=512, response=1024)  # fmt: skip
    f = _flat(c)
    assert f[A + "actor.optim.lr_scheduler_type"] == "cosine" and f[A + "actor.optim.weight_decay"] == 0.01
    assert f[A + "actor.optim.clip_grad"] == 1.0 and f[A + "rollout.temperature"] == 1.0
    assert f[A + "rollout.top_p"] == 1.0 and f[A + "actor.ppo_epochs"] == 1
    assert f[A + "rollout.val_kwargs.temperature"] == 0.7 and f["trainer.save_freq"] == 500


def test_paper_preset_is_the_reference_default_config_for_1_5b():
    (c,) = _cfg_job("run_popo_qwen1.5b.sh")
    assert _budget(c) == dict(
        prompts_per_rollout=8, prompts_per_optimizer_step=8, responses_per_prompt=8, steps=1000, warmup_steps=100,
        lr=1e-6, tau=0.995, noise=0.02, predictor=1024, alpha=0.1, beta=0.01, prompt=512, response=512)  # fmt: skip


def test_verl_preset_keeps_the_verl_style_budget():
    c = _compose("run_popo_qwen7b.sh", PRESET="verl")
    b = _budget(c)
    assert (b["prompts_per_rollout"], b["prompts_per_optimizer_step"], b["steps"]) == (128, 64, 500)
    assert b["warmup_steps"] == -1 and _flat(c)[A + "actor.optim.lr_warmup_steps_ratio"] == 0.1
    assert (b["lr"], b["tau"], b["noise"], b["predictor"], b["response"]) == (1e-7, 0.999, 0.01, 4096, 1024)


def test_env_defaults_and_passthrough():
    c = _flat(_compose("run_popo_qwen7b.sh", MODEL_PATH="/models/m", N_GPUS_PER_NODE="4", EXPERIMENT_NAME="x",
                       LR="5e-7", CHAT_TEMPLATE="tokenizer"))  # fmt: skip
    assert c[A + "model.path"] == "/models/m" and c["trainer.n_gpus_per_node"] == 4
    assert c["trainer.experiment_name"] == "x" and c[A + "actor.optim.lr"] == 5e-7
    assert c[A + "model.custom_chat_template"] is None  # the tokenizer's own template
    # a hydra override after the script name wins over the script's own values
    (cfg,) = _compose_all("run_popo_qwen7b.sh", args=("trainer.total_training_steps=7", "algorithm.popo.tau=0.9"))
    assert cfg["trainer"]["total_training_steps"] == 7 and cfg["algorithm"]["popo"]["tau"] == 0.9


def test_gsm8k_run_reads_the_gsm8k_files():
    c = _flat(_compose("run_popo.sh", TRAIN_SET="gsm8k_train", VAL_SETS="gsm8k_test", DATA_DIR="/d"))
    assert c["data.train_files"] == "/d/gsm8k_train.parquet" and c["data.val_files"] == ["/d/gsm8k_test.parquet"]


ABLATIONS = {
    "uniform": ("weight_mode", "uniform"),
    "alpha0": ("alpha", 0),
    "beta0": ("beta", 0),
    "frozen-siamese": ("tau", 1.0),
    "no-predictor": ("predictor_layers", 0),
    "kl-anchor": ("anchor", "kl"),
    "noise0": ("feature_noise_std", 0),
}


def test_each_ablation_changes_one_knob_of_the_base_run():
    base = _compose("run_popo_qwen1.5b.sh")
    runs = _compose_all("ablate.sh", (("SCRIPT", str(SCRIPTS / "run_popo_qwen1.5b.sh")),), ("all",))
    assert len(runs) == len(ABLATIONS)
    dirs = set()
    for (name, (key, value)), cfg in zip(ABLATIONS.items(), runs):
        validate_popo_config(OmegaConf.create(cfg))
        assert cfg["algorithm"]["popo"][key] == value, name
        assert cfg["trainer"]["experiment_name"] == f"popo_qwen2.5-math-1.5b_paper_ablate-{name}"
        dirs.add(cfg["trainer"]["default_local_dir"])
        assert _differing(base, cfg) == {f"algorithm.popo.{key}", "trainer.experiment_name",
                                         "trainer.default_local_dir"}, name  # fmt: skip
    assert len(dirs) == len(ABLATIONS)  # no run resumes from another one's checkpoint


@pytest.mark.parametrize("knob,key", [("alpha", "alpha"), ("beta", "beta"), ("tau", "tau"),
                                      ("noise", "feature_noise_std")])  # fmt: skip
def test_sweep_sets_its_knob(knob, key):
    (cfg,) = _compose_all("sweep.sh", (("VALUES", "0.123"),), (knob,))
    assert cfg["algorithm"]["popo"][key] == 0.123
    assert cfg["trainer"]["experiment_name"] == f"popo_qwen2.5-math-7b_paper_sweep-{knob}-0.123"
    assert _differing(_compose("run_popo.sh"), cfg) == {f"algorithm.popo.{key}", "trainer.experiment_name",
                                                        "trainer.default_local_dir"}  # fmt: skip


@pytest.mark.parametrize(
    "script,args,env,message",
    [
        ("run_popo.sh", ["--cfg", "job"], {"MODEL": "gpt2"}, "unknown MODEL/SIZE"),
        ("run_popo.sh", ["--cfg", "job"], {"PRESET": "fast"}, "unknown PRESET"),
        ("run_grpo.sh", ["--cfg", "job"], {"GRPO_BASELINE": "trl"}, "GRPO_BASELINE must be verl or paper"),
        ("ablate.sh", ["nope", "--cfg", "job"], {}, "unknown ablation 'nope'"),
        ("ablate.sh", [], {}, "usage: bash scripts/ablate.sh"),
        ("sweep.sh", ["gamma", "--cfg", "job"], {}, "unknown knob 'gamma'"),
        ("ablate.sh", ["uniform", "--cfg", "job"], {"CKPT_DIR": "/tmp/x"}, "CKPT_DIR names a single run's directory"),
    ],
)
def test_bad_names_fail_with_the_known_ones(script, args, env, message):
    r = _run(script, *args, env=env, timeout=60)
    assert r.returncode == 2 and message in r.stderr


# ----------------------------------------------------------------------------------- no GPU, no model, no data
@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train", "math500", "aime24", "aime25", "amc23", "olympiadbench"):
        (d / f"{name}.parquet").write_bytes(b"")
    return d


def _fails_fast(script, env, message):
    t0 = time.time()
    r = _run(script, env=env, timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60 and not r.stdout.strip()  # verl never started (it would print its config)
    return r.stderr


def test_missing_data_is_reported_with_the_fix(tmp_path):
    _fails_fast("run_popo_qwen7b.sh", {"DATA_DIR": str(tmp_path)}, "python -m popo_verl.data prepare --out")


def test_no_gpu_fails_in_seconds(data_dir, tiny_random_model):
    env = {"DATA_DIR": str(data_dir), "MODEL_PATH": tiny_random_model, "CUDA_VISIBLE_DEVICES": ""}
    err = _fails_fast("run_popo_qwen7b.sh", env, "no GPU visible on this machine")
    assert "N_GPUS_PER_NODE=8" in err and "run_tiny_cpu.sh" in err
    assert "MODEL_PATH" not in err  # the model is there: only the GPU is named


@pytest.mark.parametrize(
    "model,message",
    [("/nonexistent/Qwen2.5-Math-7B", "no such directory"), ("acme/never-downloaded", "is unreachable")],
)
def test_missing_model_fails_in_seconds(data_dir, tmp_path, model, message):
    env = {"DATA_DIR": str(data_dir), "MODEL_PATH": model, "POPO_SKIP_GPU_CHECK": "1",
           # an empty cache and a hub that refuses connections, whatever network this machine has
           "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    err = _fails_fast("run_grpo_qwen1.5b.sh", env, message)
    assert f"MODEL_PATH={model}" in err and "GPU" not in err


def test_recipe_entry_composes_like_main_ppo():
    def job(*args):
        r = subprocess.run([sys.executable, "-m", *args, "--cfg", "job"], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    assert job("recipe.popo.main_popo") == job("verl.trainer.main_ppo", "algorithm=popo")


@pytest.mark.parametrize("engine", ["fsdp2", "megatron"])
def test_tiny_script_engine_block(engine, tiny_dir):
    """ENGINE picks the engine's own keys: FSDP2 with fp32 compute and its lr_scheduler_type, or verl's Megatron
    engine (its model_engine group) with mbridge and Megatron's lr_decay_style; the siamese gets the actor's layout."""
    cfg = _compose("run_tiny_cpu.sh", ENGINE=engine, TINY_DIR=tiny_dir, MEGATRON_TP="2", MEGATRON_CP="2",
                   N_GPUS_PER_NODE="4")
    arr = cfg["actor_rollout_ref"]
    assert arr["actor"]["strategy"] == arr["ref"]["strategy"] == ("megatron" if engine == "megatron" else "fsdp2")
    if engine == "fsdp2":
        assert arr["actor"]["optim"]["lr_scheduler_type"] == "cosine"
        assert arr["actor"]["fsdp_config"]["mixed_precision"]["param_dtype"] == "fp32"
        assert arr["ref"]["fsdp_config"]["mixed_precision"]["param_dtype"] == "fp32"
    else:
        assert cfg["model_engine"] == "megatron"
        assert arr["actor"]["optim"]["lr_decay_style"] == "cosine" and "lr_scheduler_type" not in arr["actor"]["optim"]
        assert "fsdp_config" not in arr["actor"]
        for role in ("actor", "ref"):
            m = arr[role]["megatron"]
            assert m["vanilla_mbridge"] is True
            assert (m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"], m["context_parallel_size"]) == (2, 1, 2)


@pytest.mark.parametrize("address, own_ray", [(None, True), ("local", True), ("127.0.0.1:6379", False)])
def test_tiny_script_starts_its_own_ray_unless_given_a_cluster(address, own_ray, tiny_dir):
    """RAY_ADDRESS=local is Ray's name for a fresh local instance (benchmarks/learning.py sets it for every run, which
    then found no GPU slot): the script declares its CPUs and GPU slots; a cluster's address joins it, declaring none."""
    env = {"TINY_DIR": tiny_dir, "N_GPUS_PER_NODE": "2", **({"RAY_ADDRESS": address} if address else {})}
    ray_init = _compose("run_tiny_cpu.sh", **env)["ray_kwargs"]["ray_init"]
    assert (ray_init.get("num_gpus") == 2) == own_ray
    assert (ray_init["num_cpus"] is None) == (not own_ray)


def test_tiny_script_refuses_an_unknown_engine():
    r = _run("run_tiny_cpu.sh", "--cfg", "job", env={"ENGINE": "deepspeed"}, timeout=60)
    assert r.returncode == 2 and "ENGINE must be fsdp2 or megatron, got 'deepspeed'" in r.stderr


@pytest.mark.parametrize("script,layout", [("run_popo_qwen7b.sh", (2, 2, 1)), ("run_grpo_qwen7b.sh", (2, 2, 1)),
                                           ("run_popo_qwen1.5b.sh", (1, 1, 1))])
def test_qwen_scripts_engine_megatron(script, layout):
    """ENGINE=megatron: verl's Megatron GRPO examples' TP/PP on 8 GPUs (7B: 2 x 2; 1.5B: 1 x 1), CP 1 unless
    MEGATRON_CP says, the same layout for the siamese (ref) as for the actor, bf16 and Megatron's schedule key."""
    env = {"ENGINE": "megatron", "MODEL_PATH": "/nonexistent", "CUDA_VISIBLE_DEVICES": ""}
    for cp in (None, "2"):
        cfg = _compose(script, **env, **({"MEGATRON_CP": cp} if cp else {}))
        arr = cfg["actor_rollout_ref"]
        assert cfg["model_engine"] == "megatron" and arr["actor"]["strategy"] == arr["ref"]["strategy"] == "megatron"
        want = (*layout[:2], int(cp or layout[2]))
        for role in ("actor", "ref"):
            m = arr[role]["megatron"]
            assert (m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"], m["context_parallel_size"]) == want
        assert arr["actor"]["megatron"]["dtype"] == "bfloat16" and arr["actor"]["optim"]["lr_decay_style"] == "cosine"


def test_tiny_script_refuses_an_unknown_rollout():
    r = _run("run_tiny_cpu.sh", "--cfg", "job", env={"ROLLOUT": "sglang"}, timeout=60)
    assert r.returncode == 2 and "ROLLOUT must be hf or vllm, got 'sglang'" in r.stderr


def test_tiny_script_vllm_without_its_environment_says_how_to_make_it(tmp_path):
    """ROLLOUT=vllm runs in the CPU vLLM environment; where there is none the script ends at once with the command
    that makes it, before building anything."""
    t0 = time.time()
    r = _run("run_tiny_cpu.sh", env={"ROLLOUT": "vllm", "VLLM_VENV": str(tmp_path / "none")}, timeout=60)
    assert r.returncode == 2 and time.time() - t0 < 10
    assert "bash scripts/install_vllm_cpu.sh" in r.stderr and str(tmp_path / "none") in r.stderr
