"""popo_verl.evaluate: the estimators against brute force, the presets and the CLI, real runs on tiny models."""

import itertools
import json
import math
import random
import sys
from pathlib import Path

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
    row = ev.summarise(recs)["s"]
    assert row["n"] == 3 and row["maj@n"] == 1.0
    assert row["avg@n"] == pytest.approx(2 / 3) and row["pass@1"] == pytest.approx(2 / 3)


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


def test_new_tokens_are_capped_at_the_models_context(tmp_path, capsys):
    """The paper preset's 4096 new tokens on the tiny model (128 positions): capped to what fits after the longest
    prompt, with a warning that says why, instead of HF generate running past the context."""
    from transformers import AutoConfig

    from popo_verl.tiny import ensure_built

    built = ensure_built()
    context = AutoConfig.from_pretrained(built["model"]).max_position_embeddings
    res = ev.evaluate(built["model"], [built["test"]], n=1, temperature=0.0, max_new_tokens=4096, limit=4,
                      show_progress=False)
    err = capsys.readouterr().err
    assert res["max_new_tokens_asked"] == 4096 and 0 < res["max_new_tokens"] < context
    assert f"--max-new-tokens 4096 capped at {res['max_new_tokens']}: the model's context is {context} positions" in err
    assert res["benchmarks"]["tiny_arith"]["mean_response_tokens"] <= res["max_new_tokens"]
    res = ev.evaluate(built["model"], [built["test"]], n=1, temperature=0.0, max_new_tokens=8, limit=4,
                      show_progress=False)
    assert res["max_new_tokens"] == res["max_new_tokens_asked"] == 8 and "capped" not in capsys.readouterr().err


def test_the_cli_says_pass_at_1_as_the_runs_summary_does(tmp_path, capsys):
    """--preset tiny is the protocol scripts/run_tiny_cpu.sh validates with; the CLI ends with pass@1 as a fraction,
    the unit of the run's summary line."""
    from popo_verl.tiny import ensure_built

    built = ensure_built()
    assert ev.main(["--preset", "tiny", "--model", built["model"], "--data", built["test"], "--limit", "8",
                    "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["tiny_arith"]
    assert row["n"] == 8
    assert f"tiny_arith: held-out pass@1 {row['avg@n']:.3f} (avg@8, temperature 1.0)" in out.splitlines()


def test_summarise_refuses_mixed_n_within_a_benchmark():
    recs = [{"data_source": "s", "ground_truth": "1", "responses": ["a"] * n, "lengths": [1] * n, "scores": [0.0] * n}
            for n in (2, 3)]  # fmt: skip
    with pytest.raises(ValueError, match="same number of samples"):
        ev.summarise(recs)


# ------------------------------------------------------------------------------------ presets and the CLI
def test_help_describes_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in ev.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.dest
        assert action.option_strings[0] in text
    # the preset-driven defaults are spelled out, each preset's value by name
    assert "paper 10, greedy 1, verl 16, tiny 8; for AIME paper 128, greedy 1, verl 16, tiny 8" in text
    assert "paper 0.7, greedy 0.0, verl 0.6, tiny 1.0" in text and "paper 4096, greedy 4096, verl 1024, tiny 32" in text


@pytest.fixture
def captured_evaluate(monkeypatch, tmp_path):
    calls = []

    def fake(model, data, **kw):
        calls.append(kw)
        return {"benchmarks": {}}

    monkeypatch.setattr(ev, "evaluate", fake)
    data = tmp_path / "aime24.parquet"
    data.write_bytes(b"")
    return calls, ["--model", "m", "--data", str(data), "--out", str(tmp_path / "o")]


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("paper", dict(n=10, n_aime=128, temperature=0.7, top_p=0.95, max_new_tokens=4096, verifier="whole")),
        ("greedy", dict(n=1, n_aime=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, verifier="whole")),
        ("verl", dict(n=16, n_aime=16, temperature=0.6, top_p=0.95, max_new_tokens=1024, verifier="last-boxed")),
        ("tiny", dict(n=8, n_aime=8, temperature=1.0, top_p=1.0, max_new_tokens=32, verifier="last-boxed")),
    ],
)
def test_preset_sets_the_protocol(captured_evaluate, preset, expected):
    calls, args = captured_evaluate
    assert ev.main(args + ["--preset", preset]) == 0
    assert {k: calls[0][k] for k in expected} == expected and calls[0]["preset"] == preset


def test_explicit_options_override_the_preset(captured_evaluate):
    calls, args = captured_evaluate
    ev.main(args + ["--n", "4", "--temperature", "1.0", "--verifier", "last-boxed", "--chat-template", "r1"])
    assert calls[0]["n"] == calls[0]["n_aime"] == 4 and calls[0]["temperature"] == 1.0
    assert calls[0]["verifier"] == "last-boxed" and calls[0]["template"] == "r1"
    assert calls[0]["max_new_tokens"] == 4096  # still the paper preset's
    ev.main(args)
    assert calls[1]["template"] is None  # the tokenizer's own chat template


