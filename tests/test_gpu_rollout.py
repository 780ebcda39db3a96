"""The hf rollout on a GPU (popo_verl/rollout/hf_gpu.py). On the CPU: the device and dtype choice (CUDA faked), the
registration on a (faked) GPU machine, the sampler, the KV-cache budget and its chunks, sleep/wake moving the weights
off and back on (the CPU standing in for the GPU), the CUDA device of every worker thread (torch.cuda.device recorded,
as no GPU exists here), and the weight sync through verl's own bucketed transfer (shared memory where CUDA IPC is
missing). The tests at the end run only where CUDA exists (scripts/gpu_check.sh runs them)."""

import asyncio
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from popo_verl.rollout import hf_gpu
from popo_verl.rollout.hf_gpu import (HFGPURolloutServer, HFGPUServerAdapter, RowUniforms, cuda_index, inverse_cdf_sample,
                                   kv_budget_bytes, kv_bytes_per_token, kv_fraction, rollout_placement,
                                   sequences_per_chunk)
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
def _uniforms(seeds, block=hf_gpu.UNIFORM_BLOCK):
    return RowUniforms([torch.Generator().manual_seed(s) for s in seeds], torch.device("cpu"), block)


def test_inverse_cdf_sampler_follows_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(4000, 1)
    tok = inverse_cdf_sample(probs, _uniforms(range(4000)).next())
    counts = torch.bincount(tok, minlength=5).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert torch.allclose(counts, probs[0], atol=0.03), counts
    again = inverse_cdf_sample(probs[:3], _uniforms(range(3)).next())
    assert again.tolist() == tok[:3].tolist(), "a request's draw depends on its own generator only"


def test_uniforms_are_drawn_in_blocks_yet_equal_one_draw_per_step():
    """One host draw per row and block, not per row and step; each row's stream is what a draw per step gives (so the
    sampled tokens are those of the per-step sampler this replaced), across block boundaries."""
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    per_step = [torch.stack([1.0 - torch.rand((), generator=g, dtype=torch.float64) for g in gens]) for _ in range(10)]
    blocks = _uniforms((1, 2, 3), block=4)
    assert all(torch.equal(blocks.next(), ref) for ref in per_step)
    assert blocks._buf.shape == (3, 4), "10 steps took 3 blocks of 4"


# ------------------------------------------------------------------------------------------------ KV-cache budget
def test_kv_budget_arithmetic():
    """The issue's case: 256 sequences x 4.6k tokens of a 7B (Qwen2.5-7B: 28 layers, 4 KV heads of 128, bf16) take
    about 68 GB of KV cache; with 40 GiB free and the default fraction 0.5, 81 of them generate at once."""
    qwen7b = SimpleNamespace(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584)
    per_token = kv_bytes_per_token(qwen7b, torch.bfloat16)
    assert per_token == 2 * 28 * 4 * 128 * 2
    assert 256 * 4600 * per_token / 1e9 == pytest.approx(67.5, abs=0.1)
    budget = kv_budget_bytes(40 * 2**30, kv_fraction(_config()))
    assert budget == 20 * 2**30
    assert sequences_per_chunk(budget, per_token, 4600, 256) == 20 * 2**30 // (per_token * 4600) == 81
    assert sequences_per_chunk(budget, per_token, 100, 256) == 256, "no more than the batch"
    assert sequences_per_chunk(10, per_token, 4600, 256) == 1, "at least one sequence"
    qwen3 = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=64)
    assert kv_bytes_per_token(qwen3, torch.float32) == 2 * 2 * 2 * 8 * 4, "an explicit head_dim wins over hidden/heads"


