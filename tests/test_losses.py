"""POPO's actor loss (popo_verl/actor_loss.py) against reference_loss.popo_loss, with verl's real data layout."""

import pytest
import reference_loss  # tests/reference_loss.py: POPO.md's loss, the oracle
import torch
import torch.nn.functional as F
import verl  # noqa: F401
from tensordict import TensorDict
from test_core import python_row_hash  # the Python-integer reference of core.row_hash
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.workers.config import FSDPActorConfig

from popo_verl import core
from popo_verl.actor_loss import popo_actor_loss, row_keys
from popo_verl.protocol import SIAMESE_KEY, SIM_WEIGHT_KEY, TOKEN_SCALE_KEY
from popo_verl.update_batch import spread_padding_order


def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _config():
    c = FSDPActorConfig(strategy="fsdp2", rollout_n=2, ppo_micro_batch_size_per_gpu=4, ppo_mini_batch_size=4)
    return c


def test_actor_loss_equals_core_popo_loss_at_ratio_one(micro_batch):
    data, out, ref = micro_batch()
    loss, metrics = popo_actor_loss(_config(), out, data, alpha=0.1, beta=0.01, noise_std=0.0)
    expected = reference_loss.popo_loss(
        token_log_probs=ref["resp_lp"], response_mask=ref["mask"], weights=ref["weights"], entropy=ref["ent"],
        pred=ref["pred"], target=ref["target"], alpha=0.1, beta=0.01,
    )
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-9, abs=1e-12)
    assert metrics["popo/nll_loss"].aggregate() == pytest.approx(expected.metrics["popo/nll_loss"], rel=1e-9)


def test_actor_loss_gradient_equals_core_gradient(micro_batch):
    data, out, ref = micro_batch(seed=1)
    loss, _ = popo_actor_loss(_config(), out, data, alpha=0.3, beta=0.02)
    g_seq = torch.autograd.grad(loss, ref["seq_lp"] + [ref["pred"]], allow_unused=True)
    # the same quantities through core, on leaf copies of the response log-probs
    lp = ref["resp_lp"].clone().requires_grad_()
    pred = ref["pred"].detach().clone().requires_grad_()
    exp = reference_loss.popo_loss(lp, ref["mask"], ref["weights"], entropy=ref["ent"], pred=pred, target=ref["target"], alpha=0.3, beta=0.02)
    g_lp, g_pred = torch.autograd.grad(exp.loss, [lp, pred])
    for i, s in enumerate(ref["seq_lp"]):
        r = int(ref["mask"][i].sum())
        p = s.shape[0] - r
        assert torch.allclose(g_seq[i][p - 1 : p + r - 1], g_lp[i, :r], atol=1e-12)
    assert torch.allclose(g_seq[-1], g_pred, atol=1e-12)


def _permute(data, out, ref, perm):
    """The same micro-batch with its rows in another order."""
    rows = lambda t: nested([t[i] for i in perm]) if t.is_nested else t[perm]  # noqa: E731
    d = TensorDict({k: rows(data[k]) for k in data.keys() if isinstance(data[k], torch.Tensor)}, batch_size=data.batch_size)
    tu.assign_non_tensor(d, dp_size=1, batch_num_tokens=data["batch_num_tokens"], global_batch_size=data["global_batch_size"])
    o = {k: rows(v) for k, v in out.items()}
    return d, o


def test_feature_noise_follows_the_row_not_its_position(micro_batch):
    """A resumed run, or one on other ranks, may see the same rows in another order: each row keeps its noise."""
    data, out, ref = micro_batch(seed=4)
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
    expected = reference_loss.popo_loss(ref["resp_lp"], ref["mask"], ref["weights"], pred=ref["pred"],
                              target=ref["target"] + 0.5 * eps, alpha=1.0, beta=0.0)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-9)


def test_row_keys_are_the_row_hash_of_each_rows_own_tokens(micro_batch):
    """The noise keys: core.row_hash of each row's ids (a uint64 sum of SplitMix64-mixed (id, position) pairs, here
    recomputed in Python integers), whether the batch is nested (the engine's layout), a nested view with gaps between
    its rows (torch.nested.narrow) or a padded tensor. Computed where the ids are: a tensor, not a host list."""
    data, _, _ = micro_batch(seed=5)
    rows = list(data["input_ids"].unbind())
    keys = row_keys(data)
    assert isinstance(keys, torch.Tensor) and keys.dtype == torch.int64
    assert keys.tolist() == [python_row_hash(r.tolist()) for r in rows]
    assert len(set(keys.tolist())) == len(rows)
    lengths = torch.tensor([len(r) for r in rows])
    flat = torch.cat(rows).expand(len(rows), -1).contiguous()  # row i of the view: its own slice of every row
    view = torch.nested.narrow(flat, 1, lengths.cumsum(0) - lengths, lengths, layout=torch.jagged)
    assert view.lengths() is not None
    assert row_keys({"input_ids": view}).tolist() == keys.tolist()
    padded = torch.stack([torch.arange(5), torch.arange(5) + 1])
    assert row_keys({"input_ids": padded}).tolist() == [python_row_hash(list(range(5))), python_row_hash(list(range(1, 6)))]
    swapped = row_keys({"input_ids": torch.tensor([[7, 9, 4], [9, 7, 4]])}).tolist()
    assert swapped[0] != swapped[1], "the position of a token is part of the key"


