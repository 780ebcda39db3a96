"""HF export of POPO checkpoints without the predictor head.

`python -m popo_verl.model_merger merge --backend fsdp|megatron --local_dir CKPT/global_step_N/actor --target_dir OUT`
takes verl's model-merger arguments (verl/model_merger/__main__.py) and writes the HF model without
`popo_predictor.*` (a training-only head):
- fsdp: verl's `FSDPModelMerger`, the head dropped before the HF model is saved;
- megatron, a checkpoint with HF weights (verl 0.9.1's default: `ckpt_contents.json` gives the `model` slot, or
  the `hf_model` export, in HF format, written by mbridge or Megatron-Bridge under `model/huggingface/`): those
  weights, the head dropped, saved through verl's HF saving and output check (verl's `MegatronModelMerger` reads
  `model/dist_ckpt/` only, empty in the default);
- megatron, Megatron shards only (`actor.megatron.use_dist_checkpointing=True` without `hf_model` in
  `checkpoint.save_contents`): verl's `MegatronModelMerger`,
  which builds the model without the head and so never loads it (dist checkpointing skips saved keys not asked
  for); it needs megatron-core, and on a machine without a GPU runs on popo_verl/engines/mcore_cpu.py's stand-in
  (gloo, local layers: the merger only copies weights).
`strip_predictor_from_hf_dir` does the same to the `huggingface/` folder verl writes when
`checkpoint.save_contents` has `hf_model`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings


def is_predictor_param(name: str) -> bool:
    # imported when first asked: `--help` need not load torch
    from popo_verl.protocol import is_predictor_param as named_predictor

    return named_predictor(name)


def _quiet_verl_imports() -> None:
    """verl's notices on import that say nothing about merging: optional engines not installed, and no GPU on a
    CPU machine (its platform manager's fallback); they would come before `--help`'s usage line."""
    warnings.filterwarnings("ignore", message=r".* engine is not available")
    logging.getLogger("verl.plugin.platform.platform_manager").setLevel(logging.ERROR)


def strip_predictor(state_dict: dict) -> dict:
    for name in [n for n in state_dict if is_predictor_param(n)]:
        del state_dict[name]
    return state_dict


def safetensors_files(folder: str) -> list[str]:
    """The paths of a folder's *.safetensors files, in name order ([] when the folder does not exist)."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]


def load_hf_weights(folder: str) -> dict:
    """Every tensor of an HF folder's safetensors files."""
    from safetensors.torch import load_file

    state = {}
    for path in safetensors_files(folder):
        state.update(load_file(path))
    return state


def strip_predictor_from_hf_dir(hf_dir: str) -> int:
    """Rewrite the safetensors files of an HF folder without predictor tensors; returns how many were dropped."""
    from safetensors.torch import load_file, save_file

    dropped = 0
    for path in safetensors_files(hf_dir):
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


PEFT_PREFIX = "base_model.model."


def merge_lora_state(state: dict, scaling: float) -> dict:
    """A PEFT LoRA model's state dict as the plain HF model's, the adapters merged: W = W_0 + scaling * B A
    (`scaling` = lora_alpha / r), PEFT's `base_model.model.` prefix and `.base_layer` dropped. Computed in fp32,
    stored in the base weight's dtype."""
    out = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        key = name.removeprefix(PEFT_PREFIX)
        if ".base_layer." in name:
            module = name.split(".base_layer.")[0]
            key = key.replace(".base_layer.", ".")
            a, b = state.get(f"{module}.lora_A.default.weight"), state.get(f"{module}.lora_B.default.weight")
            if name.endswith(".base_layer.weight") and a is not None and b is not None:
                tensor = (tensor.float() + scaling * (b.float() @ a.float())).to(tensor.dtype)
        out[key] = tensor
    return out


def merge_lora_in_hf_dir(hf_dir: str, scaling: float) -> int:
    """Rewrite the `huggingface/` folder verl saves for a LoRA run, whose files hold PEFT's names (which no HF
    loader reads), as the merged HF model (`merge_lora_state`) without the predictor head. Returns how many adapters
    were merged (0: nothing rewritten)."""
    from safetensors.torch import save_file

    files = safetensors_files(hf_dir)
    state = load_hf_weights(hf_dir)
    merged = sum(1 for n in state if ".lora_A." in n)
    if not merged:
        return 0
    for path in files:
        os.remove(path)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    save_file(strip_predictor(merge_lora_state(state, scaling)), os.path.join(hf_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return merged


class MergeError(Exception):
    """A checkpoint this command cannot export here (the message says why and what to do)."""


def megatron_model_format(local_dir: str) -> str:
    """Where a verl 0.9.1 Megatron checkpoint keeps its model weights: "huggingface" (bridge save, the default) or
    "dist_ckpt" (Megatron shards only), as its `ckpt_contents.json` records (verl/utils/checkpoint/
    megatron_checkpoint_manager.py); a checkpoint without that file is judged by which folder holds files."""
    contents_file = os.path.join(local_dir, "ckpt_contents.json")
    if os.path.isfile(contents_file):
        with open(contents_file) as f:
            contents = json.load(f).get("contents", {})
        formats = {contents.get(slot, {}).get("format") for slot in ("model", "hf_model")}
        if "huggingface" in formats:  # the model slot or the hf_model export: HF weights, nothing to convert
            return "huggingface"
        if "megatron_dist_checkpoint" in formats:
            return "dist_ckpt"
    dist = os.path.join(local_dir, "model", "dist_ckpt")
    if os.path.isdir(dist) and os.listdir(dist):
        return "dist_ckpt"
    if safetensors_files(os.path.join(local_dir, "model", "huggingface")):
        return "huggingface"
    raise MergeError(
        f"{local_dir}: no Megatron model weights (neither model/huggingface/*.safetensors nor model/dist_ckpt/); "
        "--local_dir is a checkpoint's actor folder, CKPT/global_step_N/actor, saved with 'model' or 'hf_model' in "
        "actor_rollout_ref.actor.checkpoint.save_contents")


def _bridge_merger_class():
    from verl.model_merger.base_model_merger import BaseModelMerger

    class PopoMegatronBridgeMerger(BaseModelMerger):
        """A bridge checkpoint's HF weights (model/huggingface/), the head dropped, through verl's HF saving."""

        def load_state_dict(self) -> dict:
            return strip_predictor(load_hf_weights(self.hf_model_config_path))

        def merge_and_save(self):
            state = self.load_state_dict()
            if self.config.operation == "test":
                self._validate(state)
                return
            self.save_hf_model_and_tokenizer(state)
            if self.config.hf_upload:
                self.upload_to_huggingface()

        def _validate(self, state: dict) -> None:
            """verl's `test` operation: every tensor equal (bf16 rounding) to the reference HF model's."""
            import torch

            ref = load_hf_weights(self.config.test_hf_dir)
            missing = sorted(set(ref) - set(state))
            if missing:
                raise RuntimeError(f"not in the checkpoint: {missing[:5]}")
            for name, tensor in state.items():
                if name not in ref:
                    raise RuntimeError(f"key: {name} not in {self.config.test_hf_dir}")
                torch.testing.assert_close(tensor.float(), ref[name].float(), atol=1e-2, rtol=5e-2)

        def cleanup(self):
            pass

    return PopoMegatronBridgeMerger


def _dist_ckpt_merger_class():
    from verl.model_merger.megatron_model_merger import MegatronModelMerger

    class PopoMegatronModelMerger(MegatronModelMerger):
        def save_hf_model_and_tokenizer(self, merged_state_dict):
            return super().save_hf_model_and_tokenizer(strip_predictor(merged_state_dict))

    return PopoMegatronModelMerger


def _fsdp_merger_class():
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    class PopoFSDPModelMerger(FSDPModelMerger):
        def save_hf_model_and_tokenizer(self, state_dict):
            return super().save_hf_model_and_tokenizer(strip_predictor(state_dict))

    return PopoFSDPModelMerger


def merger_for(config, model_format: str | None = None):
    """The merger for verl's `ModelMergerConfig`: fsdp, or megatron by where its checkpoint keeps the model
    (`model_format`, as `megatron_model_format` answers; found here when not given)."""
    if config.backend == "fsdp":
        return _fsdp_merger_class()(config)
    if config.backend != "megatron":
        raise ValueError(f"--backend must be fsdp or megatron, got {config.backend!r}")
    if (model_format or megatron_model_format(config.local_dir)) == "huggingface":
        return _bridge_merger_class()(config)
    import torch

    try:
        import mbridge  # noqa: F401  (verl's Megatron code imports it)
        import megatron.core  # noqa: F401
    except ImportError as e:
        raise MergeError(f"{config.local_dir} keeps its model in Megatron dist-checkpoint shards, which verl's "
                         f"MegatronModelMerger converts with megatron-core ({e}): pip install -e '.[megatron]' "
                         "(GPU) or '.[megatron-cpu]'") from e
    if not torch.cuda.is_available():
        from popo_verl.engines import mcore_cpu

        mcore_cpu.prepare_model_merger()
    return _dist_ckpt_merger_class()(config)


def main(argv: list[str] | None = None) -> None:
    import sys

    _quiet_verl_imports()
    from verl.model_merger.base_model_merger import generate_config_from_args, parse_args

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = parse_args()
    try:
        # a wrong folder fails here, before verl's config makes --target_dir
        model_format = megatron_model_format(args.local_dir) if args.backend == "megatron" else None
        merger = merger_for(generate_config_from_args(args), model_format)
    except MergeError as e:
        sys.exit(f"popo_verl.model_merger: {e}")
    merger.merge_and_save()
    merger.cleanup()


if __name__ == "__main__":
    main()
