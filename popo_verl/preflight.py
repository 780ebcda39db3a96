"""Checks a GPU run script makes before it starts verl, so that a missing GPU or model fails in seconds.

Without them verl prints its config, starts Ray and its workers, and only then fails (or waits) on the
missing GPUs or model: minutes later, with the cause buried in a worker's log.

    python -m popo_verl.preflight --gpus 8 --model Qwen/Qwen2.5-Math-7B

Exit status 1 and one line per problem on stderr; 0 and nothing printed when the run can start.
POPO_SKIP_GPU_CHECK=1 skips the GPU check (the tests use it to reach the model check on a CPU machine).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

SKIP_GPU_ENV = "POPO_SKIP_GPU_CHECK"


def gpu_problem(required: int) -> Optional[str]:
    """Why ``required`` GPUs are not usable on this node, or None."""
    if os.environ.get(SKIP_GPU_ENV, "0").strip().lower() in ("1", "true", "yes"):
        return None
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        return (
            f"no GPU visible on this machine (torch.cuda.device_count() == 0; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): this script trains on N_GPUS_PER_NODE={required} "
            "GPUs; on a CPU machine run scripts/run_tiny_cpu.sh"
        )
    if found < required:
        return f"N_GPUS_PER_NODE={required} but only {found} GPU(s) visible on this node: set N_GPUS_PER_NODE={found}"
    return None


def _looks_local(model: str) -> bool:
    # a hub id is "org/name"; anything else that does not exist can only have been meant as a path
    return model.startswith(("/", "./", "../", "~")) or model.count("/") != 1


def model_problem(model: str, hub_timeout: float = 10.0) -> Optional[str]:
    """Why ``model`` (a local directory or a hub id) cannot be loaded here, or None."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return f"MODEL_PATH={model} has no config.json: not a Hugging Face model directory"
        return None
    if _looks_local(model):
        return f"MODEL_PATH={model}: no such directory"
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return None
    where = f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return f"MODEL_PATH={model} is {where} and HF_HUB_OFFLINE=1: download it first or point MODEL_PATH at a local copy"
    try:
        HfApi().model_info(model, timeout=hub_timeout)
    except GatedRepoError:
        return None  # exists; access is a token matter that the download reports itself
    except RepositoryNotFoundError:
        return f"MODEL_PATH={model} is {where}, and the hub ({constants.ENDPOINT}) has no such model"
    except Exception as e:  # noqa: BLE001 - any transport failure means: unreachable
        return (
            f"MODEL_PATH={model} is {where}, and the hub ({constants.ENDPOINT}) is unreachable "
            f"({type(e).__name__}: {e}): download the model on a connected machine, or set MODEL_PATH to a local copy"
        )
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, required=True, help="GPUs the run needs on this node (N_GPUS_PER_NODE)")
    ap.add_argument("--model", required=True, help="MODEL_PATH: a local model directory or a hub id")
    args = ap.parse_args(argv)
    problems = [p for p in (gpu_problem(args.gpus), model_problem(args.model)) if p]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
