"""POPO's configuration: the one source of its defaults (`PopoConfig`), its typed view and validation.

Where a user sets it: `algorithm.popo.*` on the command line (hydra overrides), or in a config of their own that
composes `algorithm=popo`: the `algorithm/popo.yaml` group next to this file, which lists PopoConfig's defaults for
hydra (tests/test_hydra.py pins the two equal). The
driver validates it (`validate_popo_config`), then hands it to the workers as `actor_rollout_ref.popo`; every part
reads it through `popo_config`, never with defaults of its own. (`hydra_plugins/` only adds this package's config
folder to hydra's search path; `recipe/popo/config` holds the recipe's run configs, which compose `algorithm=popo`.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

WEIGHT_MODES = ("softmax", "uniform")
ENTROPY_ON = ("positives", "all")
ANCHORS = ("cosine", "kl")
NLL_NORMS = ("token", "sequence")
# binary: POPO as the paper defines it, for a verifier that scores 1 (correct) or 0 (wrong);
# threshold: any reward, positive iff r > tau_r, weights as in binary;
# graded: positive iff r > tau_r, and each positive's weight is scaled by its normalised reward.
REWARD_MODES = ("binary", "threshold", "graded")


@dataclass(frozen=True)
class PopoConfig:
    alpha: float = 0.1
    beta: float = 0.01
    tau: float = 0.995
    # binary (POPO as published: positive iff reward == 1, any other reward stops the run at its first step),
    # threshold (positive iff reward > tau_r) or graded (the same positives, weights scaled by the normalised reward)
    reward_mode: str = "binary"
    # None: unset. binary refuses a value (a user who sets a threshold has graded rewards in mind: they must
    # choose threshold or graded); threshold and graded read None as 0.0, the paper's tau_r
    tau_r: float | None = None
    weight_mode: str = "softmax"
    weight_temperature: float = 1.0
    length_normalize_weights: bool = False
    feature_noise_std: float = 0.02
    predictor_hidden_dim: int = 1024
    predictor_layers: int = 2
    entropy_on: str = "positives"
    positives_only_update: bool = True
    kl_monitor_interval: int = 20
    drift_interval: int = 1
    anchor: str = "cosine"
    implicit_negative_interval: int = 0
    # token: verl's global token mean (POPO.md's L_nll, the same normalisation as verl's GRPO baseline);
    # sequence: each response weighs w whatever its length (close to the reference's 2-row micro-batches)
    nll_norm: str = "token"
    # max norm of the predictor head's own gradient clip (0 = none, as in the reference); the policy is
    # clipped alone by actor.optim.clip_grad either way
    predictor_clip_grad: float = 0.0
    # positive-aware dynamic sampling (replay_buffer.py): keep generating until the step's batch holds at least
    # this many groups with a positive (0 = off, verl's plain sampling), within max_gen_rounds x train_batch_size
    # prompts generated per step
    min_groups_with_positive: int = 0
    max_gen_rounds: int = 3

    @property
    def reward_threshold(self) -> float | None:
        """tau_r as core.positive_mask takes it: None in binary mode, 0.0 when unset in the others."""
        if self.reward_mode == "binary":
            return None
        return 0.0 if self.tau_r is None else self.tau_r


def popo_defaults() -> dict:
    return asdict(PopoConfig())


def _popo_section(config) -> dict:
    algo = config.get("algorithm", None) if hasattr(config, "get") else None
    popo = algo.get("popo", None) if algo is not None else None
    if popo is None:
        raise ValueError("algorithm.popo is missing: compose the config with algorithm=popo")
    return dict(popo)


def get_popo_config(config) -> PopoConfig:
    """The typed `algorithm.popo` of a composed config."""
    return popo_config(_popo_section(config))


def popo_config(section) -> PopoConfig:
    """A `popo` section (algorithm.popo, or the workers' actor_rollout_ref.popo) as a PopoConfig, PopoConfig's
    defaults for the keys it leaves out."""
    section = dict(section or {})
    known = {f.name: f.type for f in fields(PopoConfig)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"algorithm.popo has unknown keys {unknown}; known: {sorted(known)}")
    values = popo_defaults()
    values.update(section)
    casts = {"float": float, "int": int, "bool": bool, "str": str, "float | None": lambda v: None if v is None else float(v)}
    return PopoConfig(**{k: casts[str(known[k])](v) for k, v in values.items()})


def megatron_missing(vanilla_mbridge: bool) -> list[str]:
    """The packages verl's Megatron engine would fail to import in its workers, after start-up (found, not imported)."""
    import importlib.util

    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing
            return False

    wanted = {"megatron-core": "megatron.core", **({"mbridge": "mbridge"} if vanilla_mbridge else {})}
    return [pkg for pkg, module in wanted.items() if not found(module)]


def _validate_dynamic_sampling(config, cfg: PopoConfig) -> None:
    p = "algorithm.popo."
    batch = (config.get("data", None) or {}).get("train_batch_size", None)
    if cfg.min_groups_with_positive < 0 or (batch is not None and cfg.min_groups_with_positive > int(batch)):
        raise ValueError(
            f"{p}min_groups_with_positive must lie in [0, data.train_batch_size={batch}] (0 = off; a batch holds "
            f"train_batch_size groups), got {cfg.min_groups_with_positive}"
        )
    if cfg.max_gen_rounds < 1:
        raise ValueError(f"{p}max_gen_rounds must be >= 1 (rounds of train_batch_size prompts per step), got {cfg.max_gen_rounds}")
    filter_groups = (config.get("algorithm", None) or {}).get("filter_groups", None) or {}
    if bool(filter_groups.get("enable", False)):
        raise ValueError(
            "algorithm.filter_groups.enable=true (DAPO's dynamic sampling) drops the all-correct groups, which POPO "
            f"trains on: use {p}min_groups_with_positive=K instead (it replaces only the groups without a positive)"
        )
    if cfg.min_groups_with_positive > 0:
        sampler = ((config.get("trainer", None) or {}).get("v1", None) or {}).get("sampler", None) or {}
        custom = sampler.get("custom_sampler", None) or {}
        if custom.get("path") and custom.get("name"):
            raise ValueError(
                f"{p}min_groups_with_positive brings its own replay buffer (popo_verl/replay_buffer.py): it cannot run "
                "with trainer.v1.sampler.custom_sampler; unset one of the two"
            )
        reward_model = (config.get("reward", None) or {}).get("reward_model", None) or {}
        if bool(reward_model.get("enable", False)) and not bool(reward_model.get("enable_resource_pool", False)):
            raise ValueError(
                f"{p}min_groups_with_positive needs each group's rewards while generating: use a rule-based reward or "
                "reward.reward_model.enable_resource_pool=true (a colocated reward model scores only after sampling)"
            )


def _validate_lora(config) -> None:
    """LoRA (model.lora_rank > 0): what POPO's LoRA siamese (engines/fsdp.py `LoraSiamese`) is built and tested for."""
    ref = config.actor_rollout_ref
    model = ref.get("model", None) or {}
    rank = int(model.get("lora_rank", 0) or 0)
    megatron_rank = int((model.get("lora", None) or {}).get("rank", 0) or 0)
    m = "actor_rollout_ref.model."
    if model.get("lora_adapter_path", None):
        raise ValueError(f"{m}lora_adapter_path (starting from a trained adapter) is not supported with POPO yet")
    if rank <= 0 and megatron_rank <= 0:
        return
    actor = ref.get("actor", None) or {}
    strategy = str(actor.get("strategy", ""))
    if strategy == "megatron" or rank <= 0:
        raise ValueError(
            f"POPO with LoRA runs on the FSDP engines (strategy fsdp|fsdp2, {m}lora_rank > 0); got strategy={strategy}, "
            f"{m}lora_rank={rank}, {m}lora.rank={megatron_rank}"
        )
    if bool((actor.get("checkpoint", None) or {}).get("save_lora_only", False)):
        raise ValueError(
            "actor_rollout_ref.actor.checkpoint.save_lora_only=true would leave POPO's predictor head out of the "
            "checkpoint (it is not an adapter): keep it false"
        )
    if str((ref.get("rollout", None) or {}).get("name", "")) == "hf" and not bool((model.get("lora", None) or {}).get("merge", False)):
        raise ValueError(
            f"the hf rollout loads whole weights, not LoRA adapters: set {m}lora.merge=true with rollout.name=hf"
        )


def validate_popo_config(config) -> PopoConfig:
    """Raise ValueError naming the offending key for any value POPO cannot run with."""
    cfg = get_popo_config(config)
    _validate_lora(config)  # first: LoRA on Megatron is refused whether or not megatron-core is installed
    p = "algorithm.popo."
    if not 0.0 <= cfg.tau <= 1.0:
        raise ValueError(f"{p}tau must lie in [0, 1], got {cfg.tau}")
    for key in ("alpha", "beta", "feature_noise_std"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{p}{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.predictor_layers != 0 and cfg.predictor_layers < 2:
        raise ValueError(f"{p}predictor_layers must be 0 (identity head, the ablation) or >= 2, got {cfg.predictor_layers}")
    if cfg.anchor not in ANCHORS:
        raise ValueError(f"{p}anchor must be one of {ANCHORS}, got {cfg.anchor!r}")
    if cfg.anchor == "kl" and not cfg.positives_only_update:
        raise ValueError(f"{p}anchor=kl reads the siamese's log-probs of the positives only: keep {p}positives_only_update=true")
    if cfg.nll_norm not in NLL_NORMS:
        raise ValueError(f"{p}nll_norm must be one of {NLL_NORMS}, got {cfg.nll_norm!r}")
    if cfg.predictor_clip_grad < 0:
        raise ValueError(f"{p}predictor_clip_grad must be >= 0 (0 = no clip), got {cfg.predictor_clip_grad}")
    actor = config.actor_rollout_ref.get("actor", None) or {}
    agg = str(actor.get("loss_agg_mode", "token-mean"))
    if agg.startswith("seq-mean"):
        raise ValueError(
            f"actor_rollout_ref.actor.loss_agg_mode={agg} is not supported with POPO (its padding rows would count "
            f"as sequences); for a per-sequence NLL set {p}nll_norm=sequence and keep loss_agg_mode=token-mean"
        )
    if bool(actor.get("shuffle", False)) and cfg.positives_only_update:
        raise ValueError(
            "actor_rollout_ref.actor.shuffle=true is not supported with POPO's positives-only update: the update "
            "batch is laid out so that every mini-batch holds real rows; set it to false"
        )
    if str(actor.get("strategy", "")) == "megatron":
        missing = megatron_missing(bool((actor.get("megatron", None) or {}).get("vanilla_mbridge", False)))
        if missing:
            raise ValueError(
                f"actor_rollout_ref.actor.strategy=megatron needs {' and '.join(missing)}, not installed here: "
                "pip install -e '.[megatron]' (GPU) or '.[megatron-cpu]' (CPU)"
            )
    if cfg.implicit_negative_interval < 0:
        raise ValueError(f"{p}implicit_negative_interval must be >= 0, got {cfg.implicit_negative_interval}")
    if cfg.predictor_hidden_dim < 1:
        raise ValueError(f"{p}predictor_hidden_dim must be >= 1, got {cfg.predictor_hidden_dim}")
    if not cfg.weight_temperature > 0:
        raise ValueError(f"{p}weight_temperature must be > 0, got {cfg.weight_temperature}")
    if cfg.weight_mode not in WEIGHT_MODES:
        raise ValueError(f"{p}weight_mode must be one of {WEIGHT_MODES}, got {cfg.weight_mode!r}")
    if cfg.entropy_on not in ENTROPY_ON:
        raise ValueError(f"{p}entropy_on must be one of {ENTROPY_ON}, got {cfg.entropy_on!r}")
    if cfg.entropy_on == "all" and cfg.positives_only_update:
        raise ValueError(
            f"{p}entropy_on=all needs the negatives in the update: set {p}positives_only_update=false"
        )
    if cfg.reward_mode not in REWARD_MODES:
        raise ValueError(f"{p}reward_mode must be one of {REWARD_MODES}, got {cfg.reward_mode!r}")
    if cfg.reward_mode == "binary" and cfg.tau_r is not None:
        raise ValueError(
            f"{p}tau_r={cfg.tau_r} is a reward threshold, which {p}reward_mode=binary (the default) does not use: "
            f"binary takes a response as positive iff its reward is 1 and stops at any reward outside {{0, 1}}. "
            f"For graded rewards set {p}reward_mode=threshold (positive iff reward > tau_r) or {p}reward_mode=graded "
            f"(the same positives, weighted by their normalised reward); with binary rewards drop tau_r"
        )
    if cfg.tau_r is not None and not math.isfinite(cfg.tau_r):
        raise ValueError(f"{p}tau_r must be finite, got {cfg.tau_r}")
    if cfg.kl_monitor_interval < 0:
        raise ValueError(f"{p}kl_monitor_interval must be >= 0, got {cfg.kl_monitor_interval}")
    if cfg.drift_interval < 0:
        raise ValueError(f"{p}drift_interval must be >= 0, got {cfg.drift_interval}")
    _validate_dynamic_sampling(config, cfg)
    n = config.actor_rollout_ref.rollout.n
    if n < 2:
        raise ValueError(f"actor_rollout_ref.rollout.n must be >= 2 for POPO (a group needs several responses), got {n}")
    # The reward function's setting, checked here so that a bad value stops the run in the driver, not at step 1.
    from popo_verl.reward import max_verifier_error_share

    max_verifier_error_share(config)
    return cfg
