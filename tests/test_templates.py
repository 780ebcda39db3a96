"""popo_verl.templates: each family's prompt, rendered by a real HF tokenizer, is the reference's hand-written layout."""

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from popo_verl.templates import LAYOUTS, OVERRIDE_KEY, QWEN_MATH_SYSTEM, chat_template, hydra_override

Q = 'If $x^2 = 4$ and "x > 0", what is x?'
R1_SYSTEM = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning "
    "process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
LLAMA_SYSTEM = "You are a helpful math assistant. Solve the problem step by step and put your final answer in \\boxed{}."
DEEPSEEK_SYSTEM = ("You are a helpful assistant. Please solve the following math problem step by step and put your "
                   "final answer within \\boxed{}.")  # fmt: skip

# the prompt each family's reference layout gives the system text S and the question Q
EXPECTED = {
    "qwen_math": lambda s: f"<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n",
    "r1": lambda s: f"{s}\nUser: {Q}\nAssistant: <think>",
    "llama": lambda s: (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>"
                        f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"),  # fmt: skip
    "deepseek": lambda s: f"{s}\n\nUser: {Q}\n\nAssistant: ",
}
OWN_SYSTEM = {"qwen_math": QWEN_MATH_SYSTEM, "r1": R1_SYSTEM, "llama": LLAMA_SYSTEM, "deepseek": DEEPSEEK_SYSTEM}


@pytest.fixture(scope="module")
def tok():
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                   unk_token="[UNK]")  # fmt: skip


def _render(tok, name, messages):
    tok.chat_template = chat_template(name)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_layout_with_the_datas_system_prompt(tok, name):
    msgs = [{"role": "system", "content": QWEN_MATH_SYSTEM}, {"role": "user", "content": Q}]
    assert _render(tok, name, msgs) == EXPECTED[name](QWEN_MATH_SYSTEM)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_without_a_system_message_the_familys_own_instruction(tok, name):
    assert _render(tok, name, [{"role": "user", "content": Q}]) == EXPECTED[name](OWN_SYSTEM[name])


def test_no_generation_prompt_and_assistant_turns(tok):
    tok.chat_template = chat_template("deepseek")
    msgs = [{"role": "user", "content": Q}, {"role": "assistant", "content": "2"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert text == f"{DEEPSEEK_SYSTEM}\n\nUser: {Q}\n\nAssistant: 2\n\n"


def test_hydra_override_is_one_single_quoted_value():
    for name in LAYOUTS:
        o = hydra_override(name)
        assert o.startswith(f"{OVERRIDE_KEY}='") and o.endswith("'") and "\n" not in o
        assert o[len(OVERRIDE_KEY) + 2 : -1] == chat_template(name)
    with pytest.raises(ValueError, match="unknown template"):
        chat_template("chatml")


def test_cli_prints_the_override_and_the_template():
    run = lambda *a: subprocess.run([sys.executable, "-m", "popo_verl.templates", *a], capture_output=True,  # noqa: E731
                                    text=True, check=True).stdout.strip()  # fmt: skip
    assert run("r1") == hydra_override("r1") and run("r1", "--jinja") == chat_template("r1")
