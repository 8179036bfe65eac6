"""The one prompt format every trainer and every eval uses.

A model is trained and evaluated on exactly the same text, so the prompt is
built in one place: the tokenizer's chat template when it has one (Gemma 2
Instruct and the built-in tiny model do), else a plain question/solution prompt.
"""

from __future__ import annotations

INSTRUCTION = "Solve step by step. End with the line 'Answer: <number>'."


def user_message(question: str) -> str:
    return f"{INSTRUCTION}\n\n{question.strip()}"


def format_prompt(tokenizer, question: str) -> str:
    """The prompt text for ``question``, ending where the model's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(question)}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return f"{user_message(question)}\n\nSolution:\n"


def encode_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids of each formatted prompt, unpadded.

    A chat template writes its own <bos>, so the tokenizer must not add another
    (a doubled <bos> quietly degrades Gemma); a plain prompt gets the
    tokenizer's usual special tokens.
    """
    texts = [format_prompt(tokenizer, q) for q in questions]
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]
