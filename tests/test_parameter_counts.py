"""No function, method or lambda in grpo/, ppo/ or dpo/ takes more than MAX_PARAMETERS parameters.

A longer list is a group of settings that travels together and belongs in one value (as
grpo.loss.GRPOObjective does for the GRPO objective). Counted from the source with ``ast``: every
named parameter (positional-only, ordinary and keyword-only), *args and **kwargs one each; a
method's leading self or cls is not counted.
"""

import ast

from tests.conftest import REPO_ROOT

MAX_PARAMETERS = 8
PACKAGES = ("grpo", "ppo", "dpo")


def parameter_count(arguments: ast.arguments) -> int:
    named = [argument.arg for argument in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    if named[:1] in (["self"], ["cls"]):
        named = named[1:]
    return len(named) + (arguments.vararg is not None) + (arguments.kwarg is not None)


def test_the_count_leaves_out_self_and_counts_star_arguments():
    method = ast.parse("def f(self, a, /, b, *args, c, **kwargs): pass").body[0]
    assert parameter_count(method.args) == 5


def test_no_function_takes_more_than_eight_parameters():
    files = sorted(path for package in PACKAGES for path in (REPO_ROOT / package).glob("*.py"))
    assert len(files) >= 3
    too_long = [f"{path.relative_to(REPO_ROOT)}:{node.lineno} {getattr(node, 'name', 'lambda')} takes "
                f"{parameter_count(node.args)}"
                for path in files for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                and parameter_count(node.args) > MAX_PARAMETERS]
    assert not too_long, f"more than {MAX_PARAMETERS} parameters: " + "; ".join(too_long)
