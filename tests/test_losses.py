"""POPO's actor loss (popo_verl/losses.py) against core.popo_loss, with verl's real data layout."""

import pytest
import torch
from tensordict import TensorDict

import verl  # noqa: F401
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig

from popo_verl import core
from popo_verl.engines.fsdp import POOLED_KEY, PRED_KEY
from popo_verl.losses import SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY, popo_actor_loss, row_keys
from popo_verl.trainer import spread_padding_order


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _batch(seed=0, n=6, d=5, sim_weights=None, token_scale=1.0, dp=1):
    """A micro-batch as verl hands it to the loss: nested prompts/responses, per-token log-probs over the
    whole sequence (shifted by one), and the POPO fields the trainer writes."""
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
    weights = torch.rand(n, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 0, 1, 0, 1.0], dtype=torch.float64)[:n]
    entropy = [torch.rand(p + r, generator=g, dtype=torch.float64) for p, r in zip(p_len, r_len)]
    pred = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = weights / weights.sum() if sim_weights is None else sim_weights
    n_tok = float((mask.sum(-1) * (weights > 0)).sum()) if token_scale == 1.0 else float(mask.sum())
    data = TensorDict(
        {
            "input_ids": _nested([torch.randint(3, 50, (p + r,), generator=g) for p, r in zip(p_len, r_len)]),
            "prompts": _nested([torch.ones(p, dtype=torch.long) for p in p_len]),
            "responses": _nested([torch.ones(r, dtype=torch.long) for r in r_len]),
            "response_mask": _nested([torch.ones(r, dtype=torch.long) for r in r_len]),
            "old_log_probs": _nested([resp_lp[i, :r] for i, r in enumerate(r_len)]),
            "advantages": _nested([torch.full((r,), float(weights[i]), dtype=torch.float64) for i, r in enumerate(r_len)]),
            SIM_WEIGHT_KEY: _nested([torch.full((r,), float(s[i]), dtype=torch.float64) for i, r in enumerate(r_len)]),
            TOKEN_SCALE_KEY: _nested([torch.full((r,), token_scale, dtype=torch.float64) for r in r_len]),
            SIAMESE_KEY: target,
        },
        batch_size=[n],
    )
    tu.assign_non_tensor(data, dp_size=dp, batch_num_tokens=n_tok, global_batch_size=n)
    model_output = {"log_probs": _nested(seq_lp), "entropy": _nested(entropy), PRED_KEY: pred, POOLED_KEY: pred.detach()}
    ent_resp = torch.zeros(n, R, dtype=torch.float64)
    for i, (p, r) in enumerate(zip(p_len, r_len)):
        ent_resp[i, :r] = entropy[i][p - 1 : p + r - 1]
    return data, model_output, dict(resp_lp=resp_lp, mask=mask, weights=weights, ent=ent_resp, pred=pred, target=target, seq_lp=seq_lp)


def _config():
    c = FSDPActorConfig(strategy="fsdp2", rollout_n=2, ppo_micro_batch_size_per_gpu=4, ppo_mini_batch_size=4)
    return c


def test_actor_loss_equals_core_popo_loss_at_ratio_one():
    data, out, ref = _batch()
    loss, metrics = popo_actor_loss(_config(), out, data, alpha=0.1, beta=0.01, noise_std=0.0)
    expected = core.popo_loss(
        token_log_probs=ref["resp_lp"], response_mask=ref["mask"], weights=ref["weights"], entropy=ref["ent"],
        pred=ref["pred"], target=ref["target"], alpha=0.1, beta=0.01,
    )
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-9, abs=1e-12)
    assert metrics["popo/nll_loss"].aggregate() == pytest.approx(expected.metrics["popo/nll_loss"], rel=1e-9)


