"""The hf rollout on a GPU (popo_verl/gpu_rollout.py). On the CPU: the device and dtype choice (CUDA faked), the
registration on a (faked) GPU machine, the sampler, sleep/wake moving the weights off and back on (the CPU standing
in for the GPU), and the weight sync through verl's own bucketed transfer (shared memory where CUDA IPC is missing).
The tests at the end run only where CUDA exists (scripts/gpu_check.sh runs them)."""

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch

from popo_verl.gpu_rollout import HFGPURolloutServer, HFGPUServerAdapter, cuda_index, rollout_placement
from test_cpu_backend import _FAKE_GPU_MACHINE, _run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


def _config(dtype="float32", free_cache_engine=True, **kw):
    return SimpleNamespace(prompt_length=16, response_length=12, max_num_seqs=64, seed=3, dtype=dtype,
                           free_cache_engine=free_cache_engine, **kw)


def _server(path, device="cpu", **kw):
    mc = SimpleNamespace(path=path, local_path=path, trust_remote_code=False)
    return HFGPURolloutServer(_config(**kw), mc, device=device)


@pytest.fixture()
def server(tiny_random_model):
    return _server(tiny_random_model)


# ------------------------------------------------------------------------------------------------ placement
def test_cuda_index_maps_rays_gpu_id_to_this_processs_index():
    assert cuda_index("3", visible=None) == 3, "all GPUs visible: Ray's id is the index"
    assert cuda_index("3", visible="2,3") == 1, "a subset visible: the position in it"
    assert cuda_index("", visible="5") == 0, "no worker (standalone): the first visible GPU"
    with pytest.raises(RuntimeError, match="not visible"):
        cuda_index("1", visible="2,3")


def test_placement_is_the_gpu_in_the_rollouts_dtype(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rollout_placement(_config("bfloat16"), gpu_id="1") == (torch.device("cuda", 1), torch.bfloat16)
    assert rollout_placement(_config("float32")) == (torch.device("cuda", 0), torch.float32)
    assert rollout_placement(_config("bf16"), device="cpu") == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="POPO_VERL_HF_ROLLOUT_DEVICE=cpu"):
        rollout_placement(_config())


def test_registration_follows_the_machine_and_the_env():
    """On a GPU machine `rollout.name=hf` is the GPU rollout; the CPU one where verl runs on the CPU
    (POPO_VERL_CPU=1) or where POPO_VERL_HF_ROLLOUT_DEVICE=cpu asks for it; a bad value fails loudly."""
    r = _run(_FAKE_GPU_MACHINE + """
    import os
    from popo_verl.cpu import backend
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry
    def show():
        backend._register_hf_rollout_class(); backend._register_hf_rollout_replica()
        print(base._ROLLOUT_REGISTRY[("hf", "async")].rsplit(".", 1)[1], RolloutReplicaRegistry.get("hf").__name__)
    show()
    os.environ["POPO_VERL_HF_ROLLOUT_DEVICE"] = "cpu"; show()
    os.environ["POPO_VERL_HF_ROLLOUT_DEVICE"] = "auto"; os.environ["POPO_VERL_CPU"] = "1"; show()
    os.environ["POPO_VERL_HF_ROLLOUT_DEVICE"] = "tpu"
    try:
        show()
    except ValueError as e:
        print("refused:", e)
    """, {})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()[-4:]
    assert lines[:3] == ["HFGPUServerAdapter HFGPUReplica", "HFServerAdapter HFReplica", "HFServerAdapter HFReplica"]
    assert lines[3].startswith("refused: POPO_VERL_HF_ROLLOUT_DEVICE must be cpu, cuda or auto")


# ------------------------------------------------------------------------------------------------ sampling
def test_inverse_cdf_sampler_follows_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    tok = HFGPURolloutServer._sample(None, probs, gens)
    counts = torch.bincount(tok, minlength=5).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert torch.allclose(counts, probs[0], atol=0.03), counts
    again = HFGPURolloutServer._sample(None, probs[:3], [torch.Generator().manual_seed(s) for s in range(3)])
    assert again.tolist() == tok[:3].tolist(), "a request's draw depends on its own generator only"


def _full_logprobs(model, prompt, response, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)]


