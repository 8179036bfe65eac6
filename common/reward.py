"""Rule-based rewards for GSM8K-style math: answer extraction, reward terms, named rewards.

A completion is scored by reading its final numeric answer and comparing it to
the gold answer, plus a few shaping terms.  Each term is a small pure function
so it can be tested and logged on its own; a named reward (``REWARD_FUNCTIONS``)
combines them into one scalar and returns every term for logging.

Extraction priority (the first that yields a number wins):

1. the last line starting with ``Answer:`` / ``Final answer:`` (markdown bold allowed),
2. the last ``The answer is ...``,
3. the last ``#### ...`` (the GSM8K solution format),
4. the last ``\\boxed{...}``,
5. the last number anywhere in the text.

Within a marked answer, the answer is the first number after the marker, so
``Answer: 12 apples`` reads 12.  LaTeX ``\\frac{3}{4}`` is read as 3/4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

# One number as written in model output: optional sign (ASCII or unicode minus),
# optional "$", digits with thousands commas or plain digits or ".5", an optional
# "/denominator" for simple fractions, an optional "%".
_NUMBER_RE = re.compile(
    r"""
    (?<![\w.])                          # not the tail of a word or of another number
    (?P<sign>[-+\u2212])?
    \$?
    (?P<num>
        \d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?  # 1,234 or 1,234.5 -- "3, 4" stays two numbers
      | \d+(?:\.\d+)?
      | \.\d+
    )
    (?:/(?P<den>\d+))?
    %?
    """,
    re.VERBOSE,
)

# "Answer:" at the start of a line, after optional spaces, bullets or markdown
# ("**Answer:** 12", "**Final Answer**: 12"); [ \t] so a match never spans lines.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t*_#>-]*(?:final[ \t]+)?answer[ \t*_]*:", re.IGNORECASE | re.MULTILINE
)
_ANSWER_IS_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b", re.IGNORECASE)
_HASHES_RE = re.compile(r"####")
_BOXED_RE = re.compile(r"\\boxed\s*\{(?P<content>.*?)\}")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")

_NEGATIVE_SIGNS = {"-", "\u2212"}


def parse_number(text: str) -> float | None:
    """The value of ``text`` when it is exactly one number (surrounding spaces allowed).

    Strips thousands commas, "$" and "%", reads "3/4" as 0.75 and a leading
    "-", "+" or unicode minus.  None for anything else, including a zero
    denominator, so data validation can use it to check gold answers.
    """
    match = _NUMBER_RE.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None:
        denominator = float(match["den"])
        if denominator == 0:
            return None
        value /= denominator
    return -value if match["sign"] in _NEGATIVE_SIGNS else value


def _numbers(text: str) -> Iterator[float]:
    """The values of the numbers in ``text``, in order."""
    for match in _NUMBER_RE.finditer(text):
        value = parse_number(match.group())
        if value is not None:
            yield value


def _first_number(text: str) -> float | None:
    return next(_numbers(text), None)


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start:] if end == -1 else text[start:end]


def _answer_lines(text: str) -> list[str]:
    """What follows the marker on each ``Answer:`` line, in order."""
    return [_rest_of_line(text, m.end()) for m in _ANSWER_LINE_RE.finditer(text)]


def _last_marked_number(text: str, marker: re.Pattern[str]) -> float | None:
    """The first number after the last occurrence of ``marker`` that has one on its line."""
    for match in reversed(list(marker.finditer(text))):
        value = _first_number(_rest_of_line(text, match.end()))
        if value is not None:
            return value
    return None


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a completion, or None when it has no number.

    See the module docstring for the priority of the answer markers.  A marker
    with no number after it on its line is skipped, so "Answer: unsure" falls
    through to the next rule.
    """
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)  # \frac{3}{4} -> 3/4
    for rest in reversed(_answer_lines(text)):
        value = _first_number(rest)
        if value is not None:
            return value
    for marker in (_ANSWER_IS_RE, _HASHES_RE):
        value = _last_marked_number(text, marker)
        if value is not None:
            return value
    for box in reversed(list(_BOXED_RE.finditer(text))):
        value = _first_number(box["content"])
        if value is not None:
            return value
    return next(reversed(list(_numbers(text))), None)


