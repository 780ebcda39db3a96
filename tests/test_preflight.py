"""popo_verl.preflight: what a GPU run script checks before it starts verl (the scripts' side: test_recipe_scripts)."""

import pytest

from popo_verl import preflight


def _fake_cache(root, repo):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty HF cache and a hub that refuses connections."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf"


def test_local_model_directory(tmp_path, tiny_random_model):
    assert preflight.model_problem(tiny_random_model) is None
    assert "no config.json" in preflight.model_problem(str(tmp_path))
    assert "no such directory" in preflight.model_problem(str(tmp_path / "missing"))
    assert "no such directory" in preflight.model_problem("ckpt/run/global_step_5")  # a path, not org/name


def test_hub_id_in_the_local_cache_needs_no_hub(hub):
    assert "unreachable" in preflight.model_problem("acme/math-7b")
    _fake_cache(hub, "acme/math-7b")
    assert preflight.model_problem("acme/math-7b") is None


def test_hub_id_offline_says_so(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE=1" in preflight.model_problem("acme/math-7b")


@pytest.mark.parametrize("count,required,message", [(0, 8, "no GPU visible"), (2, 8, "only 2 GPU(s) visible"),
                                                    (8, 8, None), (8, 4, None)])  # fmt: skip
def test_gpu_count(monkeypatch, count, required, message):
    import torch

    monkeypatch.delenv(preflight.SKIP_GPU_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    got = preflight.gpu_problem(required)
    assert got is None if message is None else message in got
    monkeypatch.setenv(preflight.SKIP_GPU_ENV, "1")
    assert preflight.gpu_problem(required) is None


def test_main_reports_every_problem(monkeypatch, capsys, hub):
    monkeypatch.setenv(preflight.SKIP_GPU_ENV, "1")
    assert preflight.main(["--gpus", "8", "--model", "/no/such/model"]) == 1
    assert "error: MODEL_PATH=/no/such/model: no such directory" in capsys.readouterr().err