def test_logprobs_match_a_full_forward_and_batching_does_not_matter(server):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    server.global_steps = 2
    out = server._generate_batch(prompts, (0.7, 1.0, -1, 8, True))
    for p, (toks, lps) in zip(prompts, out):
        assert len(toks) == len(lps) == 8
        ref = _full_logprobs(server.model, p, toks, 0.7)
        assert max(abs(a - b) for a, b in zip(ref, lps)) < 1e-4
    server._seen_step = None  # a fresh server at the same step
    alone = server._generate_batch([prompts[2]], (0.7, 1.0, -1, 8, True))
    assert alone[0][0] == out[2][0], "the same prompt at the same step samples the same response, batched or not"


def test_loads_in_the_rollout_dtype(tiny_random_model):
    bf16 = _server(tiny_random_model, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    (toks, lps), = bf16._generate_batch([[5, 6]], (1.0, 1.0, -1, 6, True))
    assert len(toks) == 6 and all(lp <= 0 for lp in lps)


# ------------------------------------------------------------------------------------------------ sleep / wake
def _weights(server):
    return {k: v.detach().clone() for k, v in server.model.state_dict().items()}


def _ptrs(server):
    return [t.data_ptr() for t in server._tensors()]


def test_sleep_moves_the_weights_to_host_buffers_and_wake_brings_them_back(server):
    before, on_device = _weights(server), _ptrs(server)
    asyncio.run(server.sleep())
    assert server._offloaded and _ptrs(server) == [h.data_ptr() for h in server._host], "weights live in the host buffers"
    assert all(t.device.type == "cpu" for t in server._tensors())
    asyncio.run(server.wake_up(tags=["kv_cache"]))
    assert server._offloaded, "waking the KV cache leaves the weights where they are"
    asyncio.run(server.wake_up(tags=["weights"]))
    assert not server._offloaded and all(t.device == server.device for t in server._tensors())
    assert set(_ptrs(server)).isdisjoint(h.data_ptr() for h in server._host), "a fresh device copy, host buffers kept"
    assert _ptrs(server) != on_device
    assert all(torch.equal(before[k], v) for k, v in _weights(server).items())
    host = [h.data_ptr() for h in server._host]
    asyncio.run(server.sleep())
    assert [h.data_ptr() for h in server._host] == host, "the second sleep reuses the first one's host buffers"


def test_weights_synced_while_asleep_and_generation_while_asleep(server):
    prompts = [[5, 6, 7], [8, 9]]
    server.global_steps = 1
    awake = server._generate_batch(prompts, (1.0, 1.0, -1, 8, True))
    asyncio.run(server.sleep())
    server._seen_step = None
    asleep = server._generate_batch(prompts, (1.0, 1.0, -1, 8, True))
    assert asleep == awake and not server._offloaded, "a call while asleep wakes the weights and serves as before"
    asyncio.run(server.sleep())
    assert server.update_weights({"model.norm.weight": torch.full_like(server.model.model.norm.weight, 0.5)}) == 1
    asyncio.run(server.wake_up())
    assert torch.all(server.model.model.norm.weight == 0.5) and server.model.model.norm.weight.device == server.device


def test_without_free_cache_engine_the_weights_stay(tiny_random_model):
    s = _server(tiny_random_model, free_cache_engine=False)
    ptrs = _ptrs(s)
    asyncio.run(s.sleep())
    assert not s._offloaded and _ptrs(s) == ptrs


# ------------------------------------------------------------------------------------------------ weight sync
class _ActorHandle:
    """Stands in for the server's Ray actor handle: `handle.method.remote(...)` runs the method on an event loop of
    its own thread, as the server's own process would (the sender blocks its loop on the socket meanwhile)."""

    def __init__(self, obj):
        self.obj, self.loop = obj, asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def __getattr__(self, name):
        method = getattr(self.obj, name)

        async def call(*a, **k):
            out = method(*a, **k)
            return await out if asyncio.iscoroutine(out) else out

        return SimpleNamespace(remote=lambda *a, **k: asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(*a, **k), self.loop)))


def _adapter(server, bucket_mb=1):
    cfg = SimpleNamespace(tensor_model_parallel_size=1, data_parallel_size=1, pipeline_model_parallel_size=1,
                          free_cache_engine=True, checkpoint_engine=SimpleNamespace(update_weights_bucket_megabytes=bucket_mb))
    adapter = HFGPUServerAdapter(cfg, SimpleNamespace(), None, replica_rank=0)
    adapter.server_handle = _ActorHandle(server)
    return adapter