def test_negatives_get_no_gradient_and_an_all_negative_batch_is_finite(micro_batch):
    data, out, ref = micro_batch(seed=2)
    loss, _ = popo_actor_loss(_config(), out, data, alpha=0.1, beta=0.0)
    grads = torch.autograd.grad(loss, ref["seq_lp"], allow_unused=True)
    for i, w in enumerate(ref["weights"].tolist()):
        if w == 0:
            assert grads[i] is None or torch.all(grads[i] == 0)
    zero = torch.zeros_like(ref["weights"])
    data0, out0, ref0 = micro_batch(seed=2, sim_weights=zero)
    data0["advantages"] = nested([torch.zeros(int(m.sum()), dtype=torch.float64) for m in ref0["mask"]])
    loss0, metrics0 = popo_actor_loss(_config(), out0, data0, alpha=0.1, beta=0.01)
    assert torch.isfinite(loss0)
    # no positive: the cosine adds 0 (s = 0), and the key is there all the same: verl's dp aggregation needs every
    # rank to report each metric once per micro-batch (a rank whose micro-batch was padding alone crashed step 2)
    assert metrics0["popo/cos_sim"].values == [0.0] and "popo/sim_loss" in metrics0
    loss0.backward()  # connected to the graph: every rank can still join the collectives


def test_ratio_is_clipped_above(micro_batch):
    data, out, ref = micro_batch(seed=3)
    # later mini-batch: the policy moved up by 0.5 nats on every token of row 0
    cfg = _config()
    old = ref["resp_lp"].clone()
    old[0] -= 0.5
    r0 = int(ref["mask"][0].sum())
    data["old_log_probs"] = nested([old[i, : int(m.sum())] for i, m in enumerate(ref["mask"])])
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


