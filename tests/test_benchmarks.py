"""benchmarks/learning.py's bookkeeping: curves read from verl's console log, the summary table and verdict."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning", ROOT / "benchmarks" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _log(vals):
    """verl's console logger lines (np.float64 reprs included) with the validation metrics at some steps."""
    lines = []
    for step, (p1, p4) in vals.items():
        lines.append(f"step:{step} - val-core/tiny_arith/acc/mean@4:np.float64({p1}) - "
                     f"val-core/tiny_arith/acc/best@4/mean:np.float64({p4}) - val-core/tiny_arith/acc/best@4/std:0.1")
        lines.append(f"step:{step + 1} - actor/pg_loss:0.5 - critic/score/mean:0.25")
    return "\n".join(lines)


def test_curves_come_from_verls_validation_keys(learning):
    curves = learning.curves_from_log(_log({0: (0.25, 0.4), 10: (0.3, 0.5)}), val_n=4)
    assert curves == {"pass@1": {0: 0.25, 10: 0.3}, "pass@4": {0: 0.4, 10: 0.5}}


def _run(variant, seed, finals):
    p1, p4 = finals
    return {"variant": variant, "seed": seed, "curves": {"pass@1": {"0": 0.2, "20": p1}, "pass@4": {"0": 0.4, "20": p4}}}


def test_summary_is_mean_and_std_over_seeds_with_the_verdict(learning, tmp_path):
    runs = [_run("popo", 1, (0.30, 0.5)), _run("popo", 2, (0.20, 0.4)), _run("grpo", 1, (0.22, 0.45)),
            _run("grpo", 2, (0.26, 0.47))]
    text = learning.summarise(runs, tmp_path)
    assert "| popo | 2 | 0.200 | 0.250 ± 0.071 | 0.450 ± 0.071 |" in text
    assert "| grpo | 2 | 0.200 | 0.240 ± 0.028 | 0.460 ± 0.014 |" in text
    assert "POPO = 0.250, GRPO = 0.240: meets the target" in text
    assert (tmp_path / "learning.md").read_text().strip() == text
    assert (tmp_path / "learning.png").stat().st_size > 1000
    runs[0]["curves"]["pass@1"]["20"] = 0.1
    assert "misses the target" in learning.summarise(runs, tmp_path)


def test_resume_keeps_finished_runs_and_skips_them(learning, tmp_path, monkeypatch):
    done = {"variant": "popo", "seed": 1, "steps": 2, "val_n": 4, "lr": 3e-4, "overrides": [],
            "curves": {"pass@1": {"0": 0.2, "2": 0.3}, "pass@4": {"0": 0.4, "2": 0.5}}}
    other = dict(done, variant="grpo", seed=7)
    (tmp_path / "learning.json").write_text(json.dumps([done, other]))
    ran = []

    def fake_run(name, seed, args, workdir):  # the training run itself is what e2e tests cover
        ran.append((name, seed))
        return dict(done, variant=name, seed=seed)

    monkeypatch.setattr(learning, "run_variant", fake_run)
    learning.main(["--variants", "popo", "grpo", "--seeds", "1", "--steps", "2", "--out", str(tmp_path), "--resume"])
    assert ran == [("grpo", 1)], "popo seed 1 was already measured with these settings"
    stored = json.loads((tmp_path / "learning.json").read_text())
    assert {(r["variant"], r["seed"]) for r in stored} == {("popo", 1), ("grpo", 1), ("grpo", 7)}, "nothing lost"
