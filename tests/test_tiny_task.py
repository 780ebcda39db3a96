"""The embedded tiny task: tokenizer, model, data format (read by verl's RLHFDataset), warm start band."""

import json
import random
import time

import pandas as pd
import pytest
import torch

from popo_verl import tiny


@pytest.fixture(scope="module")
def built():
    return tiny.ensure_built()


@pytest.fixture(scope="module")
def tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["model"])


def test_tokenizer(tok):
    assert tok("\n", add_special_tokens=False)["input_ids"].__len__() == 1
    ids = tiny.chat_ids(tok, "1+2=?")
    text = tok.decode(ids)
    assert text == "<|im_start|>user\n1+2=?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok("\\boxed{12}", add_special_tokens=False)["input_ids"]) == "\\boxed{12}"


def test_model_loads_with_sdpa_and_matches_ids(built, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(built["model"])
    assert cfg.model_type == "qwen3" and cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(built["model"], attn_implementation="sdpa")
    out = model(torch.tensor([tiny.chat_ids(tok, "3+4=?")]))
    assert out.logits.shape[-1] == len(tok)


def test_warm_start_pass_at_1_is_in_band(built):
    manifest = json.loads(open(built["manifest"]).read())
    lo, hi = tiny.PASS_BAND
    assert lo <= manifest["test_pass_at_1"] <= hi
    # re-measured here, not taken from the manifest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = pd.read_parquet(built["test"]).to_dict("records")
    model = AutoModelForCausalLM.from_pretrained(built["model"])
    acc = tiny.greedy_pass_at_1(model, AutoTokenizer.from_pretrained(built["model"]), rows)
    assert lo <= acc <= hi
    assert acc == pytest.approx(manifest["test_pass_at_1"], abs=0.02)


def test_data_is_verl_rl_parquet(built, tok):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    df = pd.read_parquet(built["train"])
    assert {"data_source", "prompt", "ability", "reward_model", "extra_info"} <= set(df.columns)
    row = df.iloc[0]
    assert "\\boxed{}" in row["prompt"][0]["content"] and row["reward_model"]["style"] == "rule"
    assert set(df["extra_info"].map(lambda e: e["level"])) == {1, 2, 3, 4}
    cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 64, "filter_overlong_prompts": True,
                            "truncation": "error", "return_raw_chat": True})
    ds = RLHFDataset(data_files=[built["train"]], tokenizer=tok, config=cfg)
    item = ds[0]
    assert len(ds) == len(df) and item["data_source"] == "tiny_arith"


def test_data_is_deterministic_and_answers_are_right():
    a = tiny.make_rows(random.Random(5), 50, "train")
    b = tiny.make_rows(random.Random(5), 50, "train")
    assert a == b
    for r in a:
        expr, ans = r["extra_info"]["expression"], r["reward_model"]["ground_truth"]
        assert str(eval(expr)) == ans  # the expressions are plain integer arithmetic


def test_build_is_cached(built):
    t0 = time.time()
    again = tiny.ensure_built()
    assert again == built and time.time() - t0 < 5
    assert tiny.is_built(built["root"]) and not tiny.is_built(built["root"], tiny.TinySpec(seed=99))
