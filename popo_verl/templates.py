"""The paper's prompt layouts per model family, as chat templates verl can use.

verl renders every prompt with the tokenizer's chat template, and `actor_rollout_ref.model.custom_chat_template`
replaces it. The POPO reference writes its prompts by hand per model family instead of using a tokenizer's
template (a base model may have none; Llama 3.1's own template inserts a knowledge-cutoff header): these
templates reproduce those layouts. A system message in the data (`python -m popo_verl.data prepare`, whose
default prompt style carries the reference's Qwen-Math instruction) fills the system slot; without one each
family falls back to the reference's own instruction for it.

    python -m popo_verl.templates r1           # the hydra override the run scripts pass to verl
    python -m popo_verl.templates r1 --jinja   # the template itself
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

OVERRIDE_KEY = "actor_rollout_ref.model.custom_chat_template"

# The reference's instruction for Qwen-Math, also the data's default system prompt (popo_verl.data).
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Layout:
    """How one family wraps each turn; `system` is the family's instruction when the data has none."""

    system: str
    system_open: str
    system_close: str
    user_open: str
    user_close: str
    assistant_open: str
    assistant_close: str = ""


LAYOUTS: dict[str, Layout] = {
    "qwen_math": Layout(
        system=QWEN_MATH_SYSTEM,
        system_open="<|im_start|>system\n",
        system_close="<|im_end|>\n",
        user_open="<|im_start|>user\n",
        user_close="<|im_end|>\n",
        assistant_open="<|im_start|>assistant\n",
        assistant_close="<|im_end|>\n",
    ),
    # R1-style plain-text dialogue: the assistant turn opens inside <think>
    "r1": Layout(
        system=(
            "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
            "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
            "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
            "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
            "<answer> answer here </answer>."
        ),
        system_open="",
        system_close="\n",
        user_open="User: ",
        user_close="\n",
        assistant_open="Assistant: <think>",
        assistant_close="\n",
    ),
    "llama": Layout(
        system=(
            "You are a helpful math assistant. Solve the problem step by step and put your final answer in \\boxed{}."
        ),
        system_open="<|start_header_id|>system<|end_header_id|>\n\n",
        system_close="<|eot_id|>",
        user_open="<|start_header_id|>user<|end_header_id|>\n\n",
        user_close="<|eot_id|>",
        assistant_open="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_close="<|eot_id|>",
    ),
    "deepseek": Layout(
        system=(
            "You are a helpful assistant. Please solve the following math problem step by step and put your final "
            "answer within \\boxed{}."
        ),
        system_open="",
        system_close="\n\n",
        user_open="User: ",
        user_close="\n\n",
        assistant_open="Assistant: ",
        assistant_close="\n\n",
    ),
}
# Text before the first turn: Llama 3's BOS is part of its hand-written layout, the others start bare.
PREAMBLE = {"llama": "<|begin_of_text|>"}


def _lit(s: str) -> str:
    """A jinja string literal, double-quoted and on one line (hydra's single-quoted value stays unescaped)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def chat_template(name: str) -> str:
    """The jinja chat template of family ``name`` (one line, double quotes only)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(LAYOUTS)}")
    f = LAYOUTS[name]
    turn = {
        "system": (f.system_open, f.system_close),
        "user": (f.user_open, f.user_close),
        "assistant": (f.assistant_open, f.assistant_close),
    }
    body = "".join(
        f'{{%- {"if" if i == 0 else "elif"} m["role"] == "{role}" -%}}{{{{ {_lit(o)} + m["content"] + {_lit(c)} }}}}'
        for i, (role, (o, c)) in enumerate(turn.items())
    )
    return (
        f"{{{{- {_lit(PREAMBLE.get(name, ''))} -}}}}"
        f'{{%- if messages[0]["role"] != "system" -%}}{{{{ {_lit(f.system_open + f.system + f.system_close)} }}}}{{%- endif -%}}'
        f"{{%- for m in messages -%}}{body}{{%- endif -%}}{{%- endfor -%}}"
        f"{{%- if add_generation_prompt -%}}{{{{ {_lit(f.assistant_open)} }}}}{{%- endif -%}}"
    )


def hydra_override(name: str) -> str:
    """``custom_chat_template='<template>'``: safe as one hydra command-line override."""
    t = chat_template(name)
    assert "'" not in t and "${" not in t, "the template must stay a plain single-quoted hydra string"
    return f"{OVERRIDE_KEY}='{t}'"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.templates", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=list(LAYOUTS), help="the model family's layout")
    ap.add_argument("--jinja", action="store_true", help="print the jinja template instead of the hydra override")
    args = ap.parse_args(argv)
    print(chat_template(args.name) if args.jinja else hydra_override(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
