"""HF export of POPO checkpoints without the predictor head.

`python -m popo_verl.model_merger merge --backend fsdp --local_dir CKPT/global_step_N/actor --target_dir OUT`
takes verl's model-merger arguments (verl/model_merger/__main__.py) and runs verl's `FSDPModelMerger`,
dropping `popo_predictor.*` (a training-only head) before the HF model is saved. `strip_predictor_from_hf_dir`
does the same to the `huggingface/` folder verl writes when `checkpoint.save_contents` has `hf_model`.
"""

from __future__ import annotations

import json
import os

from popo_verl.engines.fsdp import is_predictor_param


def strip_predictor(state_dict: dict) -> dict:
    for name in [n for n in state_dict if is_predictor_param(n)]:
        del state_dict[name]
    return state_dict


def strip_predictor_from_hf_dir(hf_dir: str) -> int:
    """Rewrite the safetensors files of an HF folder without predictor tensors; returns how many were dropped."""
    from safetensors.torch import load_file, save_file

    dropped = 0
    if not os.path.isdir(hf_dir):
        return 0
    for fname in sorted(os.listdir(hf_dir)):
        if not fname.endswith(".safetensors"):
            continue
        path = os.path.join(hf_dir, fname)
        tensors = load_file(path)
        keep = {k: v for k, v in tensors.items() if not is_predictor_param(k)}
        if len(keep) != len(tensors):
            dropped += len(tensors) - len(keep)
            save_file(keep, path + ".tmp", metadata={"format": "pt"})
            os.replace(path + ".tmp", path)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if dropped and os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if not is_predictor_param(k)}
        with open(index, "w") as f:
            json.dump(idx, f, indent=2)
    return dropped


def main() -> None:
    from verl.model_merger.base_model_merger import generate_config_from_args, parse_args
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    class PopoFSDPModelMerger(FSDPModelMerger):
        def save_hf_model_and_tokenizer(self, state_dict):
            return super().save_hf_model_and_tokenizer(strip_predictor(state_dict))

    config = generate_config_from_args(parse_args())
    if config.backend != "fsdp":
        raise NotImplementedError("POPO checkpoints come from the FSDP engine; use --backend fsdp")
    merger = PopoFSDPModelMerger(config)
    merger.merge_and_save()
    merger.cleanup()


if __name__ == "__main__":
    main()
