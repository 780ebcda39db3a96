"""`algorithm=popo` through verl's real command line (hydra search-path plugin + config source)."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from popo_verl.config import PopoConfig, get_popo_config, popo_defaults, validate_popo_config

POPO_MD_DEFAULTS = dict(
    alpha=0.1, beta=0.01, tau=0.995, reward_mode="binary", tau_r=None, weight_mode="softmax", weight_temperature=1.0,
    length_normalize_weights=False, feature_noise_std=0.02, predictor_hidden_dim=1024, predictor_layers=2,
    entropy_on="positives", positives_only_update=True,
)


def compose(*overrides: str, env: dict | None = None) -> str:
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", *overrides, "--cfg", "job"],
        capture_output=True, text=True, env=e, timeout=300, cwd="/",
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return r.stdout


@pytest.fixture(scope="module")
def stock_job():
    return compose(env={"POPO_VERL_HYDRA": "0"})


@pytest.mark.parametrize("spelling", [["algorithm=popo"], ["+algorithm=popo"], ["model_engine=megatron", "algorithm=popo"]])
def test_spellings_compose_to_popo(spelling, stock_job):
    cfg = OmegaConf.create(compose(*spelling))
    assert cfg.algorithm.adv_estimator == "popo"
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "popo"
    assert cfg.actor_rollout_ref.actor.use_kl_loss is False
    assert cfg.algorithm.use_kl_in_reward is False
    assert cfg.trainer.v1.trainer_mode == "popo"
    for key, value in POPO_MD_DEFAULTS.items():
        assert cfg.algorithm.popo[key] == value, key
    # the rollout-correction default survives (never `algorithm@algorithm.rollout_correction=`)
    stock = OmegaConf.create(stock_job)
    if "megatron" not in spelling[0]:
        assert cfg.algorithm.rollout_correction == stock.algorithm.rollout_correction


def test_without_algorithm_the_config_is_stock(stock_job):
    assert compose() == stock_job


def test_verls_megatron_config_composes_as_stock_and_with_popo():
    """`--config-name ppo_megatron_trainer` (verl's Megatron examples) includes ppo_trainer.yaml and ends its defaults
    with `override model_engine: megatron`: the plugin once appended `algorithm: null` after that override, and hydra
    refused the config with the plugin installed ("Override 'model_engine : megatron' is defined before ...")."""
    name = ("--config-name", "ppo_megatron_trainer")
    assert compose(*name) == compose(*name, env={"POPO_VERL_HYDRA": "0"})
    cfg = OmegaConf.create(compose(*name, "algorithm=popo"))
    assert cfg.algorithm.adv_estimator == "popo" and cfg.actor_rollout_ref.actor.strategy == "megatron"
    assert cfg.trainer.v1.trainer_mode == "popo"


def test_stock_hydra_refuses_the_bare_spelling():
    """Why the config source exists: without it, verl's defaults have no `algorithm` group."""
    with pytest.raises(RuntimeError, match="algorithm"):
        compose("algorithm=popo", env={"POPO_VERL_HYDRA": "0"})


def test_the_yaml_group_lists_popoconfigs_defaults():
    """PopoConfig is the one source of the defaults; algorithm/popo.yaml lists them for hydra and must agree."""
    from pathlib import Path

    import popo_verl.config

    yaml = Path(popo_verl.config.__file__).parent / "algorithm" / "popo.yaml"
    assert dict(OmegaConf.load(yaml).algorithm.popo) == popo_defaults()


def test_defaults_match_popo_md():
    assert popo_defaults() == {**POPO_MD_DEFAULTS, "kl_monitor_interval": 20, "drift_interval": 1, "anchor": "cosine",
                               "implicit_negative_interval": 0, "nll_norm": "token", "predictor_clip_grad": 0.0,
                               "min_groups_with_positive": 0, "max_gen_rounds": 3}


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("tau", 1.5, "algorithm.popo.tau"),
        ("tau", -0.1, "algorithm.popo.tau"),
        ("alpha", -1.0, "algorithm.popo.alpha"),
        ("beta", -0.5, "algorithm.popo.beta"),
        ("feature_noise_std", -0.01, "algorithm.popo.feature_noise_std"),
        ("drift_interval", -1, "algorithm.popo.drift_interval"),
        ("predictor_layers", 1, "algorithm.popo.predictor_layers"),
        ("weight_mode", "greedy", "algorithm.popo.weight_mode"),
        ("entropy_on", "negatives", "algorithm.popo.entropy_on"),
        ("weight_temperature", 0.0, "algorithm.popo.weight_temperature"),
        ("anchor", "l2", "algorithm.popo.anchor"),
        ("implicit_negative_interval", -1, "algorithm.popo.implicit_negative_interval"),
        ("nll_norm", "row", "algorithm.popo.nll_norm"),
        ("predictor_clip_grad", -1.0, "algorithm.popo.predictor_clip_grad"),
        ("reward_mode", "partial", "algorithm.popo.reward_mode must be one of"),
        ("tau_r", 0.5, r"algorithm.popo.tau_r=0.5 is a reward threshold.*algorithm.popo.reward_mode=threshold"),
        ("min_groups_with_positive", -1, "algorithm.popo.min_groups_with_positive"),
        ("max_gen_rounds", 0, "algorithm.popo.max_gen_rounds"),
    ],
)
def test_bad_values_fail_naming_the_key(key, value, match):
    cfg = OmegaConf.create({"algorithm": {"popo": {**POPO_MD_DEFAULTS, key: value}}, "actor_rollout_ref": {"rollout": {"n": 8}}})
    with pytest.raises(ValueError, match=match):
        validate_popo_config(cfg)


