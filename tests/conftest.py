"""Shared fixtures: a tiny random Qwen3 model built locally (no download)."""

import pytest
import torch


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
