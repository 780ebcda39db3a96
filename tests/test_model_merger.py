"""`python -m popo_verl.model_merger --backend megatron` on the layouts verl 0.9.1's Megatron checkpoints take.

A bridge checkpoint (verl's default) keeps the model as HF weights under model/huggingface/; one saved with
`use_dist_checkpointing=True` keeps it in Megatron shards under model/dist_ckpt/, which only verl's
MegatronModelMerger converts (with megatron-core). The folders here are laid out as verl's checkpoint manager writes them
(verl/utils/checkpoint/megatron_checkpoint_manager.py, `ckpt_contents.json` schema 2), from the tiny task's model;
tests/test_megatron_trainer.py runs the command on a checkpoint the Megatron trainer saved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from popo_verl.protocol import is_predictor_param
from popo_verl.model_merger import MergeError, main, megatron_model_format


def actor_dir(tmp_path, tiny_dir, model_format: str):
    """CKPT/global_step_1/actor of a 1-rank Megatron run: its HF folder (config, tokenizer, and the weights when
    the model slot is HF) and its ckpt_contents.json."""
    actor = tmp_path / "global_step_1" / "actor"
    hf = actor / "model" / "huggingface"
    shutil.copytree(f"{tiny_dir}/model", hf)
    if model_format == "huggingface":  # a head that reached the HF folder (a bridge export without POPO's filter)
        weights = load_file(str(hf / "model.safetensors"))
        weights["popo_predictor.net.0.weight"] = torch.ones(4, 4)
        save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
        model = {"backend": "mbridge", "format": "huggingface", "path": "model/huggingface"}
    else:
        (hf / "model.safetensors").unlink()
        (actor / "model" / "dist_ckpt").mkdir()
        (actor / "model" / "dist_ckpt" / "metadata.json").write_text("{}")
        model = {"format": "megatron_dist_checkpoint", "path": "model/dist_ckpt"}
    contents = {"framework": "megatron", "schema_version": 2, "contents": {"model": model}}
    (actor / "ckpt_contents.json").write_text(json.dumps(contents))
    return actor


def test_a_bridge_checkpoint_exports_its_hf_model_without_the_head(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    actor = actor_dir(tmp_path, tiny_dir, "huggingface")
    assert megatron_model_format(str(actor)) == "huggingface"
    out = tmp_path / "hf"
    main(["merge", "--backend", "megatron", "--local_dir", str(actor), "--target_dir", str(out)])
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    source = load_file(f"{tiny_dir}/model/model.safetensors")
    assert exported and not any(is_predictor_param(k) for k in exported)
    assert set(exported) == set(source)
    for k, v in source.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))
    # verl's `test` operation: the checkpoint against a reference HF model
    main(["test", "--backend", "megatron", "--local_dir", str(actor), "--test_hf_dir", f"{tiny_dir}/model"])
    other = tmp_path / "other"
    shutil.copytree(f"{tiny_dir}/model", other)
    moved = {k: v + 1.0 if k == "model.norm.weight" else v for k, v in source.items()}
    save_file(moved, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AssertionError):
        main(["test", "--backend", "megatron", "--local_dir", str(actor), "--test_hf_dir", str(other)])


def test_a_dist_checkpoint_without_megatron_core_says_what_to_install(tmp_path, tiny_dir, monkeypatch):
    """Megatron shards need verl's MegatronModelMerger and so megatron-core (tests/test_megatron_engine.py runs it on
    real shards); where it is missing (as in the `test` extra, here made so in any venv) the command says so."""
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # None in sys.modules: the import raises ImportError
    actor = actor_dir(tmp_path, tiny_dir, "dist_ckpt")
    assert megatron_model_format(str(actor)) == "dist_ckpt"
    with pytest.raises(SystemExit) as e:
        main(["merge", "--backend", "megatron", "--local_dir", str(actor), "--target_dir", str(tmp_path / "hf")])
    assert "Megatron dist-checkpoint shards" in str(e.value.code) and "pip install -e '.[megatron]'" in str(e.value.code)


def test_a_folder_without_model_weights_is_refused_before_anything_is_written(tmp_path, tiny_dir):
    actor = actor_dir(tmp_path, tiny_dir, "huggingface")
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as e:  # the step folder instead of its actor folder
        main(["merge", "--backend", "megatron", "--local_dir", str(actor.parent), "--target_dir", str(out)])
    assert "no Megatron model weights" in str(e.value.code) and "CKPT/global_step_N/actor" in str(e.value.code)
    assert not out.exists()
    with pytest.raises(MergeError):
        megatron_model_format(str(tmp_path))


def test_help_starts_with_its_usage_line():
    """Before: ten lines of verl's import notices (optional engines, no GPU) came before the usage line."""
    r = subprocess.run([sys.executable, "-m", "popo_verl.model_merger", "--help"], capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k not in ("POPO_VERL_CPU", "VERL_PLATFORM")})
    assert r.returncode == 0
    assert (r.stderr + r.stdout).splitlines()[0].startswith("usage: "), (r.stderr + r.stdout)[:2000]