def test_actor_loss_gradient_equals_core_gradient():
    data, out, ref = _batch(seed=1)
    loss, _ = popo_actor_loss(_config(), out, data, alpha=0.3, beta=0.02)
    g_seq = torch.autograd.grad(loss, ref["seq_lp"] + [ref["pred"]], allow_unused=True)
    # the same quantities through core, on leaf copies of the response log-probs
    lp = ref["resp_lp"].clone().requires_grad_()
    pred = ref["pred"].detach().clone().requires_grad_()
    exp = core.popo_loss(lp, ref["mask"], ref["weights"], entropy=ref["ent"], pred=pred, target=ref["target"], alpha=0.3, beta=0.02)
    g_lp, g_pred = torch.autograd.grad(exp.loss, [lp, pred])
    for i, s in enumerate(ref["seq_lp"]):
        r = int(ref["mask"][i].sum())
        p = s.shape[0] - r
        assert torch.allclose(g_seq[i][p - 1 : p + r - 1], g_lp[i, :r], atol=1e-12)
    assert torch.allclose(g_seq[-1], g_pred, atol=1e-12)


def _permute(data, out, ref, perm):
    """The same micro-batch with its rows in another order."""
    rows = lambda t: _nested([t[i] for i in perm]) if t.is_nested else t[perm]  # noqa: E731
    d = TensorDict({k: rows(data[k]) for k in data.keys() if isinstance(data[k], torch.Tensor)}, batch_size=data.batch_size)
    tu.assign_non_tensor(d, dp_size=1, batch_num_tokens=data["batch_num_tokens"], global_batch_size=data["global_batch_size"])
    o = {k: rows(v) for k, v in out.items()}
    return d, o


def test_feature_noise_follows_the_row_not_its_position():
    """A resumed run, or one on other ranks, may see the same rows in another order: each row keeps its noise."""
    data, out, ref = _batch(seed=4)
    loss, _ = popo_actor_loss(_config(), out, data, alpha=1.0, beta=0.0, noise_std=0.5, noise_seed=11)
    perm = [3, 0, 5, 1, 4, 2]
    d2, o2 = _permute(data, out, ref, perm)
    loss_perm, _ = popo_actor_loss(_config(), o2, d2, alpha=1.0, beta=0.0, noise_std=0.5, noise_seed=11)
    assert loss_perm.item() == pytest.approx(loss.item(), rel=1e-12)
    other_seed, _ = popo_actor_loss(_config(), out, data, alpha=1.0, beta=0.0, noise_std=0.5, noise_seed=12)
    clean, _ = popo_actor_loss(_config(), out, data, alpha=1.0, beta=0.0, noise_std=0.0)
    assert other_seed.item() != pytest.approx(loss.item(), rel=1e-6)
    assert clean.item() != pytest.approx(loss.item(), rel=1e-6)
    # the noise is core.feature_noise keyed by a hash of each row's tokens
    eps = core.feature_noise(row_keys(data), ref["target"].shape[-1], 11, torch.float64)
    expected = core.popo_loss(ref["resp_lp"], ref["mask"], ref["weights"], pred=ref["pred"],
                              target=ref["target"] + 0.5 * eps, alpha=1.0, beta=0.0)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-9)


def test_negatives_get_no_gradient_and_an_all_negative_batch_is_finite():
    data, out, ref = _batch(seed=2)
    loss, _ = popo_actor_loss(_config(), out, data, alpha=0.1, beta=0.0)
    grads = torch.autograd.grad(loss, ref["seq_lp"], allow_unused=True)
    for i, w in enumerate(ref["weights"].tolist()):
        if w == 0:
            assert grads[i] is None or torch.all(grads[i] == 0)
    zero = torch.zeros_like(ref["weights"])
    data0, out0, ref0 = _batch(seed=2, sim_weights=zero)
    data0["advantages"] = _nested([torch.zeros(int(m.sum()), dtype=torch.float64) for m in ref0["mask"]])
    loss0, _ = popo_actor_loss(_config(), out0, data0, alpha=0.1, beta=0.01)
    assert torch.isfinite(loss0)
    loss0.backward()  # connected to the graph: every rank can still join the collectives