def test_whole_completion_verifier_is_the_references():
    """math-verify over the whole completion: an unboxed final expression counts, which last-boxed does not see."""
    unboxed = "Adding them gives 12, and halving gives x = 6"
    assert ev.score_response(unboxed, "6", verifier="whole").score == 1.0
    assert ev.score_response(unboxed, "6", verifier="last-boxed").score == 0.0
    for verifier in ev.VERIFIERS:  # both agree on a box
        assert ev.score_response("so \\boxed{\\frac{1}{2}}", "0.5", verifier=verifier).score == 1.0
        assert ev.score_response("so \\boxed{3}", "4", verifier=verifier).score == 0.0
    with pytest.raises(ValueError, match="verifier"):
        ev.score_response("\\boxed{1}", "1", verifier="nope")


# ------------------------------------------------------------------------------------ runs on a tiny model
@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A random 1-layer Qwen3 with a character-level tokenizer that keeps chat-template markers whole."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  additional_special_tokens=specials[2:])  # fmt: skip
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>{% endif %}")  # fmt: skip
    cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                      eos_token_id=1, pad_token_id=0, bos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("char_model") / "CharQwen-tiny"
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    from popo_verl.data import prepare

    out = tmp_path_factory.mktemp("bench")
    fix = Path(__file__).parent / "fixtures" / "data"
    prepare(out, ["aime24", "math500"], local={"aime24": fix / "aime24.jsonl", "math500": fix / "math500.jsonl"},
            limit=2, verbose=False)  # fmt: skip
    return [str(out / "aime24.parquet"), str(out / "math500.parquet")]


def test_aime_gets_its_own_n_and_the_plot_names_model_and_data(char_model, bench_files, tmp_path):
    from PIL import Image

    res = ev.evaluate(char_model, bench_files, n=2, n_aime=4, temperature=1.0, top_p=0.95, max_new_tokens=6,
                      out_dir=str(tmp_path), show_progress=False, verifier="whole", template="qwen_math",
                      preset="paper")  # fmt: skip
    aime, m500 = res["benchmarks"]["aime24"], res["benchmarks"]["math500"]
    assert (aime["n"], aime["problems"], m500["n"], m500["problems"]) == (4, 2, 2, 2)
    assert "pass@4" in aime and "pass@4" not in m500
    assert 0 < m500["mean_response_tokens"] <= 6
    table = (tmp_path / "eval.md").read_text().splitlines()
    header = [c.strip() for c in table[0].split("|")]
    m500_cells = [c.strip() for c in next(r for r in table if r.startswith("| math500")).split("|")]
    assert m500_cells[header.index("pass@4")] == "-" and m500_cells[header.index("n")] == "2"
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["data"] == ["aime24.parquet", "math500.parquet"] and saved["verifier"] == "whole"
    title = Image.open(tmp_path / "pass_at_k.png").text["Title"]
    assert title.startswith("CharQwen-tiny on aime24, math500")
    assert "preset paper" in title and "T=1" in title and "whole verifier" in title


def test_greedy_draws_once_per_problem(char_model, bench_files):
    res = ev.evaluate(char_model, bench_files[1:], n=3, temperature=0.0, max_new_tokens=5, show_progress=False,
                      limit=2)  # fmt: skip
    row = res["benchmarks"]["math500"]
    assert row["n"] == 3 and row["avg@n"] in (0.0, 0.5, 1.0)  # three identical answers per problem
    assert row["pass@1"] == row["pass@3"]
    assert row["verifier_errors"] == row["verifier_timeouts"] == 0
    assert ev.markdown(res).endswith("\nverifier failures: 0 errors, 0 timeouts")


def test_verifier_failures_are_counted_not_passed_off_as_wrong(char_model, bench_files, monkeypatch):
    """math-verify cannot be imported: every response of the whole-completion verifier fails, and the report says so
    instead of showing a model that is always wrong."""
    from popo_verl import reward

    monkeypatch.setitem(sys.modules, "math_verify", None)
    monkeypatch.setattr(reward, "_warned", set())
    reward._mv.cache_clear()
    try:
        res = ev.evaluate(char_model, bench_files[1:], n=2, temperature=1.0, max_new_tokens=4, limit=1,
                          show_progress=False, verifier="whole")  # fmt: skip
    finally:
        reward._mv.cache_clear()
    row = res["benchmarks"]["math500"]
    assert (row["avg@n"], row["verifier_errors"], row["verifier_timeouts"]) == (0.0, 2, 0)
    saved = json.loads(json.dumps(res))  # what eval.json holds
    assert (saved["verifier_errors"], saved["verifier_timeouts"]) == (2, 0)
    assert saved["verifier_first_failure"].startswith("ModuleNotFoundError: import of math_verify halted")
    assert "verifier failures: 2 errors, 0 timeouts (each scored 0; first: ModuleNotFoundError" in ev.markdown(res)


@pytest.mark.parametrize("name", ["qwen_math", "r1", "llama", "deepseek"])
def test_prompts_use_the_named_template(char_model, bench_files, name):
    import pandas as pd

    from popo_verl.templates import chat_template

    row = pd.read_parquet(bench_files[1]).to_dict("records")[0]
    tok = ev.load_tokenizer(char_model, name)
    assert tok.chat_template == chat_template(name)
    text = tok.decode(ev.prompt_ids(tok, [row])[0])
    system, problem = (m["content"] for m in row["prompt"])
    assert system in text and text.index(system) < text.index(problem)
    assert text.endswith({"qwen_math": "<|im_start|>assistant\n", "r1": "Assistant: <think>",
                          "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n", "deepseek": "Assistant: "}[name])
