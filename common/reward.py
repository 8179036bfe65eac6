"""Rule-based rewards for GSM8K-style math: answer extraction, reward terms, named rewards.

A completion is scored by reading its final numeric answer and comparing it to
the gold answer, plus a few shaping terms.  Each term is a small pure function
so it can be tested and logged on its own; a named reward (``REWARD_FUNCTIONS``)
combines them into one scalar and returns every term for logging.  The "think" reward reads
a completion shaped ``<think>reasoning</think>`` + the answer line (the INSTRUCTION=think preset of
common/prompts.py; docs/reasoning.md).

Extraction priority (the first that yields a number wins):

1. the last ``#### ...`` (the GSM8K solution format: its final line by definition, so it wins
   over anything written before it, e.g. "The final answer is 15 gallons ... = 120 pints\\n#### 120"),
2. the last line starting with ``Answer:`` / ``Final answer:`` (markdown bold allowed),
3. the last ``The answer is ...``,
4. the last ``\\boxed{...}``,
5. the last number anywhere in the text.

Within a marked answer, the answer is the first number after the marker, so
``Answer: 12 apples`` reads 12.  LaTeX ``\\frac{3}{4}`` is read as 3/4, and scientific
notation ``1.2e3`` as 1200.

That is the *lenient* reading (``extract_answer``): it finds an answer wherever the model put
one.  The *strict* reading (``strict_answer``) takes only the answer given in the format the
prompt asks for (common.prompts.INSTRUCTION: "End with the line 'Answer: <number>'"): the
number on the completion's only ``Answer:`` line, when that line is its last non-empty line;
anything else reads None.  Strict accuracy beside lenient separates learning the maths from
learning the format; ``format_reward`` pays for exactly the strict format.

Rewards you bring (``load_reward``): a spec names one or more reward functions, each a
built-in name (``REWARD_FUNCTIONS``) or a function of your own, ``path/to/file.py:function``
(or ``package.module:function``), with weights.  Your function is called like a TRL reward
function, one completion at a time: ``function(completion=text, **row)`` with every field of
the completion's dataset row as a keyword argument (it may take only the ones it names, or
``**kwargs``), and returns a number, a bool (the reward 1/0 and whether it is correct), a
dict ``{"reward": float, "correct": bool}``, or a ``RewardResult``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

# One number as written in model output: optional sign (ASCII or unicode minus),
# optional "$", digits with thousands commas or plain digits (with an optional
# exponent, 1.2e3) or ".5", an optional "/denominator" for simple fractions, an
# optional "%".
_NUMBER_RE = re.compile(
    r"""
    (?<![\w.])                          # not the tail of a word or of another number
    (?P<sign>[-+\u2212])?
    \$?
    (?P<num>
        \d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?  # 1,234 or 1,234.5 -- "3, 4" stays two numbers
      | \d+(?:\.\d+)?(?:[eE][-+]?\d+)?      # 12, 3.5, 1.2e3
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

    Strips thousands commas, "$" and "%", reads "3/4" as 0.75, "1.2e3" as 1200
    and a leading "-", "+" or unicode minus.  None for anything else, including
    a zero denominator or an exponent too large for a float, so data validation
    can use it to check gold answers.
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
    if not math.isfinite(value):
        return None
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
    value = _last_marked_number(text, _HASHES_RE)
    if value is not None:
        return value
    for rest in reversed(_answer_lines(text)):
        value = _first_number(rest)
        if value is not None:
            return value
    value = _last_marked_number(text, _ANSWER_IS_RE)
    if value is not None:
        return value
    for box in reversed(list(_BOXED_RE.finditer(text))):
        value = _first_number(box["content"])
        if value is not None:
            return value
    return next(reversed(list(_numbers(text))), None)


def strict_answer(text: str) -> float | None:
    """The answer in the requested format, or None: the first number on the completion's only
    ``Answer:`` line, when that line is its last non-empty line (the module docstring).  No fallback:
    two answer lines, an answer line followed by more text, or a bare trailing number read None."""
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)  # read numbers as extract_answer reads them
    answer_lines = _answer_lines(text)
    if len(answer_lines) != 1:
        return None
    non_empty_lines = [line for line in text.splitlines() if line.strip()]
    if not _ANSWER_LINE_RE.match(non_empty_lines[-1]):
        return None
    return _first_number(answer_lines[0])


