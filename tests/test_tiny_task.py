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


def test_warm_start_is_in_the_sharpening_regime(built):
    """Held-out pass@1 at temperature 1 in the band, pass@8 high: the right answer carries part of the mass."""
    manifest = json.loads(open(built["manifest"]).read())
    lo, hi = tiny.PASS_BAND
    assert manifest["version"] == tiny.BUILD_VERSION
    assert lo <= manifest["test_pass_at_1"] <= hi and manifest["test_pass_at_8"] >= tiny.PASS_AT_8_MIN
    # re-measured here with other samples, not taken from the manifest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = pd.read_parquet(built["test"]).to_dict("records")
    model = AutoModelForCausalLM.from_pretrained(built["model"])
    p1, p8 = tiny.pass_at_k(model, AutoTokenizer.from_pretrained(built["model"]), rows, n=8, seed=123)
    assert lo <= p1 <= hi and p8 >= tiny.PASS_AT_8_MIN
    assert p1 == pytest.approx(manifest["test_pass_at_1"], abs=0.05)


def test_data_is_verl_rl_parquet(built, tok):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    df = pd.read_parquet(built["train"])
    assert {"data_source", "prompt", "ability", "reward_model", "extra_info"} <= set(df.columns)
    row = df.iloc[0]
    assert "\\boxed{}" in row["prompt"][0]["content"] and row["reward_model"]["style"] == "rule"
    assert set(df["extra_info"].map(lambda e: e["level"])) == {1, 2}
    cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 64, "filter_overlong_prompts": True,
                            "truncation": "error", "return_raw_chat": True})
    ds = RLHFDataset(data_files=[built["train"]], tokenizer=tok, config=cfg)
    item = ds[0]
    assert len(ds) == len(df) and item["data_source"] == "tiny_arith"


def test_held_out_problems_are_never_trained_on(built):
    train = set(pd.read_parquet(built["train"])["extra_info"].map(lambda e: e["expression"]))
    test = list(pd.read_parquet(built["test"])["extra_info"].map(lambda e: e["expression"]))
    assert len(test) == len(set(test)) == tiny.TinySpec().n_test
    assert not train & set(test)
    # the warm start draws from the same train split (warm_start gets train_problems only)
    tr, te = tiny.split_problems(0, tiny.TinySpec().n_test)
    assert {e for e, _, _ in tr} == train and [e for e, _, _ in te] == test


def test_split_is_deterministic_and_answers_are_right():
    a, b = tiny.split_problems(5, 64), tiny.split_problems(5, 64)
    assert a == b and tiny.split_problems(6, 64)[1] != a[1]  # another seed holds out other problems
    for expr, ans, level in a[0] + a[1]:
        assert str(eval(expr)) == ans  # the expressions are plain integer arithmetic
        assert level == (1 if max(map(int, expr.split("+"))) < 10 else 2)
    rows = tiny.make_rows(a[1], "test")
    assert [r["reward_model"]["ground_truth"] for r in rows] == [ans for _, ans, _ in a[1]]


def test_noisy_labels_are_right_part_of_the_time_and_otherwise_off_by_one():
    rng = random.Random(0)
    labels = [int(tiny.noisy_label(rng, "42", 0.3)) for _ in range(4000)]
    right = sum(x == 42 for x in labels) / len(labels)
    assert right == pytest.approx(0.3, abs=0.03)
    assert set(labels) == {41, 42, 43}
    assert {tiny.noisy_label(random.Random(i), "0", 0.0) for i in range(20)} == {"1"}  # never negative


def test_build_is_cached(built):
    t0 = time.time()
    again = tiny.ensure_built()
    assert again == built and time.time() - t0 < 5
    assert tiny.is_built(built["root"]) and not tiny.is_built(built["root"], tiny.TinySpec(seed=99))


def test_default_dir_per_seed(monkeypatch, tmp_path):
    monkeypatch.setenv("POPO_TINY_DIR", str(tmp_path))
    assert tiny.default_dir() == str(tmp_path) and tiny.default_dir(3) == str(tmp_path / "seed_3")


