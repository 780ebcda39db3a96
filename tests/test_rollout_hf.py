"""The `hf` rollout server (popo_verl/rollout/hf.py) without Ray: sampling, log-probs, EOS, weights."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from popo_verl.rollout.hf import HFRolloutServer, _filter_top_k_top_p


@pytest.fixture()
def server(tiny_random_model):
    cfg = SimpleNamespace(prompt_length=16, response_length=12, max_num_seqs=64, seed=3)
    mc = SimpleNamespace(path=tiny_random_model, local_path=tiny_random_model, trust_remote_code=False)
    return HFRolloutServer(cfg, mc)


def _full_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)]


def test_logprobs_match_a_full_forward(server):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    out = server._generate_batch(prompts, (0.7, 1.0, -1, 8, True))
    for p, (toks, lps) in zip(prompts, out):
        assert len(toks) == 8 and len(lps) == 8
        ref = _full_logprobs(server.model, p, toks, temperature=0.7)
        assert max(abs(a - b) for a, b in zip(ref, lps)) < 1e-4


def test_greedy_matches_hf_generate(server):
    prompt = [4, 9, 3, 21]
    (toks, _), = server._generate_batch([prompt], (0.0, 1.0, -1, 10, True))
    ref = server.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert toks == ref[0, len(prompt):].tolist()


def test_sampling_depends_on_step_and_prompt_not_on_batching(server):
    a, b = [5, 6, 7], [8, 9]
    server.global_steps = 1
    first = server._generate_batch([a, b, a], (1.0, 1.0, -1, 10, True))
    server.global_steps = 1
    server._seen_step = None  # a fresh server at the same step (a resumed run)
    second = server._generate_batch([b, a], (1.0, 1.0, -1, 10, True)) + server._generate_batch([a], (1.0, 1.0, -1, 10, True))
    assert second[1][0] == first[0][0] and second[0][0] == first[1][0] and second[2][0] == first[2][0]
    assert first[0][0] != first[2][0], "two samples of one prompt must differ"
    server.global_steps = 2
    third = server._generate_batch([a], (1.0, 1.0, -1, 10, True))
    assert third[0][0] != first[0][0]


def test_stops_at_eos_and_keeps_it(server):
    # Make EOS (id 2) the only likely token after the prompt by biasing the output embedding.
    with torch.no_grad():
        server.model.lm_head.weight[2] += 50.0 * server.model.model.norm.weight.sign()
    out = server._generate_batch([[5, 6], [7, 8, 9]], (1.0, 1.0, -1, 10, False))
    for toks, lps in out:
        assert toks[-1] == 2 and 2 not in toks[:-1] and len(lps) == len(toks)


def test_generate_api_queues_and_batches(server):
    async def go():
        reqs = [server.generate([5 + i, 6], {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}, f"r{i}") for i in range(5)]
        return await asyncio.gather(*reqs)

    outs = asyncio.run(go())
    assert len(outs) == 5 and all(1 <= len(o.token_ids) <= 12 for o in outs)
    assert all(len(o.log_probs) == len(o.token_ids) for o in outs)
    assert server.num_generated == 5


def test_update_weights_loads_and_rejects_unknown(server):
    state = server.get_state()
    name = "model.norm.weight"
    new = {name: torch.full_like(state[name], 0.5)}
    assert server.update_weights(new, global_steps=4) == 1
    assert torch.all(server.get_state()[name] == 0.5) and server.global_steps == 4 and server.weight_version == 1
    with pytest.raises(KeyError, match="popo_predictor"):
        server.update_weights({"popo_predictor.net.0.weight": torch.zeros(2, 2)})


def test_top_k_top_p_filter():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(_filter_top_k_top_p(p, 2, 1.0), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(_filter_top_k_top_p(p, -1, 0.75), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(_filter_top_k_top_p(p, -1, 1.0), p)
    assert torch.allclose(_filter_top_k_top_p(p, 1, 1.0), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