def test_ratio_is_clipped_above():
    data, out, ref = _batch(seed=3)
    # later mini-batch: the policy moved up by 0.5 nats on every token of row 0
    cfg = _config()
    old = ref["resp_lp"].clone()
    old[0] -= 0.5
    r0 = int(ref["mask"][0].sum())
    data["old_log_probs"] = _nested([old[i, : int(m.sum())] for i, m in enumerate(ref["mask"])])
    loss, metrics = popo_actor_loss(cfg, out, data, alpha=0.0, beta=0.0)
    g = torch.autograd.grad(loss, ref["seq_lp"], allow_unused=True)
    if ref["weights"][0] > 0:
        assert torch.all(g[0] == 0), "ratio exp(0.5) > 1 + 0.2: the clip stops the push"
        assert metrics["actor/pg_clipfrac"].aggregate() > 0
    assert r0 > 0


def test_spread_padding_order_never_leaves_a_cell_without_real_rows():
    for n_real, dp, n_mini, per_cell in [(5, 1, 4, 2), (7, 2, 2, 2), (3, 2, 1, 4), (9, 2, 3, 2)]:
        n_total = dp * n_mini * per_cell
        order = spread_padding_order(n_real, n_total, dp, n_mini)
        assert sorted(order) == list(range(n_total))
        per_rank = n_total // dp
        for r in range(dp):
            for j in range(n_mini):
                cell = order[r * per_rank + j * per_cell : r * per_rank + (j + 1) * per_cell]
                assert any(i < n_real for i in cell), (n_real, dp, n_mini, per_cell, order)


def test_strip_predictor_from_hf_dir(tmp_path):
    from safetensors.torch import load_file, save_file

    from popo_verl.model_merger import strip_predictor, strip_predictor_from_hf_dir

    save_file({"model.norm.weight": torch.ones(3), "popo_predictor.net.0.weight": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    assert strip_predictor_from_hf_dir(str(tmp_path)) == 1
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"model.norm.weight"}
    assert strip_predictor_from_hf_dir(str(tmp_path)) == 0
    assert strip_predictor({"a": 1, "popo_predictor.x": 2}) == {"a": 1}


def test_kl_anchor_replaces_the_similarity_penalty_with_k3_to_the_siamese():
    """anchor=kl: L = L_nll + alpha * token-mean over the positives of k3(log pi, log pi_siamese) + beta * L_ent."""
    data, out, ref = _batch(seed=3)
    g = torch.Generator().manual_seed(9)
    ref_lp = ref["resp_lp"] - torch.rand(ref["resp_lp"].shape, generator=g, dtype=torch.float64) * 0.5
    r_len = [int(x) for x in ref["mask"].sum(-1)]
    data["ref_log_prob"] = _nested([ref_lp[i, :r] for i, r in enumerate(r_len)])
    loss, metrics = popo_actor_loss(_config(), out, data, alpha=0.2, beta=0.01, anchor="kl")
    base = core.popo_loss(token_log_probs=ref["resp_lp"], response_mask=ref["mask"], weights=ref["weights"],
                          entropy=ref["ent"], alpha=0.0, beta=0.01)
    pos_mask = ref["mask"] * (ref["weights"] > 0).unsqueeze(-1)
    kl = (core.k3_kl(ref["resp_lp"], ref_lp) * pos_mask).sum() / pos_mask.sum()
    assert loss.item() == pytest.approx(base.loss.item() + 0.2 * kl.item(), rel=1e-9)
    assert metrics["popo/kl_loss"].aggregate() == pytest.approx(kl.item(), rel=1e-9)
    assert "popo/sim_loss" not in metrics
    # the predictor gets no gradient from an anchor that does not use it
    g_pred = torch.autograd.grad(loss, ref["pred"], allow_unused=True)[0]
    assert g_pred is None or torch.count_nonzero(g_pred) == 0
    with pytest.raises(RuntimeError, match="ref_log_prob"):
        d2, o2, _ = _batch(seed=3)
        popo_actor_loss(_config(), o2, d2, alpha=0.2, anchor="kl")