def test_build_pins_the_float_kernels_whatever_the_callers_settings(built, tmp_path, monkeypatch):
    """The warm start runs in a child process with ATen's AVX2 kernels, MKL's AVX2 reproducibility branch and 2
    threads, whatever the caller's own: a caller that forces another kernel set and thread count still gets the
    same weights, byte for byte (on one machine: another CPU may build other weights). Shown on a short build (100
    warm-start steps, 16 held-out prompts, the quality band not checked): the default one takes a minute and a half
    and goes through the same child."""
    import dataclasses
    import hashlib
    import os

    if not tiny._can_pin_kernels():
        pytest.skip("not an x86-64 CPU with AVX2: the build uses the native kernels here (the manifest says so)")
    manifest = json.loads(open(built["manifest"]).read())
    assert manifest["kernels"].startswith("pinned: ATen AVX2, MKL_CBWR=AVX2, 2 threads")
    assert tiny.TinySpec().digest() == manifest["digest"], "the default spec's digest names the cached build"
    short = dataclasses.replace(tiny.TinySpec(), min_sft_steps=100, max_sft_steps=100, n_test=16, check_band=False)
    lines: list[str] = []
    first = tiny.build(str(tmp_path / "a"), short, log=lines.append)
    for var, value in {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(var, value)
    second = tiny.build(str(tmp_path / "b"), short, log=lines.append)
    digest = lambda p: hashlib.sha256(open(os.path.join(p, "model.safetensors"), "rb").read()).hexdigest()  # noqa: E731
    assert digest(first["model"]) == digest(second["model"])
    assert json.loads(open(second["manifest"]).read())["kernels"] == manifest["kernels"]
    assert any("warm start step" in line for line in lines), "the build's progress streams while it runs"


def test_rebuilding_seed_0_keeps_the_other_seeds_tasks(tmp_path, monkeypatch):
    """Seed S != 0 lives in seed 0's folder (`seed_S/`): a rebuild of seed 0 moves them over, never deletes them."""
    monkeypatch.setattr(tiny, "_can_pin_kernels", lambda: False)  # build in-process
    monkeypatch.setattr(tiny, "warm_start", lambda model, tok, spec, train, dev, log=print: (0.3, 0))
    monkeypatch.setattr(tiny, "pass_at_k", lambda *a, **k: (0.3, 0.9))
    root = tmp_path / "tiny"
    (root / "seed_3" / "model").mkdir(parents=True)
    (root / "seed_3" / "manifest.json").write_text("{}")
    (root / "old_file").write_text("x")
    tiny.build(root, tiny.TinySpec(), force=True, log=lambda *a: None)
    assert (root / "seed_3" / "manifest.json").read_text() == "{}"
    assert not (root / "old_file").exists() and (root / "manifest.json").exists()


def test_default_dir_of_another_attention_layout(monkeypatch, tmp_path):
    """The head_dim-32 model (ROLLOUT=vllm) lives beside the default one, never inside it (a rebuild of the seed-0
    folder replaces it), with its seeds in its own folder."""
    monkeypatch.setenv("POPO_TINY_DIR", str(tmp_path / "tiny"))
    assert tiny.default_dir(0, heads=2, kv_heads=1) == str(tmp_path / "tiny_h2kv1")
    assert tiny.default_dir(3, heads=2, kv_heads=1) == str(tmp_path / "tiny_h2kv1" / "seed_3")
    assert tiny.default_dir(0, heads=4, kv_heads=2) == str(tmp_path / "tiny")
    assert tiny.TinySpec(heads=2, kv_heads=1).digest() != tiny.TinySpec().digest()


def test_build_refuses_a_layout_the_hidden_size_cannot_take(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "popo_verl.tiny", "build", "--heads", "3", "--kv-heads", "1", "--out",
                        str(tmp_path / "t")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--heads 3 --kv-heads 1" in r.stderr and not (tmp_path / "t").exists()


def test_warm_start_says_where_it_is_and_when_it_may_stop(monkeypatch, tok):
    """A line at least every PROGRESS_EVERY_S seconds (here: every step), naming the next stopping check and the
    time to it, so that a slow build is never silent."""
    from dataclasses import replace

    monkeypatch.setattr(tiny, "PROGRESS_EVERY_S", 0.0)
    spec = replace(tiny.TinySpec(), min_sft_steps=4, max_sft_steps=6, sft_batch=4, hidden_size=16, intermediate=32)
    train, _ = tiny.split_problems(spec.seed, spec.n_test)
    lines = []
    tiny.warm_start(tiny.build_model(spec, tok), tok, spec, train[:32], [], log=lines.append)
    progress = [line for line in lines if "s so far; " in line]
    assert len(progress) == spec.max_sft_steps
    assert progress[0].startswith("  warm start step 1 (of at most 6): loss ")
    assert "ends at step 6, at most" in progress[0] and progress[-1].endswith("at most 0 s to go")
    lines.clear()  # the default schedule: checks every 100 steps from step 400
    spec = replace(spec, min_sft_steps=400, max_sft_steps=401, target_pass=2.0)
    tiny.warm_start(tiny.build_model(spec, tok), tok, spec, train[:32], tiny.make_rows(train[:4], "train"),
                    log=lines.append)
    assert "; next stopping check at step 400, in about " in lines[0] and lines[0].endswith(" s to go)")
