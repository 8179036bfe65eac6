"""Synthetic GSM8K-style arithmetic word problems for the tiny test model.

Each problem is one of a dozen templates filled with a random person, object and
small numbers.  A problem takes 1 to 3 steps of + - * /, every intermediate and
final result is a whole non-negative number (division only when it is exact),
and the worked solution has one uniform line per step followed by the answer:

    5 * 3 = 15
    12 + 15 = 27
    Answer: 27

The format is deliberately rigid and the numbers small (operands up to ~100,
results up to a few hundred) so that a ~1M-parameter model can learn it, and
a reward function can still check the final answer exactly as for GSM8K.
"""

from __future__ import annotations

import random
import string
from typing import Callable

# (name, subject pronoun); the pronoun starts a sentence or follows "then".
PEOPLE = (
    ("Mia", "she"), ("Emma", "she"), ("Olivia", "she"), ("Ava", "she"),
    ("Sophia", "she"), ("Lily", "she"), ("Zoe", "she"), ("Chloe", "she"),
    ("Grace", "she"), ("Nora", "she"), ("Aisha", "she"), ("Priya", "she"),
    ("Sara", "she"), ("Lucia", "she"), ("Hana", "she"), ("Maya", "she"),
    ("Liam", "he"), ("Noah", "he"), ("Ethan", "he"), ("Lucas", "he"),
    ("Omar", "he"), ("Ben", "he"), ("Jack", "he"), ("Leo", "he"),
    ("Ravi", "he"), ("Diego", "he"), ("Kenji", "he"), ("Sam", "he"),
    ("Tom", "he"), ("Felix", "he"), ("Hugo", "he"), ("Arjun", "he"),
)

# Plural nouns that read naturally after "has 12", "buys 5 bags of", "gives 3".
OBJECTS = (
    "apples", "oranges", "lemons", "pears", "cookies", "cupcakes", "muffins",
    "candies", "marbles", "stickers", "pencils", "crayons", "erasers", "books",
    "stamps", "coins", "shells", "cards", "balloons", "beads", "buttons",
    "ribbons", "toy cars", "flowers", "eggs", "notebooks", "rocks", "feathers",
)