def test_kv_fraction_key():
    """A key of verl's per-engine extra arguments: it composes (with `+`) and passes verl's RolloutConfig unchanged."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None):
        cfg = compose("ppo_trainer", overrides=["actor_rollout_ref.rollout.name=hf",
                                                "+actor_rollout_ref.rollout.engine_kwargs.hf.kv_cache_memory_fraction=0.3"])
    assert kv_fraction(omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)) == 0.3
    assert kv_fraction(_config()) == 0.5
    assert kv_fraction(_config(engine_kwargs={"vllm": {}, "hf": {"kv_cache_memory_fraction": 0.3}})) == 0.3
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"rollout\.engine_kwargs\.hf\.kv_cache_memory_fraction must lie in"):
            kv_fraction(_config(engine_kwargs={"hf": {"kv_cache_memory_fraction": bad}}))


def _record_prefill_sizes(server, monkeypatch) -> list[int]:
    sizes, forward = [], server.model.forward

    def recording(*a, **k):
        if k.get("past_key_values") is None:
            sizes.append(k["input_ids"].shape[0])
        return forward(*a, **k)

    monkeypatch.setattr(server.model, "forward", recording)
    return sizes


def test_a_small_kv_budget_generates_in_chunks_with_the_same_outputs(server, monkeypatch):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [5, 6, 7, 8], [14]]
    key = (1.0, 1.0, -1, 8, True)
    sizes = _record_prefill_sizes(server, monkeypatch)
    server.global_steps = 3
    whole = server._generate_batch(prompts, key)
    assert sizes == [5], "off a GPU there is no budget: one batch"
    # the GPU's free memory (torch.cuda.mem_get_info) stood in for: room for two sequences of 4 + 8 tokens
    per_sequence = kv_bytes_per_token(server.model.config, server.dtype) * (4 + 8)
    monkeypatch.setattr(server, "_free_bytes", lambda: int(2 * per_sequence / server.kv_fraction) + 1)
    server._seen_step = None  # a fresh server at the same step
    sizes.clear()
    chunked = server._generate_batch(prompts, key)
    assert sizes == [2, 2, 1]
    assert [t for t, _ in chunked] == [t for t, _ in whole], "each request samples what it did in one batch"
    assert max(abs(a - b) for (_, x), (_, y) in zip(chunked, whole) for a, b in zip(x, y)) < 1e-4
    assert server.num_generated == 10


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


# ------------------------------------------------------------------------------------------------ threads' device
class _RecordedDevice:
    """Stands in for torch.cuda.device (no GPU here): which index each thread has entered."""

    current = threading.local()

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        self.prev = getattr(self.current, "index", None)
        self.current.index = self.index

    def __exit__(self, *exc):
        self.current.index = self.prev
        return False


def test_every_thread_body_runs_on_the_rollouts_gpu(server, monkeypatch):
    """A replica on GPU 1: generation, sleep, wake and the weight receipt run in asyncio.to_thread threads, whose
    current CUDA device is GPU 0 unless they select the rollout's (verl's receiver synchronizes the current device)."""
    monkeypatch.setattr(torch.cuda, "device", _RecordedDevice)
    server._cuda_index = 1
    phase, seen = ["generate"], []

    def probe(fn):
        def probed(*a, **k):
            in_thread = threading.current_thread() is not threading.main_thread()
            seen.append((phase[0], in_thread, getattr(_RecordedDevice.current, "index", None)))
            return fn(*a, **k)
        return probed

    monkeypatch.setattr(server.model, "forward", probe(server.model.forward))
    monkeypatch.setattr(server.model, "state_dict", probe(server.model.state_dict))
    monkeypatch.setattr(server, "_tensors", probe(server._tensors))

    async def lifecycle():
        await server.generate([5, 6], {"temperature": 1.0, "max_tokens": 2}, "r0")
        phase[0] = "sleep"
        await server.sleep()
        phase[0] = "wake"
        await server.wake_up(tags=["weights"])

    asyncio.run(lifecycle())
    phase[0] = "update_weights"  # a plain Ray method: the actor's own thread
    server.update_weights({"model.norm.weight": torch.ones_like(server.model.model.norm.weight)})
    phase[0] = "receive"
    adapter = _adapter(server)
    adapter.use_shm = True  # the server's tensors are on the CPU even where a GPU exists
    asyncio.run(adapter.update_weights(iter([("model.norm.weight", torch.zeros_like(server.model.model.norm.weight))])))
    assert {p for p, _, _ in seen} == {"generate", "sleep", "wake", "update_weights", "receive"}
    assert all(in_thread for p, in_thread, _ in seen if p != "update_weights"), "the bodies that run in worker threads"
    assert [(p, index) for p, _, index in seen if index != 1] == [], "every body on the rollout's GPU"


def test_the_peak_memory_line_is_printed_as_it_grows_and_read_by_cost_py(server, monkeypatch, capsys, cost):
    """benchmarks/cost.py's memory table takes the server's peak from this line where nvidia-smi cannot name the
    server's process (a container)."""
    peak = [2.5 * 2**30]
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[0])  # no GPU here
    server.device = torch.device("cuda", 1)
    server._report_peak()
    server._report_peak()
    peak[0] = 3.5 * 2**30
    server._report_peak()
    out = capsys.readouterr().out
    assert out.splitlines() == [hf_gpu.peak_line(2.5), hf_gpu.peak_line(3.5)], "once per new peak"
    assert cost.rollout_peak_gb(f"(HFGPURolloutServer pid=7) {out}") == 3.5


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
    adapter.use_shm = True  # what verl picks without CUDA IPC; a GPU machine would offer IPC to this CPU server too
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


