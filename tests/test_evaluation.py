"""popo_verl.evaluate: the estimators against brute force, and a real run on the tiny model."""

import itertools
import json
import math
import random

import pytest

from popo_verl import evaluate as ev


def brute_pass_at_k(outcomes, k):
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    rng = random.Random(n)
    for _ in range(10):
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            assert ev.pass_at_k(n, sum(outcomes), k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert ev.pass_at_k(16, 0, 4) == 0.0 and ev.pass_at_k(16, 16, 1) == 1.0
    assert ev.pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(1000, 3, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500))
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 5, 1)
    assert ev.k_values(16) == [1, 2, 4, 8, 16] and ev.k_values(6) == [1, 2, 4, 6]


def test_majority_vote():
    rs = ["\\boxed{3}", "so \\boxed{4}", "\\boxed{3.0}", "no answer", "\\boxed{4}"]
    assert ev.majority_answer(rs) in ("3", "4")  # a tie: the earliest wins
    assert ev.majority_answer(["\\boxed{4}", "\\boxed{3}", "\\boxed{4}"]) == "4"
    assert ev.majority_answer(["nothing here"]) is None
    recs = [{"data_source": "s", "ground_truth": "4", "responses": ["\\boxed{4}", "\\boxed{3}", "\\boxed{4}"],
             "lengths": [5, 5, 5], "scores": [1.0, 0.0, 1.0]}]
    row = ev.summarise(recs, 3)["s"]
    assert row["maj@3"] == 1.0 and row["avg@n"] == pytest.approx(2 / 3) and row["pass@1"] == pytest.approx(2 / 3)


def test_evaluate_tiny_model_end_to_end(tmp_path):
    from popo_verl.tiny import ensure_built, greedy_pass_at_1

    built = ensure_built()
    res = ev.evaluate(built["model"], [built["test"]], n=4, temperature=1.0, max_new_tokens=16, limit=16,
                      out_dir=str(tmp_path), show_progress=False, batch_size=8)
    row = res["benchmarks"]["tiny_arith"]
    assert row["problems"] == 16
    assert 0.0 <= row["avg@n"] <= row["pass@2"] <= row["pass@4"] <= 1.0
    assert 0 < row["mean_response_tokens"] <= 16
    for f in ("eval.md", "eval.json", "pass_at_k.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["tiny_arith"]["problems"] == 16
    # greedy avg@1 equals the tiny builder's own greedy pass@1 on the same rows
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    greedy = ev.evaluate(built["model"], [built["test"]], n=1, temperature=0.0, max_new_tokens=16, limit=32,
                         show_progress=False)["benchmarks"]["tiny_arith"]["avg@n"]
    rows = pd.read_parquet(built["test"]).to_dict("records")[:32]
    ref = greedy_pass_at_1(AutoModelForCausalLM.from_pretrained(built["model"]), AutoTokenizer.from_pretrained(built["model"]), rows)
    assert greedy == pytest.approx(ref)