def answers_match(pred: float | None, gold: str | float, rel_tol: float = 1e-6,
                  abs_tol: float = 1e-6) -> bool:
    """Whether a predicted number equals the gold answer within tolerance.

    ``gold`` may be a number or a string such as "1,234", "75" or "0.5".  A
    None prediction never matches.  A gold string that is not a number raises
    ValueError: silently scoring every sample 0 would hide a data bug.
    """
    if pred is None:
        return False
    gold_value = parse_number(gold) if isinstance(gold, str) else float(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return math.isclose(pred, gold_value, rel_tol=rel_tol, abs_tol=abs_tol)


# --- reward terms -------------------------------------------------------------


def correctness_reward(text: str, gold: str | float) -> float:
    """1.0 when the extracted answer equals the gold answer, else 0.0.

    The signal the training is for; every other term only shapes how the
    answer is written.
    """
    return 1.0 if answers_match(extract_answer(text), gold) else 0.0


def format_reward(text: str) -> float:
    """1.0 when there is exactly one ``Answer: <number>`` line and it is the last non-empty line.

    Exists so the model learns one unambiguous place for its answer, which keeps
    extraction reliable and gives a small gradient even while answers are wrong.
    """
    answer_lines = _answer_lines(text)
    if len(answer_lines) != 1 or _first_number(answer_lines[0]) is None:
        return 0.0
    non_empty_lines = [line for line in text.splitlines() if line.strip()]
    return 1.0 if _ANSWER_LINE_RE.match(non_empty_lines[-1]) else 0.0


def repetition_penalty(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line, in [0, 1).

    Exists because the model was seen hacking the reward by repeating the same
    line ("Answer: 5" many times); 0 when no line repeats.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def multiple_answers_penalty(text: str) -> float:
    """0 with at most one ``Answer:`` line, then 0.5 per extra line, capped at 1.

    Exists so that answer spam with different numbers ("Answer: 3\\nAnswer: 4")
    is not a way to hedge: correctness reads only the last line, and this term
    makes the spam cost more than the format reward it could gain.
    """
    extra_answers = len(_answer_lines(text)) - 1
    return min(1.0, max(0, extra_answers) / 2)


def truncation_penalty(truncated: bool) -> float:
    """1.0 when generation was cut off before EOS, else 0.0.

    Exists so the model is not paid for rambling up to the length limit, and
    because a cut-off answer line may be incomplete ("Answer: 12" of "120").
    """
    return 1.0 if truncated else 0.0


# --- named rewards ------------------------------------------------------------

# Weights of the "math" reward.  Correctness dominates; the format bonus is small
# so it can rank wrong answers but never outweigh being right; each penalty is
# large enough that a hacked output (repeated lines, several answer lines, cut
# off) scores below a clean correct one (1 + FORMAT_WEIGHT) even when it is right.
FORMAT_WEIGHT = 0.2
REPETITION_WEIGHT = 0.5
MULTIPLE_ANSWERS_WEIGHT = 0.5
TRUNCATION_WEIGHT = 0.5

DEFAULT_REWARD_NAME = "math"  # the reward the trainers use unless told otherwise


@dataclass
class RewardResult:
    """One completion's reward: the scalar to train on, plus every term for logging."""

    total: float
    correct: bool
    format_ok: bool
    terms: dict[str, float] = field(default_factory=dict)


def _score(text: str, gold: str | float, truncated: bool,
           weights: dict[str, float]) -> RewardResult:
    """Weighted sum of the terms; all terms are logged, weighted or not."""
    terms = {
        "correctness": correctness_reward(text, gold),
        "format": format_reward(text),
        "repetition": repetition_penalty(text),
        "multiple_answers": multiple_answers_penalty(text),
        "truncation": truncation_penalty(truncated),
    }
    total = sum(weight * terms[name] for name, weight in weights.items())
    return RewardResult(total=total, correct=terms["correctness"] == 1.0,
                        format_ok=terms["format"] == 1.0, terms=terms)


def correctness_only_reward(text: str, gold: str, truncated: bool = False) -> RewardResult:
    """Correctness alone: the plain verifiable reward, a baseline without shaping."""
    return _score(text, gold, truncated, {"correctness": 1.0})


def math_reward(text: str, gold: str, truncated: bool = False) -> RewardResult:
    """Correctness plus a format bonus, minus the anti-hacking penalties (see the weights)."""
    return _score(text, gold, truncated, {
        "correctness": 1.0,
        "format": FORMAT_WEIGHT,
        "repetition": -REPETITION_WEIGHT,
        "multiple_answers": -MULTIPLE_ANSWERS_WEIGHT,
        "truncation": -TRUNCATION_WEIGHT,
    })


REWARD_FUNCTIONS: dict[str, Callable[..., RewardResult]] = {
    "correctness": correctness_only_reward,
    "math": math_reward,
}


def get_reward_fn(name: str) -> Callable[..., RewardResult]:
    """The reward function registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        valid = ", ".join(sorted(REWARD_FUNCTIONS))
        raise ValueError(f"unknown reward {name!r}; valid names: {valid}") from None


def score_batch(texts: Sequence[str], golds: Sequence[str], truncated: Sequence[bool] | None = None,
                reward_name: str = DEFAULT_REWARD_NAME) -> list[RewardResult]:
    """Score completions against their gold answers; ``truncated`` None means none was cut off."""
    if truncated is None:
        truncated = [False] * len(texts)
    if not len(texts) == len(golds) == len(truncated):
        raise ValueError(f"lengths differ: {len(texts)} texts, {len(golds)} golds, "
                         f"{len(truncated)} truncated flags")
    reward_fn = get_reward_fn(reward_name)
    return [reward_fn(text, gold, cut) for text, gold, cut in zip(texts, golds, truncated)]