@pytest.mark.timeout(120)
def test_weight_sync_through_verls_bucketed_transfer(server):
    """The actor's full fp32 tensors (and POPO's predictor head, which must not arrive) reach the server through verl's
    BucketedWeightSender/Receiver; here over shared memory (no CUDA IPC on the CPU)."""
    adapter = _adapter(server, bucket_mb=1)
    assert adapter.use_shm, "no CUDA IPC on this machine"
    big = {k: torch.randn_like(v, dtype=torch.float32) for k, v in server.model.state_dict().items()}
    big["lm_head.weight"] = big["model.embed_tokens.weight"]  # tied, as in the actor's state

    def weights():
        yield "popo_predictor.net.0.weight", torch.zeros(3, 3)
        yield from big.items()

    asyncio.run(adapter.resume(tags=["weights"]))
    asyncio.run(adapter.update_weights(weights(), global_steps=7))
    state = server.model.state_dict()
    assert all(torch.equal(state[k], big[k].to(state[k].dtype)) for k in state)
    assert server.weight_version == 1 and server.global_steps == 7

    def unknown():
        yield "model.not_a_layer.weight", torch.zeros(2)

    with pytest.raises(KeyError, match="not_a_layer"):
        asyncio.run(adapter.update_weights(unknown()))

    def wrong_shape():
        yield "model.norm.weight", torch.zeros(3)
        yield "model.embed_tokens.weight", big["model.embed_tokens.weight"] * 2

    # a tensor that cannot be loaded fails the sync once the transfer has ended (the sender never waits for ever),
    # and the tensors after it still arrive
    with pytest.raises(RuntimeError, match=r"could not be loaded: \['model.norm.weight"):
        asyncio.run(adapter.update_weights(wrong_shape()))
    assert torch.equal(server.model.model.embed_tokens.weight, (big["model.embed_tokens.weight"] * 2).to(state["model.norm.weight"].dtype))


def test_ranks_without_a_server_drain_the_generator(server):
    adapter = _adapter(server)
    adapter._has_server = False
    drawn = []

    def weights():
        for i in range(3):
            drawn.append(i)
            yield f"w{i}", torch.zeros(1)

    asyncio.run(adapter.update_weights(weights()))
    assert drawn == [0, 1, 2], "every rank must produce every full tensor (the FSDP gather is collective)"


def test_resume_and_release_wake_and_sleep_the_server(server):
    adapter = _adapter(server)
    asyncio.run(adapter.release())
    assert server._offloaded
    asyncio.run(adapter.resume(tags=["weights"]))
    assert not server._offloaded


# ------------------------------------------------------------------------------------------------ on a GPU
@needs_cuda
def test_on_the_gpu_sleep_frees_the_weights_memory(tiny_random_model):
    s = _server(tiny_random_model, device=None, dtype="bfloat16")
    assert next(s.model.parameters()).device.type == "cuda"
    nbytes = sum(t.numel() * t.element_size() for t in s._tensors())
    awake = torch.cuda.memory_allocated()
    asyncio.run(s.sleep())
    assert awake - torch.cuda.memory_allocated() >= nbytes
    asyncio.run(s.wake_up(tags=["weights"]))
    assert torch.cuda.memory_allocated() - awake < nbytes
    (toks, lps), = s._generate_batch([[5, 6, 7]], (1.0, 1.0, -1, 8, True))
    assert len(toks) == 8 and all(lp <= 0 for lp in lps)


@needs_cuda
def test_on_the_gpu_logprobs_match_a_full_forward(tiny_random_model):
    s = _server(tiny_random_model, device=None, dtype="float32")
    prompts = [[5, 6, 7, 8], [9, 10]]
    for p, (toks, lps) in zip(prompts, s._generate_batch(prompts, (1.0, 1.0, -1, 8, True))):
        ref = _full_logprobs(s.model, p, toks, 1.0)
        assert max(abs(a - b) for a, b in zip(ref, lps)) < 1e-3


@needs_cuda
@pytest.mark.timeout(120)
def test_on_the_gpu_weight_sync_goes_through_cuda_ipc(tiny_random_model):
    s = _server(tiny_random_model, device=None, dtype="bfloat16")
    adapter = _adapter(s, bucket_mb=1)
    assert not adapter.use_shm
    new = {k: torch.randn(v.shape, device="cuda") for k, v in s.model.state_dict().items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied, as in the actor's state
    asyncio.run(adapter.update_weights(iter(new.items()), global_steps=2))
    state = s.model.state_dict()
    assert all(torch.equal(state[k], new[k].to(torch.bfloat16)) for k in state)