def strict_correct(text: str, gold: str | float | None) -> bool | None:
    """Whether the strict answer (strict_answer) equals the gold answer; None when the gold is not a
    number or missing (a reward of your own judging text answers), where Answer: <number> does not apply."""
    if gold is None or (isinstance(gold, str) and parse_number(gold) is None):
        return None
    return answers_match(strict_answer(text), gold)


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
    return 0.0 if strict_answer(text) is None else 1.0


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


# --- visible reasoning: one <think> block, then the answer ----------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def think_answer_part(text: str) -> str | None:
    """What follows ``</think>`` when the completion has the visible-reasoning shape, else None.

    The shape: the completion opens with ``<think>`` (white space before it allowed), each tag
    appears exactly once, ``</think>`` after ``<think>``, and the reasoning between them is not
    only white space.  Reading the answer from this part alone is what keeps an answer written
    inside the reasoning, several blocks or an empty block from being paid.
    """
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1 or not text.lstrip().startswith(THINK_OPEN):
        return None
    reasoning, closed, answer_part = text.lstrip()[len(THINK_OPEN):].partition(THINK_CLOSE)
    return answer_part if closed and reasoning.strip() else None


def think_correctness_reward(text: str, gold: str | float) -> float:
    """1.0 when the answer read after ``</think>`` equals the gold answer, else 0.0 (also when
    the completion does not have the shape, so there is no "after")."""
    answer_part = think_answer_part(text)
    return correctness_reward(answer_part, gold) if answer_part is not None else 0.0


def think_format_reward(text: str) -> float:
    """1.0 when the completion has the shape and, after ``</think>``, exactly one ``Answer: <number>``
    line that is the last non-empty line (``format_reward`` of that part): nothing after the answer."""
    answer_part = think_answer_part(text)
    return format_reward(answer_part) if answer_part is not None else 0.0


def think_reward(text: str, gold: str, truncated: bool = False) -> RewardResult:
    """The "math" reward for visible reasoning: correctness read after ``</think>``, the format bonus
    for the whole shape, the same penalties (on the whole completion) and the same weights."""
    terms = {
        "correctness": think_correctness_reward(text, gold),
        "format": think_format_reward(text),
        "repetition": repetition_penalty(text),
        "multiple_answers": multiple_answers_penalty(text),
        "truncation": truncation_penalty(truncated),
    }
    total = (terms["correctness"] + FORMAT_WEIGHT * terms["format"] - REPETITION_WEIGHT * terms["repetition"]
             - MULTIPLE_ANSWERS_WEIGHT * terms["multiple_answers"] - TRUNCATION_WEIGHT * terms["truncation"])
    return RewardResult(total=total, correct=terms["correctness"] == 1.0, format_ok=terms["format"] == 1.0,
                        terms=terms)


REWARD_FUNCTIONS: dict[str, Callable[..., RewardResult]] = {
    "correctness": correctness_only_reward,
    "math": math_reward,
    "think": think_reward,
}