_IPC_SENDER = """
import asyncio, sys, torch
from popo_verl.rollout.hf_gpu import bucketed_weight_transfer
weights = {k: v.cuda() for k, v in torch.load(sys.argv[2]).items()}
sender = bucketed_weight_transfer().BucketedWeightSender(zmq_handle=sys.argv[1], bucket_size_mb=1, use_shm=False)
asyncio.run(sender.async_send_weights(iter(weights.items())))
print("sent from cuda", torch.cuda.current_device(), flush=True)
"""

_IPC_RECEIVER = """
import asyncio, sys, torch
from types import SimpleNamespace
from popo_verl.rollout.hf_gpu import HFGPURolloutServer
handle, weights_file, model, index = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = SimpleNamespace(prompt_length=16, response_length=12, max_num_seqs=64, seed=3, dtype="bfloat16", free_cache_engine=True)
s = HFGPURolloutServer(cfg, SimpleNamespace(path=model, local_path=model, trust_remote_code=False), device=f"cuda:{index}")
n = asyncio.run(s.update_weights_from_ipc(handle, use_shm=False, global_steps=2))
expected = torch.load(weights_file)
wrong = [k for k, v in s.model.state_dict().items() if not torch.equal(v.cpu(), expected[k].to(v.dtype))]
has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
print("received", n, "wrong", wrong, "context on GPU 0", has_context(0) if has_context and index != 0 else "n/a", flush=True)
"""


@needs_cuda
@pytest.mark.timeout(600)
def test_on_the_gpu_weight_sync_between_two_processes(tiny_random_model, tmp_path):
    """verl's CUDA-IPC transfer as a run uses it: the trainer worker (sender) sees only its GPU, as cuda:0; the hf
    server (receiver, another process) sees every GPU and holds the same one at its index there, 1 where the machine
    has two (else both at 0, still two processes). Every tensor must arrive, and a receiver on GPU 1 must never open
    a context on GPU 0 (its worker threads' default device)."""
    from transformers import AutoModelForCausalLM

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    index = min(1, len(ids) - 1)
    state = AutoModelForCausalLM.from_pretrained(tiny_random_model).state_dict()
    weights = {k: torch.randn(v.shape) for k, v in state.items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied, as in the actor's state
    torch.save(weights, tmp_path / "weights.pt")
    handle = f"ipc://{tmp_path}/weights.sock"
    env = dict(os.environ)
    receiver = subprocess.Popen([sys.executable, "-c", _IPC_RECEIVER, handle, str(tmp_path / "weights.pt"), tiny_random_model,
                                 str(index)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sender = subprocess.Popen([sys.executable, "-c", _IPC_SENDER, handle, str(tmp_path / "weights.pt")],
                              env=dict(env, CUDA_VISIBLE_DEVICES=ids[index]), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        sent, received = sender.communicate(timeout=300)[0], receiver.communicate(timeout=300)[0]
    finally:
        for p in (sender, receiver):
            if p.poll() is None:
                p.kill()
    assert sender.returncode == 0 and "sent from cuda 0" in sent, sent[-3000:]
    assert receiver.returncode == 0, received[-3000:]
    line = received.strip().splitlines()[-1]
    assert line == f"received {len(state)} wrong [] context on GPU 0 {False if index else 'n/a'}", received[-3000:]
