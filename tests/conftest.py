"""Shared fixtures: a tiny random Qwen3 model built locally (no download), verl's nested micro-batch as the
actor's loss receives it (tests/test_losses.py, tests/test_plugin.py), and the benchmark scripts as modules."""

import importlib.util
import os
from pathlib import Path

# The suite runs verl on the CPU backend, which is on only when asked for (popo_verl/cpu/platform.py); set before
# anything imports verl, and inherited by every subprocess and Ray worker the tests start.
os.environ.setdefault("POPO_VERL_CPU", "1")

import pytest
import torch
from tensordict import TensorDict

#: the test files that run the longest, longest first (seconds on 2 cores, stop 46's suite: about 500, 210, 180, 150,
#: 145, 80, 75; the Ctrl-C run shares test_e2e_cpu.py's KL-anchor run, the 2-rank POPO run test_multinode.py's).
#: pytest-xdist's loadfile hands whole files to its two workers in collection order: a long file collected last ran
#: alone at the end (19m46s; the work itself fits in about 16).
LONGEST_FILES = ("test_e2e_cpu.py", "test_learning.py", "test_lora.py", "test_multinode.py", "test_reward_modes.py",
                 "test_tiny_task.py", "test_baselines.py", "test_checkpoints.py", "test_run_output.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, the rest in their order (a stable sort), so that the last file to start is short."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.fixture(scope="session")
def tiny_random_model(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("tiny_random_model")
    cfg = Qwen3Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=2, pad_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir():
    """The default tiny task (seed 0), built once unless cached: what scripts/run_tiny_cpu.sh trains on."""
    from popo_verl.tiny import default_dir, ensure_built

    return ensure_built(default_dir())["root"]


def _load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def learning():
    """benchmarks/learning.py"""
    return _load_benchmark("learning")


@pytest.fixture(scope="session")
def exploration():
    """benchmarks/exploration.py"""
    return _load_benchmark("exploration")


@pytest.fixture(scope="session")
def rollout_learning():
    """benchmarks/rollout_learning.py"""
    return _load_benchmark("rollout_learning")


@pytest.fixture(scope="session")
def cost():
    """benchmarks/cost.py"""
    return _load_benchmark("cost")


# ------------------------------------------------------------------------------------------------ micro-batches
def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def make_micro_batch(seed=0, n=6, d=5, sim_weights=None, token_scale=1.0, dp=1):
    """A micro-batch as verl hands it to the loss: nested prompts/responses, per-token log-probs over the
    whole sequence (shifted by one), and the POPO fields the trainer writes."""
    from verl.utils import tensordict_utils as tu

    from popo_verl.protocol import POOLED_KEY, PRED_KEY, SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY

    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, 5, (n,), generator=g).tolist()
    r_len = torch.randint(1, 6, (n,), generator=g).tolist()
    R = max(r_len)
    seq_lp = [(-torch.rand(p + r, generator=g, dtype=torch.float64) * 3).requires_grad_() for p, r in zip(p_len, r_len)]
    resp_lp = torch.zeros(n, R, dtype=torch.float64)
    mask = torch.zeros(n, R)
    for i, (p, r) in enumerate(zip(p_len, r_len)):
        resp_lp[i, :r] = seq_lp[i].detach()[p - 1 : p + r - 1]
        mask[i, :r] = 1
    weights = torch.rand(n, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 0, 1, 0, 1.0] * (n // 6 + 1), dtype=torch.float64)[:n]
    entropy = [torch.rand(p + r, generator=g, dtype=torch.float64) for p, r in zip(p_len, r_len)]
    pred = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = weights / weights.sum() if sim_weights is None else sim_weights
    n_tok = float((mask.sum(-1) * (weights > 0)).sum()) if token_scale == 1.0 else float(mask.sum())
    data = TensorDict(
        {
            "input_ids": nested([torch.randint(3, 50, (p + r,), generator=g) for p, r in zip(p_len, r_len)]),
            "prompts": nested([torch.ones(p, dtype=torch.long) for p in p_len]),
            "responses": nested([torch.ones(r, dtype=torch.long) for r in r_len]),
            "response_mask": nested([torch.ones(r, dtype=torch.long) for r in r_len]),
            "old_log_probs": nested([resp_lp[i, :r] for i, r in enumerate(r_len)]),
            "advantages": nested([torch.full((r,), float(weights[i]), dtype=torch.float64) for i, r in enumerate(r_len)]),
            SIM_WEIGHT_KEY: nested([torch.full((r,), float(s[i]), dtype=torch.float64) for i, r in enumerate(r_len)]),
            TOKEN_SCALE_KEY: nested([torch.full((r,), token_scale, dtype=torch.float64) for r in r_len]),
            SIAMESE_KEY: target,
        },
        batch_size=[n],
    )
    tu.assign_non_tensor(data, dp_size=dp, batch_num_tokens=n_tok, global_batch_size=n)
    model_output = {"log_probs": nested(seq_lp), "entropy": nested(entropy), PRED_KEY: pred, POOLED_KEY: pred.detach()}
    ent_resp = torch.zeros(n, R, dtype=torch.float64)
    for i, (p, r) in enumerate(zip(p_len, r_len)):
        ent_resp[i, :r] = entropy[i][p - 1 : p + r - 1]
    return data, model_output, dict(resp_lp=resp_lp, mask=mask, weights=weights, ent=ent_resp, pred=pred, target=target, seq_lp=seq_lp)


@pytest.fixture
def micro_batch():
    """`make_micro_batch(seed, n, d, sim_weights, token_scale, dp)` -> (data, model_output, reference tensors)."""
    return make_micro_batch