def get_reward_fn(name: str) -> Callable[..., RewardResult]:
    """The reward function registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        valid = ", ".join(sorted(REWARD_FUNCTIONS))
        raise ValueError(f"unknown reward {name!r}; valid names: {valid}") from None


# --- rewards you bring ----------------------------------------------------------


class RewardSpecError(UserError, ValueError):
    """A REWARD spec that cannot be loaded, or a reward function that returned something unusable."""


@dataclass(frozen=True)
class _Component:
    label: str                 # how the spec named it: "math", "my.py:brevity"
    function: Callable
    weight: float
    builtin: bool              # a REWARD_FUNCTIONS entry: called as (text, gold, truncated)
    takes_all_fields: bool     # a custom function with **kwargs: gets every field of the row
    parameters: frozenset[str]  # a custom function's named parameters (the row fields it gets)
    required: frozenset[str]   # the named parameters without a default


def _import_function(part: str, spec: str) -> Callable:
    """The function ``file.py:function`` (a path, relative to the working directory) or
    ``package.module:function`` (importable) names."""
    source, _, name = part.rpartition(":")
    if not source or not name:
        valid = ", ".join(sorted(REWARD_FUNCTIONS))
        raise RewardSpecError(f"REWARD {spec!r}: {part!r} is neither a built-in reward ({valid}) nor "
                              f"'path/to/file.py:function' / 'module:function'")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise RewardSpecError(f"REWARD {spec!r}: reward file {path} not found "
                                  f"(a path relative to {Path.cwd()})")
        # Registered under a name unique to the file: a dataclass defined in it looks its module up there.
        module_name = f"reward_file:{path.resolve()}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as exc:
            raise RewardSpecError(f"REWARD {spec!r}: cannot import module {source!r} ({exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = "not callable" if function is not None else "not defined"
        raise RewardSpecError(f"REWARD {spec!r}: {name!r} is {found} in {source}")
    return function


def _custom_component(label: str, function: Callable, weight: float, spec: str) -> _Component:
    parameters = inspect.signature(function).parameters.values()
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    named = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)]
    names = frozenset(p.name for p in named)
    if "completion" not in names and not takes_all:
        raise RewardSpecError(f"REWARD {spec!r}: {label} must take the keyword argument completion= "
                              f"(the generated text), as in def {function.__name__}(completion, **row)")
    required = frozenset(p.name for p in named if p.default is inspect.Parameter.empty) - {"completion"}
    return _Component(label, function, weight, builtin=False, takes_all_fields=takes_all,
                      parameters=names - {"completion"}, required=required)


def _parse_weights(weights: Sequence[float] | str, count: int, spec: str) -> list[float]:
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")] if weights.strip() else []
        except ValueError:
            raise RewardSpecError(f"REWARD_WEIGHTS {weights!r}: not a comma-separated list of numbers") from None
    weights = list(weights) or [1.0] * count
    if len(weights) != count:
        raise RewardSpecError(f"REWARD_WEIGHTS has {len(weights)} weights for the {count} rewards of "
                              f"{spec!r}: give one per reward, in order")
    if not all(math.isfinite(w) for w in weights):
        raise RewardSpecError(f"REWARD_WEIGHTS must be finite numbers, got {weights}")
    return [float(w) for w in weights]


def _as_result(value, label: str) -> RewardResult | tuple[float, bool | None]:
    """What a custom function returned, as (reward, correct or None when it does not say)."""
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, bool):
        reward, correct = float(value), value
    elif isinstance(value, (int, float)):
        reward, correct = float(value), None
    elif isinstance(value, dict) and "reward" in value:
        reward, correct = value["reward"], value.get("correct")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or (
                correct is not None and not isinstance(correct, bool)):
            raise RewardSpecError(f"reward {label} returned {value!r}: 'reward' must be a number and "
                                  f"'correct' a bool")
        reward = float(reward)
    else:
        raise RewardSpecError(f"reward {label} returned {value!r}: return a number, a bool, a dict "
                              f"{{'reward': float, 'correct': bool}} or a RewardResult")
    if not math.isfinite(reward):
        # One NaN reward would turn every advantage of its group, and then the weights, into NaN.
        raise RewardSpecError(f"reward {label} returned {reward}: rewards must be finite")
    return reward, correct


def _numeric_correct(text: str, gold) -> bool:
    """Whether the extracted answer matches a numeric gold; False without one (no gold, or text)."""
    if gold is None or (isinstance(gold, str) and parse_number(gold) is None):
        return False
    return answers_match(extract_answer(text), gold)


class Reward:
    """The reward a REWARD spec names, called as ``reward(text, row, truncated)`` -> RewardResult.

    ``total`` is the weighted sum of the components' rewards.  ``correct`` is that of the first
    component that reports one (the built-ins always do; a custom function when it returns a bool,
    a dict with "correct" or a RewardResult), else whether the extracted number matches a numeric
    gold answer of the row.  ``format_ok`` is the first built-in's, else False.  ``terms`` holds
    each component's reward under its label and, for several components, their own terms as
    "<label>/<term>".  A spec of one built-in name returns that function's result unchanged.
    """

    def __init__(self, spec: str, components: list[_Component]):
        self.spec = spec
        self.components = components

    @property
    def needs_numeric_gold(self) -> bool:
        """Whether a built-in component reads the row's gold_answer as a number."""
        return any(component.builtin for component in self.components)

    def _call_custom(self, component: _Component, text: str, row: dict):
        fields = {key: value for key, value in row.items() if key != "completion"}
        if not component.takes_all_fields:
            missing = sorted(component.required - fields.keys())
            if missing:
                raise RewardSpecError(f"reward {component.label} needs the field(s) {', '.join(missing)}, which "
                                      f"the dataset row lacks (its fields: {', '.join(sorted(fields))})")
            fields = {key: value for key, value in fields.items() if key in component.parameters}
        return component.function(completion=text, **fields)

    def __call__(self, text: str, row: dict, truncated: bool = False) -> RewardResult:
        if len(self.components) == 1 and self.components[0].builtin and self.components[0].weight == 1.0:
            return self.components[0].function(text, row["gold_answer"], truncated)
        total, correct, format_ok, terms = 0.0, None, None, {}
        for component in self.components:
            if component.builtin:
                result = component.function(text, row["gold_answer"], truncated)
            else:
                result = _as_result(self._call_custom(component, text, row), component.label)
            if isinstance(result, RewardResult):
                reward, component_correct = result.total, result.correct
                if component.builtin and format_ok is None:
                    format_ok = result.format_ok
                if len(self.components) > 1:
                    terms.update({f"{component.label}/{name}": value for name, value in result.terms.items()})
            else:
                reward, component_correct = result
            terms[component.label] = reward
            total += component.weight * reward
            if correct is None:
                correct = component_correct
        if correct is None:
            correct = _numeric_correct(text, row.get("gold_answer"))
        return RewardResult(total=total, correct=bool(correct), format_ok=bool(format_ok), terms=terms)


