"""The documented commands stay true: README.md and docs/*.md name real scripts, real constants with
values their rules allow, real make targets and pages that exist; the plain-command pages run exactly
the Makefile's recipes.

Only fenced code blocks are read. A command is a `python SCRIPT.py ...` (any interpreter path:
`.venv/bin/python`, `.venv\\Scripts\\python`, `py`), or a `torchrun ... SCRIPT.py ...`, line; lines
ending in `\\` (bash) or `` ` `` (PowerShell) go on below. Running the commands is the smoke tests' job.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from common.config import ConfigError, configure, read_declarations

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHONS = {"python", "python3", "python3.11", "python.exe", "py"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Scripts that run another one with its constants (eval_math_base.py is eval_math.py without a LoRA).
DELEGATES = {"eval_math_base.py": "eval_math.py"}
# Scripts of another project that a page runs from that project's own checkout (docs/reasoning.md:
# llama.cpp's GGUF converters): not this repository's, so not checked here.
OTHER_PROJECTS = ("llama.cpp/",)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and language is None:
            language, body = match.group(1), []
        elif line.strip() == "```" and language is not None:
            blocks.append((language, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def logical_lines(body: str) -> list[str]:
    """The block's lines with bash's `\\` and PowerShell's `` ` `` continuations joined."""
    lines, pending = [], ""
    for line in body.splitlines():
        stripped = line.rstrip()
        if stripped.endswith("\\") or stripped.endswith(" `"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def tokens_of(line: str) -> list[str]:
    """Shell words, comments dropped; backslashes kept (they are Windows path separators here)."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.commenters, lexer.escape = True, "#", ""
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose-like output: not a command
        return []


def commands_of(line: str) -> list[list[str]]:
    """The line's commands, split at |, &&, ; ..., each without its leading VAR=value assignments."""
    commands, current = [], []
    for token in tokens_of(line) + [";"]:
        if token in SEPARATORS or token.endswith(";"):
            if token.endswith(";") and token != ";":
                current.append(token[:-1])
            while current and re.match(r"^\$?(env:)?[A-Z_][A-Z0-9_]*=", current[0]):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands


def invocation(command: list[str]) -> tuple[str, list[str]] | None:
    """(script or "-m module", its arguments) of a python or torchrun command, else None."""
    program = re.split(r"[\\/]", command[0])[-1]
    if program == "torchrun":
        for index, token in enumerate(command):
            if token.endswith(".py"):
                return token.replace("\\", "/"), command[index + 1:]
        return None
    if program not in PYTHONS:
        return None
    rest = command[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # py -3.11, python -u
        rest = rest[1:]
    if not rest:
        return None
    if rest[0] == "-m":
        return (f"-m {rest[1]}", rest[2:]) if len(rest) > 1 else None
    return rest[0].replace("\\", "/"), rest[1:]


def make_targets() -> set[str]:
    names = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", line)
        if match:
            names.add(match.group(1))
    return names


def _is_configure_call(node) -> bool:
    value = getattr(node, "value", None)
    return isinstance(value, ast.Call) and getattr(value.func, "id", None) == "configure"


@lru_cache(maxsize=None)
def script_namespace(script: str) -> dict:
    """The script's constants with their defaults and what their annotations need: its top-level code up
    to its ``configure(globals())`` call (imports and constants, by this repository's layout), nothing
    after it (no model loads)."""
    path = REPO / script
    tree = ast.parse(path.read_text(encoding="utf-8"))
    namespace: dict = {"__file__": str(path), "__name__": "docs_check"}
    for node in tree.body:
        if _is_configure_call(node):
            break
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def check_arguments(script: str, arguments: list[str]) -> list[str]:
    """What is wrong with ``arguments`` for ``script``: unknown constants, values their rules refuse."""
    script = DELEGATES.get(script, script)
    overrides = [argument for argument in arguments if argument.startswith("--") and argument != "--help"]
    for argument in overrides:
        if "=" not in argument:
            return [f"{script}: {argument} is not --NAME=value"]
    declared = read_declarations((REPO / script).read_text(encoding="utf-8"))
    unknown = [argument.split("=", 1)[0][2:] for argument in overrides
               if argument.split("=", 1)[0][2:] not in declared]
    if unknown:
        return [f"{script}: no constant {name} (it has {', '.join(declared)})" for name in unknown]
    try:
        configure(dict(script_namespace(script)), overrides, source_file=str(REPO / script), quiet=True)
    except ConfigError as error:
        return [f"{script}: {error}"]
    return []


def problems_in(text: str, where: Path) -> list[str]:
    """Every way ``text`` (the page ``where``) disagrees with the repository."""
    problems = []
    for _, body in code_blocks(text):
        for line in logical_lines(body):
            for command in commands_of(line):
                if command[0] == "make":
                    for target in (token for token in command[1:] if not token.startswith("-") and "=" not in token):
                        if target not in make_targets():
                            problems.append(f"{where.name}: make {target}: no such Makefile target")
                    continue
                found = invocation(command)
                if found is None or found[0].startswith("-m "):
                    continue
                script, arguments = found
                if script.startswith(OTHER_PROJECTS):
                    continue
                if not (REPO / script).is_file():
                    problems.append(f"{where.name}: {script}: no such script")
                    continue
                problems += [f"{where.name}: {problem}" for problem in check_arguments(script, arguments)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in LINK.findall(prose):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        if not (where.parent / target.split("#")[0]).exists():
            problems.append(f"{where.name}: link {target} does not resolve")
    return problems


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda path: path.name)
def test_documented_commands_are_real(page):
    assert problems_in(page.read_text(encoding="utf-8"), page) == []


def test_readme_is_short_and_links_every_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 260
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README's 'Where to read more' misses docs/{page.name}"


README = (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("change, expected", [
    (("--EVAL_LIMIT=200", "--EVAL_LIMT=200"), "no constant EVAL_LIMT"),      # a misspelt constant
    (("--EVAL_LIMIT=200", "--EVAL_LIMIT=-3"), "EVAL_LIMIT >= 0"),            # a value its rule refuses
    (("python prepare_gsm8k.py", "python prepare_gsm8k_v2.py"), "no such script"),
    (("make test ", "make tests "), "no such Makefile target"),
    (("(docs/gpu.md)", "(docs/gpus.md)"), "does not resolve"),
])
def test_a_wrong_page_is_caught(change, expected):
    old, new = change
    assert old in README
    problems = problems_in(README.replace(old, new, 1), REPO / "README.md")
    assert any(expected in problem for problem in problems), problems


def test_another_projects_scripts_are_left_alone():
    page = "```bash\npython llama.cpp/convert_lora_to_gguf.py exports/a --base models/b --outfile a.gguf\n```\n"
    assert problems_in(page, REPO / "README.md") == []
    ours = problems_in(page.replace("llama.cpp/", ""), REPO / "README.md")  # the same name as one of ours: checked
    assert ours == ["README.md: convert_lora_to_gguf.py: no such script"]


def test_continuations_and_windows_paths_are_read():
    body = ".venv\\Scripts\\python run_train_grpo.py --LR=2e-4 `\n    --MAX_STEPS=3 2>&1 | Tee-Object logs\\x.log\n" \
           "PYTHONUNBUFFERED=1 torchrun --standalone --nproc_per_node=2 bench/bench_gpu.py \\\n    --STEPS=1"
    found = [invocation(command) for line in logical_lines(body) for command in commands_of(line)]
    assert [f for f in found if f] == [("run_train_grpo.py", ["--LR=2e-4", "--MAX_STEPS=3", "2>&1"]),
                                       ("bench/bench_gpu.py", ["--STEPS=1"])]


# ------------------------------------------------ the plain-command pages run the Makefile's recipes
def runs_of(lines: list[str]) -> list[tuple[str, dict | tuple]]:
    """The scripts a list of command lines runs, each with its settings as the script sees them (the last
    --NAME=value wins), or a module's arguments; pip and venv set-up left out."""
    runs = []
    for line in lines:
        for command in commands_of(line):
            found = invocation(command)
            if found is None or found[0] in ("-m pip", "-m venv"):
                continue
            script, arguments = found
            if script.startswith("-m "):
                runs.append((script, tuple(arguments)))
            else:
                runs.append((script, dict(argument[2:].split("=", 1) for argument in arguments
                                          if argument.startswith("--") and "=" in argument)))
    return runs


def documented_recipes() -> dict[str, list[str]]:
    """{target: its documented command lines} from the blocks whose section starts `# make TARGET`."""
    recipes: dict[str, list[str]] = {}
    for page in DOC_FILES:
        for _, body in code_blocks(page.read_text(encoding="utf-8")):
            target = None
            for line in logical_lines(body):
                match = re.match(r"^#\s*make ([\w-]+)", line.strip())
                if match:
                    target = match.group(1)
                    recipes[target] = []
                elif target is not None:
                    recipes[target].append(line)
    return recipes


def test_every_make_target_is_written_out():
    documented = documented_recipes()
    wanted = {"demo", "test", "tiny-model", "gpu-check"} | {target for target in make_targets() if target.startswith("demo")}
    assert wanted <= set(documented), f"not written out without make: {sorted(wanted - set(documented))}"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", sorted(documented_recipes()))
def test_written_out_recipe_equals_the_makefile(target):
    printed = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True)
    assert runs_of(documented_recipes()[target]) == runs_of(logical_lines(printed.stdout))


# ------------------------------------------------ the README's commands in a fresh shell
# Installed into .venv (by make, or by the set-up's pip): bare, they need the virtualenv activated.
VENV_COMMANDS = {"python", "hf", "torchrun", "pip", "pytest"}


def commands_needing_the_venv(text: str) -> list[str]:
    """The bash commands of ``text`` that run a program of .venv by its bare name, in a block that has not
    activated the virtualenv before them (a fresh shell: ModuleNotFoundError, or command not found)."""
    found = []
    for language, body in code_blocks(text):
        if language != "bash":
            continue
        activated = False
        for line in logical_lines(body):
            for command in commands_of(line):
                activated |= command[:2] in (["source", ".venv/bin/activate"], [".", ".venv/bin/activate"])
                if command[0] in VENV_COMMANDS and not activated:
                    found.append(" ".join(command))
    return found


def test_the_readme_runs_as_written_in_a_fresh_shell():
    assert commands_needing_the_venv((REPO / "README.md").read_text(encoding="utf-8")) == []
    assert commands_needing_the_venv("```bash\npython eval_math.py\n```\n") == ["python eval_math.py"]
    assert commands_needing_the_venv("```bash\nsource .venv/bin/activate\npython eval_math.py\n```\n") == []