def test_kl_anchor_replaces_the_similarity_penalty_with_k3_to_the_siamese(micro_batch):
    """anchor=kl: L = L_nll + alpha * token-mean over the positives of k3(log pi, log pi_siamese) + beta * L_ent."""
    data, out, ref = micro_batch(seed=3)
    g = torch.Generator().manual_seed(9)
    ref_lp = ref["resp_lp"] - torch.rand(ref["resp_lp"].shape, generator=g, dtype=torch.float64) * 0.5
    r_len = [int(x) for x in ref["mask"].sum(-1)]
    data["ref_log_prob"] = nested([ref_lp[i, :r] for i, r in enumerate(r_len)])
    loss, metrics = popo_actor_loss(_config(), out, data, alpha=0.2, beta=0.01, anchor="kl")
    base = reference_loss.popo_loss(token_log_probs=ref["resp_lp"], response_mask=ref["mask"], weights=ref["weights"],
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
        d2, o2, _ = micro_batch(seed=3)
        popo_actor_loss(_config(), o2, d2, alpha=0.2, anchor="kl")


def _rows(data, out, idx, dp):
    """Rows `idx` of a micro-batch, as one dp rank receives them: (model_output, data), the loss's argument order."""
    take = lambda t: nested([t[i] for i in idx]) if t.is_nested else t[idx]  # noqa: E731
    d = TensorDict({k: take(data[k]) for k in data.keys() if isinstance(data[k], torch.Tensor)}, batch_size=[len(idx)])
    tu.assign_non_tensor(d, dp_size=dp, batch_num_tokens=data["batch_num_tokens"], global_batch_size=data["global_batch_size"])
    return {k: take(v) for k, v in out.items()}, d


def test_sim_loss_is_logged_as_the_weighted_cosine_at_dp_2(micro_batch):
    """Each rank logs its dp-scaled share; verl averages over ranks (Metric.aggregate_dp): the logged
    popo/sim_loss is the mini-batch's -sum_b s_b cos_b, the value the gradient uses, not 1/dp of it."""
    data, out, ref = micro_batch(seed=6)
    s = ref["weights"] / ref["weights"].sum()
    expected = -(s * F.cosine_similarity(ref["pred"].detach(), ref["target"], dim=-1)).sum().item()
    per_rank = [popo_actor_loss(_config(), *_rows(data, out, idx, 2), alpha=0.1, beta=0.0)[1]
                for idx in ([0, 1, 2], [3, 4, 5])]
    logged = Metric.aggregate_dp([m["popo/sim_loss"] for m in per_rank])
    assert logged == pytest.approx(expected, rel=1e-9)
    assert Metric.aggregate_dp([m["popo/cos_sim"] for m in per_rank]) == pytest.approx(-expected, rel=1e-9)
    assert abs(expected) > 0.05, "a cosine sum far enough from 0 that a factor of 2 shows"
    one_rank = popo_actor_loss(_config(), out, data, alpha=0.1, beta=0.0)[1]["popo/sim_loss"]
    assert Metric.aggregate_dp([one_rank]) == pytest.approx(expected, rel=1e-9)


def test_token_scale_is_per_row_so_a_leading_padding_row_zeroes_nothing(micro_batch):
    """Padding rows carry token scale 0 (and weight 0). Wherever one sits in a micro-batch, the real rows keep
    their own scale c: the loss is c * L_nll + beta * c * L_ent of the real rows alone."""
    data, out, ref = micro_batch(seed=7, token_scale=2.0)
    r_len = [int(x) for x in ref["mask"].sum(-1)]
    scale = torch.full((6,), 2.0, dtype=torch.float64)
    scale[2] = 0.0  # row 2 (weight 0) plays a padding row
    data[TOKEN_SCALE_KEY] = nested([torch.full((r,), float(scale[i]), dtype=torch.float64) for i, r in enumerate(r_len)])
    perm = [2, 0, 1, 3, 4, 5]  # the padding row first
    o, d = _rows(data, out, perm, 1)
    loss, _ = popo_actor_loss(_config(), o, d, alpha=0.0, beta=0.01)
    w = ref["weights"][perm]
    mask, lp, ent = ref["mask"][perm], ref["resp_lp"][perm], ref["ent"][perm]
    n_tok = float(data["batch_num_tokens"])
    pos = mask * (w > 0).unsqueeze(-1)
    expected = 2.0 * (-(w.unsqueeze(-1) * lp * mask).sum() / n_tok) - 0.01 * 2.0 * (ent * pos).sum() / n_tok
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert loss.item() != 0.0


def test_nll_norm_sequence_weighs_each_response_by_w_whatever_its_length(micro_batch):
    data, out, ref = micro_batch(seed=8)
    s = ref["weights"] / ref["weights"].sum()
    loss, metrics = popo_actor_loss(_config(), out, data, alpha=0.0, beta=0.0, nll_norm="sequence")
    expected = reference_loss.weighted_nll_loss(ref["resp_lp"], ref["weights"], ref["mask"], norm="sequence")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    token = reference_loss.weighted_nll_loss(ref["resp_lp"], ref["weights"], ref["mask"], norm="token")
    assert abs(token.item() - expected.item()) > 1e-3, "rows of unequal length: the two norms differ here"
    # gradient at ratio 1: s_b / |y_b| on each of row b's response tokens
    g = torch.autograd.grad(loss, ref["seq_lp"], allow_unused=True)
    for i, sp in enumerate(ref["seq_lp"]):
        r = int(ref["mask"][i].sum())
        p = sp.shape[0] - r
        want = -(s[i] / r).item()
        if s[i] > 0:
            assert torch.allclose(g[i][p - 1 : p + r - 1], torch.full((r,), want, dtype=torch.float64), atol=1e-12)
        else:
            assert g[i] is None or torch.count_nonzero(g[i]) == 0
    # at dp = 2 each rank's share, averaged over ranks as verl does, is the same loss
    per_rank = [popo_actor_loss(_config(), *_rows(data, out, idx, 2), alpha=0.0, beta=0.0, nll_norm="sequence")
                for idx in ([0, 1, 2], [3, 4, 5])]
    assert sum(l.item() for l, _ in per_rank) / 2 == pytest.approx(expected.item(), rel=1e-9)
    assert Metric.aggregate_dp([m["actor/pg_loss"] for _, m in per_rank]) == pytest.approx(expected.item(), rel=1e-9)


def test_the_update_batch_carries_what_the_update_reads():
    """The driver sends the actor update only what it reads: verl's returns and rewards stay behind (its step metrics
    read them on the driver), the siamese's log-probs travel only with anchor=kl (the cosine reads pooled states)."""
    from popo_verl.update_batch import update_fields

    step = ["input_ids", "prompts", "responses", "response_mask", "old_log_probs", "advantages", "returns", "rm_scores",
            "token_level_rewards", "uid", SIM_WEIGHT_KEY, TOKEN_SCALE_KEY]
    for anchor, siamese in (("cosine", {SIAMESE_KEY}), ("kl", {SIAMESE_KEY, "ref_log_prob"})):
        fields = update_fields(step, anchor)
        assert set(fields) == (set(step) - {"returns", "rm_scores", "token_level_rewards"}) | siamese
