"""What changes from one architecture to the next: the token that ends an answer (from the chat
template), the output head token_logprobs reproduces, the layers all-linear selects, and the micro
models of every architecture the tests cover (tests/conftest.py: MICRO_ARCHITECTURES)."""

import pytest
import torch
from transformers import GenerationConfig

from common.logprobs import token_logprobs
from common.lora import all_linear_targets, apply_lora
from common.model import answer_end_token_id, load_model_and_tokenizer, load_tokenizer, stop_token_ids
from tests.conftest import MICRO_ARCHITECTURES, REPO_ROOT, TINY_MODEL_DIR, micro_arch_model

QWEN_TEMPLATE = (REPO_ROOT / "tests" / "fixtures" / "qwen2.5_chat_template.jinja").read_text()
# Phi-3 Mini Instruct's template, and a Mistral-style one that ends the assistant turn with EOS itself.
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")


def tokenizer_with(template: str | None, special_tokens: list[str] = ()):
    """The tiny model's tokenizer with extra special tokens and another chat template."""
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    tokenizer.add_tokens(list(special_tokens), special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


class GenerationOnly:
    """What stop_token_ids reads of a model: its generation_config."""

    def __init__(self, eos_token_id):
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id)


def test_qwen_answers_end_with_im_end_whatever_the_generation_config_lists():
    tokenizer = tokenizer_with(QWEN_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    instruct = GenerationOnly([im_end, endoftext])  # Qwen2.5-Instruct's generation_config.json
    assert answer_end_token_id(tokenizer, instruct) == im_end  # not the last of the list, <|endoftext|>
    assert {im_end, endoftext} <= set(stop_token_ids(instruct, tokenizer))  # sampling stops at either
    base = GenerationOnly(endoftext)  # Qwen2.5 base: EOS alone, yet its template closes turns with <|im_end|>
    assert im_end in stop_token_ids(base, tokenizer)


@pytest.mark.parametrize("template, special_tokens, expected", [
    (PHI3_TEMPLATE, ["<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
    (MISTRAL_TEMPLATE, [], "<eos>"),
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", [], "<eos>"),  # closes with no special token
    (None, [], "<eos>"),  # raw text prompts: the answer ends at EOS
])
def test_answer_end_token_of_other_templates(template, special_tokens, expected):
    tokenizer = tokenizer_with(template, special_tokens)
    assert answer_end_token_id(tokenizer) == tokenizer.convert_tokens_to_ids(expected)


def test_the_tiny_models_answer_end_is_end_of_turn():
    model, tokenizer, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert answer_end_token_id(tokenizer, model) == end_of_turn
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end_of_turn]


@pytest.mark.parametrize("arch", MICRO_ARCHITECTURES)
def test_token_logprobs_match_the_models_own_logits(arch):
    model = micro_arch_model(arch)
    input_ids = torch.tensor([[0, 0, 5, 9, 12, 7, 33], [3, 8, 11, 4, 6, 10, 50]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        expected = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        got = token_logprobs(model, input_ids, attention_mask)
    mask = attention_mask[:, 1:].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MICRO_ARCHITECTURES)
def test_all_linear_wraps_what_peft_wraps(arch):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(micro_arch_model(arch), peft.LoraConfig(r=2, target_modules="all-linear"))
    peft_wrapped = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
                    if isinstance(module, peft.tuners.lora.LoraLayer)}
    model = micro_arch_model(arch)
    assert set(apply_lora(model, r=2, alpha=4, target_modules=["all-linear"])) == peft_wrapped
    assert "lm_head" not in all_linear_targets(model)


def test_micro_model_directories_load_like_real_models(micro_arch_dir):
    for arch in ("phi3", "gemma3"):
        model, tokenizer, _ = load_model_and_tokenizer(micro_arch_dir(arch), "cpu")
        assert model.config.model_type == arch
        assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id,
                                                    tokenizer.convert_tokens_to_ids("<end_of_turn>")]