# (singular, plural)
CONTAINERS = (
    ("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("basket", "baskets"),
    ("jar", "jars"), ("crate", "crates"), ("tin", "tins"),
)

# (third person, base form) of verbs for getting things.
GAIN_VERBS = (
    ("collects", "collect"), ("finds", "find"), ("buys", "buy"),
    ("gets", "get"), ("picks up", "pick up"),
)

# Ways of giving things up, in the third person.
LOSS_VERBS = ("gives away", "loses", "sells", "donates", "trades away")

ITEMS = ("bike", "game", "jacket", "backpack", "lamp", "kite", "watch", "guitar")

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_OPERATIONS: dict[str, Callable[[int, int], int | float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


class _Work:
    """The worked solution of one problem, built step by step."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, a: int, op: str, b: int) -> int:
        """Record ``a op b = c`` and return c, refusing anything but a whole c >= 0."""
        result = _OPERATIONS[op](a, b)
        if result < 0 or result != int(result):
            raise ValueError(f"template produced {a} {op} {b} = {result}, not a whole number >= 0")
        result = int(result)
        self.lines.append(f"{a} {op} {b} = {result}")
        return result

    def problem(self, question: str, answer: int) -> dict:
        solution = "\n".join(self.lines + [f"Answer: {answer}"])
        return {"question": question, "solution": solution, "gold_answer": str(answer)}


def _two_people(rng: random.Random) -> tuple[tuple[str, str], str]:
    person, friend = rng.sample(PEOPLE, 2)
    return person, friend[0]


def _buy_groups(rng: random.Random) -> dict:
    (name, pronoun), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    _, containers = rng.choice(CONTAINERS)
    have, groups, each = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 10)
    work = _Work()
    bought = work.step(groups, "*", each)
    total = work.step(have, "+", bought)
    question = (f"{name} has {have} {obj}. {pronoun.capitalize()} buys {groups} {containers} "
                f"with {each} {obj} each. How many {obj} does {name} have now?")
    return work.problem(question, total)


def _lose_some(rng: random.Random) -> dict:
    (name, pronoun), obj, verb = rng.choice(PEOPLE), rng.choice(OBJECTS), rng.choice(LOSS_VERBS)
    have = rng.randint(10, 50)
    lost = rng.randint(1, have - 1)
    work = _Work()
    left = work.step(have, "-", lost)
    question = (f"{name} has {have} {obj}. {pronoun.capitalize()} {verb} {lost} of them. "
                f"How many {obj} does {name} have left?")
    return work.problem(question, left)


def _share_equally(rng: random.Random) -> dict:
    (name, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    work = _Work()
    share = work.step(friends * each, "/", friends)
    question = (f"{name} has {friends * each} {obj} and shares them equally among {friends} "
                f"friends. How many {obj} does each friend get?")
    return work.problem(question, share)


def _over_days(rng: random.Random) -> dict:
    (name, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    verb, verb_base = rng.choice(GAIN_VERBS)
    day_indices = sorted(rng.sample(range(len(DAYS)), rng.randint(2, 3)))
    amounts = [rng.randint(2, 30) for _ in day_indices]
    work = _Work()
    total = amounts[0]
    for amount in amounts[1:]:
        total = work.step(total, "+", amount)
    parts = [f"{amount} {obj} on {DAYS[day]}" for amount, day in zip(amounts, day_indices)]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    question = f"{name} {verb} {listed}. How many {obj} does {name} {verb_base} in total?"
    return work.problem(question, total)


def _change_from_purchase(rng: random.Random) -> dict:
    (name, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    count, price = rng.randint(2, 9), rng.randint(2, 10)
    # The smallest round amount above the cost, plus up to three extra tens.
    paid = (count * price // 10 + 1 + rng.randint(0, 3)) * 10
    work = _Work()
    cost = work.step(count, "*", price)
    change = work.step(paid, "-", cost)
    question = (f"{name} buys {count} {obj} for {price} dollars each and pays with {paid} dollars. "
                f"How much change does {name} get?")
    return work.problem(question, change)


def _buy_give_pack(rng: random.Random) -> dict:
    (name, pronoun), friend = _two_people(rng)
    obj = rng.choice(OBJECTS)
    container, containers = rng.choice(CONTAINERS)
    # Chosen backwards from the answer so that the last division is exact.
    containers_used, per_container = rng.randint(2, 6), rng.randint(2, 10)
    given = rng.randint(1, 10)
    total = containers_used * per_container + given
    bought = rng.randint(1, min(15, total - 1))
    have = total - bought
    work = _Work()
    after_buying = work.step(have, "+", bought)
    rest = work.step(after_buying, "-", given)
    each = work.step(rest, "/", containers_used)
    question = (f"{name} has {have} {obj}. {pronoun.capitalize()} buys {bought} more and gives "
                f"{given} to {friend}. Then {pronoun} puts the rest equally into "
                f"{containers_used} {containers}. How many {obj} are in each {container}?")
    return work.problem(question, each)


def _times_as_many(rng: random.Random) -> dict:
    (name, _), friend = _two_people(rng)
    obj = rng.choice(OBJECTS)
    have, factor = rng.randint(2, 20), rng.randint(2, 5)
    work = _Work()
    friend_has = work.step(have, "*", factor)
    together = work.step(have, "+", friend_has)
    question = (f"{name} has {have} {obj}. {friend} has {factor} times as many {obj} as {name}. "
                f"How many {obj} do they have together?")
    return work.problem(question, together)


def _rows_minus(rng: random.Random) -> dict:
    (name, pronoun), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    rows, per_row = rng.randint(2, 9), rng.randint(2, 10)
    removed = rng.randint(1, min(20, rows * per_row - 1))
    work = _Work()
    total = work.step(rows, "*", per_row)
    left = work.step(total, "-", removed)
    question = (f"{name} puts {obj} in {rows} rows with {per_row} in each row. Then {pronoun} "
                f"takes away {removed} {obj}. How many {obj} are left?")
    return work.problem(question, left)


def _save_and_spend(rng: random.Random) -> dict:
    (name, _), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    weekly, weeks = rng.randint(2, 10), rng.randint(2, 9)
    spent = rng.randint(1, weekly * weeks - 1)
    work = _Work()
    saved = work.step(weekly, "*", weeks)
    left = work.step(saved, "-", spent)
    question = (f"{name} saves {weekly} dollars each week for {weeks} weeks and then spends "
                f"{spent} dollars on a {item}. How many dollars does {name} have left?")
    return work.problem(question, left)


def _fewer_than(rng: random.Random) -> dict:
    (name, _), friend = _two_people(rng)
    obj = rng.choice(OBJECTS)
    have = rng.randint(10, 50)
    fewer = rng.randint(1, have - 1)
    work = _Work()
    friend_has = work.step(have, "-", fewer)
    together = work.step(have, "+", friend_has)
    question = (f"{name} has {have} {obj}. {friend} has {fewer} fewer {obj} than {name}. "
                f"How many {obj} do they have altogether?")
    return work.problem(question, together)


def _packs_shared(rng: random.Random) -> dict:
    (name, pronoun), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    _, containers = rng.choice(CONTAINERS)
    # Redraw until the share is exact; about half of all draws qualify.
    while True:
        packs, per_pack, friends = rng.randint(2, 10), rng.randint(2, 10), rng.randint(2, 8)
        if packs * per_pack % friends == 0:
            break
    work = _Work()
    total = work.step(packs, "*", per_pack)
    each = work.step(total, "/", friends)
    question = (f"{name} buys {packs} {containers} of {obj} with {per_pack} {obj} in each. "
                f"{pronoun.capitalize()} shares them equally among {friends} friends. "
                f"How many {obj} does each friend get?")
    return work.problem(question, each)


def _two_gifts(rng: random.Random) -> dict:
    (name, pronoun), (first, _), (second, _) = rng.sample(PEOPLE, 3)
    obj = rng.choice(OBJECTS)
    have = rng.randint(10, 50)
    to_first = rng.randint(1, have - 1)
    to_second = rng.randint(0, have - to_first)
    work = _Work()
    after_first = work.step(have, "-", to_first)
    left = work.step(after_first, "-", to_second)
    question = (f"{name} has {have} {obj}. {pronoun.capitalize()} gives {to_first} to {first} "
                f"and {to_second} to {second}. How many {obj} does {name} have left?")
    return work.problem(question, left)


TEMPLATES: tuple[Callable[[random.Random], dict], ...] = (
    _buy_groups, _lose_some, _share_equally, _over_days, _change_from_purchase,
    _buy_give_pack, _times_as_many, _rows_minus, _save_and_spend, _fewer_than,
    _packs_shared, _two_gifts,
)


def make_problem(rng: random.Random) -> dict:
    """One random problem: {"question", "solution", "gold_answer"} (answer as a string)."""
    return rng.choice(TEMPLATES)(rng)


def normalise_question(text: str) -> str:
    """Lowercase, collapse whitespace and strip punctuation at the ends, for de-duplication."""
    collapsed = " ".join(text.lower().split())
    return collapsed.strip(string.punctuation + " ")


def make_problems(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n problems with distinct questions, none whose normalised question is in ``exclude``.

    The same (n, seed, exclude) always gives the same list.  ``exclude`` may hold
    raw or normalised questions; both are compared normalised.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen = {normalise_question(q) for q in exclude or ()}
    problems: list[dict] = []
    # The template space is millions of questions, so this bound only stops a
    # request that can never be met (an exclude set covering nearly everything).
    max_draws = 100 * n + 1000
    draws = 0
    while len(problems) < n:
        if draws == max_draws:
            raise ValueError(f"found only {len(problems)} distinct problems out of {n} "
                             f"in {max_draws} draws")
        draws += 1
        problem = make_problem(rng)
        key = normalise_question(problem["question"])
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return problems
