"""What only the benchmarks and the GPU check use; nothing here runs in training.

- `phases`: the step phases verl times (`timing_s/*`), read the same way by benchmarks/cost.py and `gpu_check`;
- `sized_models`: random Qwen3 models of a given size, built locally (nothing downloaded);
- `synthetic_reward`: a verifier that marks a fixed fraction of each group correct, so a random model has positives;
- `gpu_check`: the device probe, overrides and report behind scripts/gpu_check.sh.
"""
