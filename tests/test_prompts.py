"""The one prompt builder: chat template when there is one, a single <bos>, plain fallback; the
instruction, system prompt and chat template settings; TRL prompts used as given."""

import hashlib
import json

import pytest

from common.data import load_pairs, load_problems, write_jsonl
from common.model import load_tokenizer
from common.prompts import INSTRUCTION, PromptFormat, configure_prompts, encode_prompts, format_prompt
from dpo.pairs import build_pairs
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR

QUESTION = "Mia has 3 apples. She buys 4 more. How many apples does Mia have?"
# Token ids of the default prompts as the prompt code made them before INSTRUCTION, SYSTEM_PROMPT and
# CHAT_TEMPLATE existed (commit 16e5dd6), recorded then: the built-in tiny model was trained on exactly
# these prompts, and the demo's numbers depend on them staying byte for byte the same.
TWO_PLUS_THREE_IDS = [2, 4, 90, 339, 347, 351, 204, 60, 300, 89, 226, 78, 262, 23, 376, 24, 36, 5, 204, 4, 301, 324, 204]
TWO_PLUS_THREE_RAW_IDS = [56, 335, 347, 351, 204, 60, 300, 89, 226, 78, 262, 23, 376, 24, 36, 204, 310, 299, 416, 78,
                          84, 83, 31, 204]
# sha256 of json.dumps(the prompt ids of every question of data/synth_test.jsonl), the demo's eval set.
SYNTH_TEST_IDS_SHA256 = "9e58efcb16ac6ec25b92748a354369ee43cb9f2ba3d4f2b21d6f0334d408c2e6"
HAIKU = "Write a haiku about autumn."


def test_chat_template_prompt():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    text = format_prompt(tokenizer, QUESTION)
    assert text == f"<bos><start_of_turn>user\n{INSTRUCTION}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    assert format_prompt(tokenizer, {"question": QUESTION, "gold_answer": "7"}) == text
    assert "Answer: <number>" in INSTRUCTION and "step by step" in INSTRUCTION


def test_default_prompt_ids_are_unchanged():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    assert encode_prompts(tokenizer, ["What is 2 + 3?"]) == [TWO_PLUS_THREE_IDS]
    assert encode_prompts(tokenizer, [{"question": "What is 2 + 3?"}], PromptFormat()) == [TWO_PLUS_THREE_IDS]
    ids = encode_prompts(tokenizer, load_problems(REPO_ROOT / "data" / "synth_test.jsonl"))
    assert hashlib.sha256(json.dumps(ids).encode()).hexdigest() == SYNTH_TEST_IDS_SHA256
    configure_prompts(tokenizer, chat_template="none")
    assert encode_prompts(tokenizer, ["What is 2 + 3?"]) == [TWO_PLUS_THREE_RAW_IDS]


def test_encoded_prompt_has_exactly_one_bos():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    ids = encode_prompts(tokenizer, [QUESTION, "Short?"])
    for row in ids:
        assert row[0] == tokenizer.bos_token_id
        assert row.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(row).endswith("<start_of_turn>model\n")


def test_plain_prompt_without_chat_template():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    tokenizer.chat_template = None
    text = format_prompt(tokenizer, QUESTION)
    assert text == f"{INSTRUCTION}\n\n{QUESTION}\n\nSolution:\n"
    assert "<start_of_turn>" not in tokenizer.decode(encode_prompts(tokenizer, [QUESTION])[0])


def test_instruction_and_system_prompt():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    assert format_prompt(tokenizer, QUESTION, PromptFormat(instruction="")) == (
        f"<bos><start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    assert format_prompt(tokenizer, QUESTION, PromptFormat("Think.", "Be brief.")) == (
        f"<bos><start_of_turn>system\nBe brief.<end_of_turn>\n"
        f"<start_of_turn>user\nThink.\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    prompt_format = configure_prompts(tokenizer, "Think.", "Be brief.", chat_template="none")
    assert prompt_format == PromptFormat("Think.", "Be brief.") and tokenizer.chat_template is None
    assert format_prompt(tokenizer, QUESTION, prompt_format) == f"Be brief.\n\nThink.\n\n{QUESTION}\n\nSolution:\n"


def test_a_trl_standard_prompt_is_used_as_given():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    prompt_format = PromptFormat(system_prompt="Be brief.")
    assert format_prompt(tokenizer, {"prompt": HAIKU, "question": HAIKU}, prompt_format) == HAIKU
    assert encode_prompts(tokenizer, [{"prompt": HAIKU}], prompt_format) == [tokenizer(HAIKU)["input_ids"]]


def test_a_trl_conversation_goes_through_the_template_as_given():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    row = {"prompt": [{"role": "user", "content": HAIKU}]}
    assert format_prompt(tokenizer, row) == f"<bos><start_of_turn>user\n{HAIKU}<end_of_turn>\n<start_of_turn>model\n"
    # SYSTEM_PROMPT goes before a conversation without a system message of its own, never beside one.
    assert format_prompt(tokenizer, row, PromptFormat(system_prompt="Be brief.")).startswith(
        "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\n")
    own = {"prompt": [{"role": "system", "content": "Rhyme."}, {"role": "user", "content": HAIKU}]}
    assert format_prompt(tokenizer, own, PromptFormat(system_prompt="Be brief.")).startswith(
        "<bos><start_of_turn>system\nRhyme.<end_of_turn>\n<start_of_turn>user\n")
    configure_prompts(tokenizer, chat_template="none")
    with pytest.raises(ValueError, match="a conversational prompt needs a chat template"):
        format_prompt(tokenizer, row)


def test_chat_template_from_a_jinja_file(tmp_path):
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    configure_prompts(tokenizer, chat_template="auto")
    assert "<start_of_turn>" in tokenizer.chat_template
    configure_prompts(tokenizer, chat_template=template)
    assert format_prompt(tokenizer, "What is 2 + 3?", PromptFormat("Add.")) == "[user] Add.\n\nWhat is 2 + 3?\n[assistant] "
    with pytest.raises(FileNotFoundError, match="CHAT_TEMPLATE 'missing.jinja': no such file"):
        configure_prompts(tokenizer, chat_template="missing.jinja")


def test_a_template_that_refuses_a_system_message_says_what_to_do(tmp_path):
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    template = tmp_path / "gemma-like.jinja"
    # As Gemma 2 Instruct's own template does.
    template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    prompt_format = configure_prompts(tokenizer, system_prompt="Be brief.", chat_template=template)
    with pytest.raises(ValueError, match="System role not supported.*put SYSTEM_PROMPT's text in INSTRUCTION"):
        format_prompt(tokenizer, QUESTION, prompt_format)


def test_eval_training_and_pairs_prompts_agree(tmp_path):
    """A question reaches the model as the same ids from a problems file (eval, GRPO, PPO) and from the
    pairs make_dpo_pairs.py writes for it (DPO)."""
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    prompt_format = PromptFormat(system_prompt="Be brief.")
    problems = load_problems(REPO_ROOT / "data" / "synth_test.jsonl", limit=2)
    pairs, _ = build_pairs(problems, [["Answer: 1", "Answer: 2"]] * 2, [[True, False]] * 2, [[1.0, 0.0]] * 2)
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert (encode_prompts(tokenizer, load_pairs(tmp_path / "pairs.jsonl"), prompt_format)
            == encode_prompts(tokenizer, problems, prompt_format))