def test_entropy_on_all_needs_negatives_and_n_needs_two():
    base = {"algorithm": {"popo": dict(POPO_MD_DEFAULTS)}, "actor_rollout_ref": {"rollout": {"n": 8}}}
    cfg = OmegaConf.create(base)
    cfg.algorithm.popo.entropy_on = "all"
    with pytest.raises(ValueError, match="positives_only_update"):
        validate_popo_config(cfg)
    cfg.algorithm.popo.positives_only_update = False
    assert isinstance(validate_popo_config(cfg), PopoConfig)
    cfg.actor_rollout_ref.rollout.n = 1
    with pytest.raises(ValueError, match="actor_rollout_ref.rollout.n"):
        validate_popo_config(cfg)


def test_ablation_options_validate():
    base = {"algorithm": {"popo": dict(POPO_MD_DEFAULTS)}, "actor_rollout_ref": {"rollout": {"n": 8}}}
    cfg = OmegaConf.create(base)
    cfg.algorithm.popo.predictor_layers = 0  # the identity head
    cfg.algorithm.popo.anchor = "kl"
    assert validate_popo_config(cfg).anchor == "kl"
    cfg.algorithm.popo.positives_only_update = False
    with pytest.raises(ValueError, match="anchor=kl"):
        validate_popo_config(cfg)
    composed = OmegaConf.create(compose("algorithm=popo"))
    assert composed.algorithm.popo.anchor == "cosine" and composed.algorithm.popo.implicit_negative_interval == 0


def test_seq_mean_loss_modes_are_refused_pointing_at_nll_norm():
    """Padding rows of the positives' update batch would count as sequences: refused at start, with the key to use."""
    cfg = OmegaConf.create(compose("algorithm=popo"))
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        cfg.actor_rollout_ref.actor.loss_agg_mode = agg
        with pytest.raises(ValueError, match="nll_norm=sequence"):
            validate_popo_config(cfg)
    cfg.actor_rollout_ref.actor.loss_agg_mode = "token-mean"
    cfg.algorithm.popo.nll_norm = "sequence"
    assert validate_popo_config(cfg).nll_norm == "sequence"


def test_shuffle_is_refused_with_the_positives_only_update():
    cfg = OmegaConf.create(compose("algorithm=popo", "actor_rollout_ref.actor.shuffle=true"))
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.shuffle"):
        validate_popo_config(cfg)
    cfg.algorithm.popo.positives_only_update = False  # verl's own batch layout: shuffling is harmless there
    assert isinstance(validate_popo_config(cfg), PopoConfig)


def test_composed_bad_value_is_caught():
    cfg = OmegaConf.create(compose("algorithm=popo", "algorithm.popo.tau=1.5"))
    with pytest.raises(ValueError, match="algorithm.popo.tau must lie in"):
        validate_popo_config(cfg)
    with pytest.raises(ValueError, match="unknown keys"):
        get_popo_config(OmegaConf.create({"algorithm": {"popo": {"taux": 1}}}))


def test_reward_modes_validate_and_resolve_tau_r():
    """binary (the default) takes no threshold, not even the old default 0.0 (a config that sets one has to say
    which mode it means); threshold and graded read an unset tau_r as 0.0, the paper's."""
    base = {"algorithm": {"popo": dict(POPO_MD_DEFAULTS)}, "actor_rollout_ref": {"rollout": {"n": 8}}}
    cfg = OmegaConf.create(base)
    assert validate_popo_config(cfg).reward_threshold is None
    cfg.algorithm.popo.tau_r = 0.0
    with pytest.raises(ValueError, match="reward_mode=graded"):
        validate_popo_config(cfg)
    for mode in ("threshold", "graded"):
        cfg.algorithm.popo.reward_mode = mode
        cfg.algorithm.popo.tau_r = None
        assert validate_popo_config(cfg).reward_threshold == 0.0
        cfg.algorithm.popo.tau_r = 0.3
        assert validate_popo_config(cfg).reward_threshold == 0.3
        cfg.algorithm.popo.tau_r = float("inf")
        with pytest.raises(ValueError, match="algorithm.popo.tau_r must be finite"):
            validate_popo_config(cfg)


def test_composed_reward_mode_defaults_and_overrides():
    cfg = OmegaConf.create(compose("algorithm=popo"))
    assert cfg.algorithm.popo.reward_mode == "binary" and cfg.algorithm.popo.tau_r is None
    cfg = OmegaConf.create(compose("algorithm=popo", "algorithm.popo.reward_mode=graded", "algorithm.popo.tau_r=0.3"))
    popo = validate_popo_config(cfg)
    assert (popo.reward_mode, popo.tau_r, popo.reward_threshold) == ("graded", 0.3, 0.3)


def test_megatron_without_megatron_core_fails_before_start_up():
    """strategy=megatron where megatron-core (or, with vanilla_mbridge, mbridge) is missing: verl would find out in
    its workers after start-up; the driver's check names what to install."""
    from popo_verl.config import megatron_missing

    base = {"algorithm": {"popo": dict(POPO_MD_DEFAULTS)},
            "actor_rollout_ref": {"rollout": {"n": 8}, "actor": {"strategy": "megatron", "megatron": {"vanilla_mbridge": True}}}}
    cfg = OmegaConf.create(base)
    missing = megatron_missing(True)
    if missing:
        with pytest.raises(ValueError, match=r"strategy=megatron needs .*pip install -e '\.\[megatron\]'"):
            validate_popo_config(cfg)
    else:
        assert isinstance(validate_popo_config(cfg), PopoConfig)
    import importlib.util

    assert ("megatron-core" in missing) == (importlib.util.find_spec("megatron") is None)
    cfg.actor_rollout_ref.actor.strategy = "fsdp2"
    assert isinstance(validate_popo_config(cfg), PopoConfig)
