"""The trainers' constants blocks, read from the source (ast + the source lines, as --help reads them).

1. Shared constants stay shared: a constant that several of the four trainers define has, in each,
   the same annotation, the same default (its source text) and the same comment, continuation lines
   included, so that one setting means one thing whichever trainer a user runs. The exception, a
   constant whose comment says why it differs: the comment contains "(differs from WHOM: WHY)",
   e.g. ``RUN_NAME: RunName = "ppo"  # ... (differs from the other trainers: the trainer's name)``.
   Such a trainer's copy may differ in annotation, default and comment; the copies without the note
   must still agree with each other.
2. Every constant is used: each is named again (an ``ast.Name``, not a string) below the
   ``config = configure(...)`` statement of its script; a constant nothing reads is a setting that
   does nothing.
"""

import ast
import re
from pathlib import Path

import pytest

from common.config import read_declarations
from tests.conftest import REPO_ROOT

TRAINERS = ("run_train_grpo.py", "run_train_ppo.py", "run_train_dpo.py", "run_sft.py")
DIFFERS = re.compile(r"\(differs from [^:()]+: [^)]+\)")


def split_at_configure(script: str) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """The script's top-level statements before and after ``config = configure(...)``."""
    body = ast.parse((REPO_ROOT / script).read_text(encoding="utf-8")).body
    for index, node in enumerate(body):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "configure"):
            return body[:index], body[index + 1:]
    raise AssertionError(f"{script} has no config = configure(...) statement")


def constants(script: str) -> dict[str, tuple[str | None, str, str]]:
    """{NAME: (annotation, default, comment)} of the script's constants block, as source text."""
    declared = read_declarations((REPO_ROOT / script).read_text(encoding="utf-8"))
    found = {}
    for node in split_at_configure(script)[0]:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name) and target.id in declared:
                    found[target.id] = (declared[target.id]["annotation"], ast.unparse(node.value),
                                        declared[target.id]["comment"])
    return found


def test_the_differs_note_is_recognised():
    assert DIFFERS.search("name of the run (differs from the other trainers: the trainer's name)")
    assert DIFFERS.search("sequences per pass (differs from GRPO and PPO: a pair is two sequences)")
    assert not DIFFERS.search("differs from GRPO, which samples more")  # a note needs its parentheses and reason
    assert not DIFFERS.search("(differs from GRPO)")


def test_shared_constants_have_one_annotation_default_and_comment():
    by_name: dict[str, dict[str, tuple]] = {}
    for script in TRAINERS:
        for name, declaration in constants(script).items():
            by_name.setdefault(name, {})[script] = declaration
    shared = {name: copies for name, copies in by_name.items() if len(copies) > 1}
    assert len(shared) > 40  # the parse found the blocks
    mismatches = []
    for name, copies in shared.items():
        plain = {script: declaration for script, declaration in copies.items() if not DIFFERS.search(declaration[2])}
        if len(set(plain.values())) > 1:
            mismatches.append(f"{name}:\n" + "\n".join(
                f"  {script}: {annotation} = {default}  # {comment}"
                for script, (annotation, default, comment) in plain.items()))
    assert not mismatches, ("constants shared by trainers differ; make them agree, or say why in the comment "
                            "with '(differs from WHOM: WHY)':\n" + "\n".join(mismatches))


@pytest.mark.parametrize("script", TRAINERS)
def test_every_constant_is_read_below_the_constants_block(script):
    below = {node.id for statement in split_at_configure(script)[1] for node in ast.walk(statement)
             if isinstance(node, ast.Name)}
    unused = [name for name in constants(script) if name not in below]
    assert not unused, f"{script}: constants never named below config = configure(...): {', '.join(unused)}"
