"""The one prompt format: chat template when there is one, a single <bos>, plain fallback."""

from common.model import load_tokenizer
from common.prompts import INSTRUCTION, encode_prompts, format_prompt
from tests.conftest import TINY_MODEL_DIR

QUESTION = "Mia has 3 apples. She buys 4 more. How many apples does Mia have?"


def test_chat_template_prompt():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    text = format_prompt(tokenizer, QUESTION)
    assert text == f"<bos><start_of_turn>user\n{INSTRUCTION}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    assert "Answer: <number>" in INSTRUCTION and "step by step" in INSTRUCTION


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