def load_reward(spec: str = DEFAULT_REWARD_NAME, weights: Sequence[float] | str = ()) -> Reward:
    """The Reward of a spec: comma-separated built-in names and ``file.py:function`` /
    ``module:function`` references, e.g. "math,my_rewards.py:brevity", with one weight each
    (``weights`` empty: all 1).  Custom files are imported now, so a typo fails at start-up."""
    parts = [part.strip() for part in spec.split(",")]
    if not spec.strip() or not all(parts):
        raise RewardSpecError(f"REWARD {spec!r}: empty reward name")
    weight_list = _parse_weights(weights, len(parts), spec)
    components = []
    for part, weight in zip(parts, weight_list):
        if part in REWARD_FUNCTIONS:
            components.append(_Component(part, REWARD_FUNCTIONS[part], weight, builtin=True,
                                         takes_all_fields=False, parameters=frozenset(), required=frozenset()))
        else:
            components.append(_custom_component(part, _import_function(part, spec), weight, spec))
    labels = [component.label for component in components]
    if len(set(labels)) != len(labels):
        raise RewardSpecError(f"REWARD {spec!r} names a reward twice: weight it with REWARD_WEIGHTS instead")
    return Reward(spec, components)


def score_batch(reward: Callable[..., RewardResult], texts: Sequence[str], rows: Sequence[dict],
                truncated: Sequence[bool] | None = None) -> list[RewardResult]:
    """``reward(text, row, truncated)`` for each completion: the call the trainers make on a step's
    samples (``rows[i]`` is the dataset row completion i answers; ``truncated`` None: none cut off)."""
    if truncated is None:
        truncated = [False] * len(texts)
    elif hasattr(truncated, "tolist"):  # a (device) tensor read once, not one host sync per row (issue 29, finding 12)
        truncated = [bool(cut) for cut in truncated.tolist()]
    else:
        truncated = [bool(cut) for cut in truncated]
    if not len(texts) == len(rows) == len(truncated):
        raise ValueError(f"lengths differ: {len(texts)} texts, {len(rows)} rows, {len(truncated)} truncated flags")
    return [reward(text, row, cut) for text, row, cut in zip(texts, rows, truncated)]
