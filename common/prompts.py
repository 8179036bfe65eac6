"""The one prompt builder: every trainer, every eval and the pair builder make their prompts here.

A model is trained and evaluated on exactly the same text, so a prompt is built in one place,
from a dataset row (common/data.py) and a PromptFormat (INSTRUCTION, SYSTEM_PROMPT):

    the row                           the messages
    {"question": q}   (bare)          [system] + user "<INSTRUCTION>\\n\\n<q>"  (just q when INSTRUCTION is "")
    {"prompt": [...]} (TRL, chat)     [system] + the messages as given   (system only if they have none)
    {"prompt": "..."} (TRL, text)     none: the text is the prompt, as given, like TRL's standard format

The messages go through the tokenizer's chat template (Gemma 2 Instruct and the built-in tiny
model have one) with the generation prompt.  Without a template (CHAT_TEMPLATE=none, or a base
model) a bare question becomes "[<system>\\n\\n]<user message>\\n\\nSolution:\\n", and a conversation
is refused: there is no agreed way to flatten one.  CHAT_TEMPLATE is set on the tokenizer itself
(``configure_prompts``), where transformers keeps it: apply_chat_template, save_pretrained and the
answer-end token (common.model.answer_end_token_id) then all see the same template.

INSTRUCTION may also name a preset (``INSTRUCTION_PRESETS``): ``math`` (the default text) or ``think``,
the visible-reasoning instruction: reasoning inside <think>...</think>, then the answer line
(docs/reasoning.md; the "think" reward of common/reward.py pays for that shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError

from common.errors import UserError

class ChatTemplateNotFoundError(UserError, FileNotFoundError):
    """A CHAT_TEMPLATE file that does not exist."""


INSTRUCTION = "Solve step by step. End with the line 'Answer: <number>'."
THINK_INSTRUCTION = ("Think step by step between <think> and </think>. "
                     "After </think>, end with the line 'Answer: <number>'.")

# The instructions a script's INSTRUCTION can name instead of giving the text (--INSTRUCTION=think).
INSTRUCTION_PRESETS = {"math": INSTRUCTION, "think": THINK_INSTRUCTION}


@dataclass(frozen=True)
class PromptFormat:
    """What is added around a bare question: the instruction before it ("" for none) and a
    system message ("" for none)."""

    instruction: str = INSTRUCTION
    system_prompt: str = ""


DEFAULT_FORMAT = PromptFormat()


def configure_prompts(tokenizer, instruction: str = INSTRUCTION, system_prompt: str = "",
                      chat_template: str | Path | None = "auto") -> PromptFormat:
    """The PromptFormat of a script's INSTRUCTION and SYSTEM_PROMPT, after setting its CHAT_TEMPLATE
    on ``tokenizer``: "auto" keeps the tokenizer's own, "none" (or None) removes it (raw text
    prompts), anything else is the path of a Jinja template file that replaces it.  An instruction
    that names a preset (``INSTRUCTION_PRESETS``: math, think) stands for that preset's text."""
    if chat_template is None or str(chat_template) == "none":
        tokenizer.chat_template = None
    elif str(chat_template) != "auto":
        path = Path(chat_template)
        if not path.is_file():
            raise ChatTemplateNotFoundError(f"CHAT_TEMPLATE {str(chat_template)!r}: no such file (give auto for the "
                                            f"tokenizer's own template, none for raw text, or a Jinja file)")
        tokenizer.chat_template = path.read_text(encoding="utf-8-sig")  # with or without a byte-order mark
    return PromptFormat(INSTRUCTION_PRESETS.get(instruction, instruction), system_prompt)


def user_message(question: str, instruction: str = INSTRUCTION) -> str:
    """The user turn of a bare question: the instruction, a blank line, the question."""
    return f"{instruction}\n\n{question.strip()}" if instruction else question.strip()


def prompt_messages(row: dict | str, prompt_format: PromptFormat = DEFAULT_FORMAT) -> list[dict] | None:
    """The chat messages of a row (a str is a bare question), or None for a TRL standard prompt,
    which is text to use as it is."""
    system = [{"role": "system", "content": prompt_format.system_prompt}] if prompt_format.system_prompt else []
    if isinstance(row, str):
        return system + [{"role": "user", "content": user_message(row, prompt_format.instruction)}]
    if "prompt" not in row:
        return system + [{"role": "user", "content": user_message(row["question"], prompt_format.instruction)}]
    if isinstance(row["prompt"], str):
        return None
    messages = list(row["prompt"])
    has_system = any(message["role"] == "system" for message in messages)
    return messages if has_system else system + messages


def _prompt_text(tokenizer, row: dict | str, prompt_format: PromptFormat) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer adds its special tokens to it).  A chat template writes
    its own <bos>, so the tokenizer must not add another (a doubled <bos> quietly degrades Gemma);
    raw text gets the tokenizer's usual special tokens."""
    messages = prompt_messages(row, prompt_format)
    if messages is None:
        return row["prompt"], True
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise ValueError(f"the chat template refused the prompt ({exc}); if it does not take a system "
                             f"message, put SYSTEM_PROMPT's text in INSTRUCTION instead") from None
        return text, False
    if isinstance(row, dict) and "prompt" in row:
        raise ValueError("a conversational prompt needs a chat template, and the tokenizer has none "
                         "(CHAT_TEMPLATE=none, or a model without one): give CHAT_TEMPLATE=path/to/template.jinja")
    system = f"{prompt_format.system_prompt}\n\n" if prompt_format.system_prompt else ""
    return f"{system}{messages[-1]['content']}\n\nSolution:\n", True


def format_prompt(tokenizer, row: dict | str, prompt_format: PromptFormat = DEFAULT_FORMAT) -> str:
    """The prompt text of a row (or of a bare question), ending where the model's answer begins."""
    return _prompt_text(tokenizer, row, prompt_format)[0]


def encode_prompts(tokenizer, rows: list[dict | str], prompt_format: PromptFormat | None = None) -> list[list[int]]:
    """Token ids of each row's prompt (a str is a bare question), unpadded."""
    prompt_format = prompt_format or DEFAULT_FORMAT
    ids = []
    for row in rows:
        text, add_special_tokens = _prompt_text(tokenizer, row, prompt_format)
        ids.append(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids
