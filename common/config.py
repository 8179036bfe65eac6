"""Constants at the top of a script, overridable from the command line.

A script declares its settings as UPPER_CASE module constants, one comment each,
and then calls ``configure(globals())``:

    MODEL_PATH = "models/tiny-gemma2-math"   # local directory of the model
    LORA_CKPT: Path | None = None            # LoRA checkpoint to load (None = base model)
    LORA_TARGETS = ("q_proj", "v_proj")      # linear layers that get an adapter

    config = configure(globals())

``python script.py --LR=1e-4 --LORA_TARGETS=q_proj,k_proj`` then overrides them.
The type of a value comes from the annotation when there is one, else from the
default (nanoGPT's trick, made strict): int, float, bool, str, Path, None and
tuples of those.  An unknown name is an error that names the closest valid ones (``--lr``:
``did you mean --LR?``; ``--help`` lists them all); a value that does not convert names the
constant and the type it wanted.

What a value may be is declared in the annotation, next to the constant, so that
``--help`` shows it and a wrong value (the default too) is refused at start-up,
before any model loads, in one line naming the constant and what is allowed:

    ADVANTAGE: Literal["mean", "std", "rank"] = "std"   # the allowed choices
    TOP_P: Annotated[float, "0 < x <= 1"] = 1.0          # a condition on the value x
    MAX_STEPS: Annotated[int, ">= 0"] = 0                # shorthand for "x >= 0"
    RUN_NAME: Annotated[str, re.compile("[A-Za-z0-9._-]+")] = "grpo"  # a pattern the whole value must match

A default path into one of the repository's own folders (``REPO_FOLDERS``: "models/...",
"data/...", "checkpoints", "logs") is the repository's, whatever folder the script is started from;
a path given on the command line is relative to the current folder, as usual (``repo_path``).

A comment may go on over the following lines: a comment-only line whose text is
indented (``#`` then two or more spaces) continues the constant above it;
``# rollouts`` (one space) is a section heading.
"""

from __future__ import annotations

import ast
import difflib
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from common.errors import UserError, report_user_errors


# The annotations of two constants every script has.
Device = typing.Annotated[str, "x in ('auto', 'cpu', 'mps', 'cuda') or x.startswith('cuda:')"]
Dtype = typing.Literal["auto", "float32", "bfloat16", "float16"]
# A run's name names its folder and its metrics file: a plain file name, never a path ("" would be the
# checkpoint folder itself, ".." the folder above it: OVERWRITE=true would empty them).
RunName = typing.Annotated[str, re.compile(r"[A-Za-z0-9._-]+"), "x not in ('.', '..')"]


class ConfigError(UserError, ValueError):
    """A command-line override that cannot be applied."""


REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository's own folders: a default path into one of them is taken from REPO_ROOT.
REPO_FOLDERS = ("models", "data", "checkpoints", "logs")


def repo_path(path: str | Path) -> str | Path:
    """A relative ``path`` into one of REPO_FOLDERS, as the repository's own: prefixed with REPO_ROOT
    when the script runs in another folder (unchanged in the root, so the printed and stored configs
    of a run started there stay as they were); any other path unchanged. Same type as ``path``."""
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or parts[0] not in REPO_FOLDERS or Path.cwd().resolve() == REPO_ROOT:
        return path
    return type(path)(REPO_ROOT / path)


# Settings whose values must not reach logs or checkpoints (an access token, say).
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY)$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
# A comment-only line whose text starts two or more spaces after the "#": the constant above goes on.
_CONTINUATION = re.compile(r"^\s*#\s{2,}\S")
_COMPARISON_START = re.compile(r"^\s*(<|>|==|!=)")


def _is_upper_name(name: str) -> bool:
    return name.isupper() and not name.startswith("_")


def read_declarations(source: str) -> dict[str, dict[str, Any]]:
    """Top-level UPPER_CASE assignments of a script, in order: annotation and comment.

    Returns {name: {"annotation": str | None, "comment": str}}.  The comment is
    the one that ends the assignment's last line (``X = 1  # what X is``).
    """
    tree = ast.parse(source)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    lines = source.splitlines()

    def comment_of(node) -> str:
        """The comment ending the assignment, with its indented continuation lines."""
        parts = [comments.get(node.end_lineno, "").lstrip("#").strip()]
        line = node.end_lineno + 1  # 1-based: lines[line - 1]
        while line <= len(lines) and _CONTINUATION.match(lines[line - 1]):
            parts.append(lines[line - 1].strip().lstrip("#").strip())
            line += 1
        return " ".join(part for part in parts if part)

    declarations: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names, annotation = [node.target.id], ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            annotation = None
        else:
            continue
        for name in names:
            if _is_upper_name(name):
                declarations[name] = {"annotation": annotation, "comment": comment_of(node)}
    return declarations


def _resolve_annotation(annotation: str | None, namespace: dict) -> Any:
    if annotation is None:
        return None
    scope = {"Path": Path, "None": None, "tuple": tuple, "int": int, "float": float,
             "str": str, "bool": bool, "typing": typing, "Literal": typing.Literal,
             "Annotated": typing.Annotated}
    scope.update({k: v for k, v in namespace.items() if not k.startswith("__")})
    try:
        return eval(annotation, scope)  # annotations are the script's own source
    except Exception as exc:
        raise ConfigError(f"cannot understand the annotation {annotation!r}: {exc}") from exc


def _describe(kind: Any) -> str:
    """An annotation as a reader says it: "auto or int >= 1", not Union[Literal['auto'], Annotated[...]]."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if isinstance(kind, type):
        return kind.__name__
    if origin is typing.Literal:
        return _choices(args)
    if origin is typing.Annotated:  # the shorthand conditions (">= 1") read after the type: "int >= 1"
        shorthand = [condition for condition in args[1:] if isinstance(condition, str) and condition[:1] in "<>=!"]
        return " ".join([_describe(args[0]), *shorthand])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in args if option is not type(None))
    return str(kind).replace("typing.", "").replace("pathlib.", "")


def convert(raw: str, kind: Any, default: Any, name: str) -> Any:
    """Convert the command-line string ``raw`` to the type ``kind`` (or the default's type)."""
    if kind is None:
        kind = type(default) if default is not None else str
        if isinstance(default, Path):
            kind = Path
        if isinstance(default, tuple):
            element = type(default[0]) if default else str
            kind = tuple[element, ...]
        if default is None:
            kind = typing.Optional[str]

    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Annotated:  # the conditions are checked by check_value, on defaults too
        return convert(raw, args[0], default, name)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw.strip():
                return choice
        raise ConfigError(f"--{name}={raw!r}: allowed values are {_choices(args)}")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if type(None) in args and raw.strip().lower() in _NONE:
            return None
        for option in options:
            try:
                return convert(raw, option, None, name)
            except ConfigError:
                continue
        raise ConfigError(f"--{name}={raw!r}: expected {_describe(kind)}")
    if origin is tuple:
        element = args[0] if args else str
        if raw.strip() == "":
            return ()
        return tuple(convert(part.strip(), element, None, name) for part in raw.split(","))
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"--{name}={raw!r}: expected bool (true/false, 1/0, yes/no)")
    if kind in (int, float):
        try:
            if kind is int:
                value = float(raw) if any(c in raw for c in ".eE") else int(raw)
                if isinstance(value, float):
                    if not value.is_integer():
                        raise ValueError
                    value = int(value)
                return value
            return float(raw)
        except ValueError:
            raise ConfigError(f"--{name}={raw!r}: expected {kind.__name__}") from None
    if kind is Path:
        return Path(raw)
    if kind is str:
        return raw
    if kind is type(None):
        if raw.strip().lower() in _NONE:
            return None
        raise ConfigError(f"--{name}={raw!r}: expected None")
    raise ConfigError(f"--{name}: unsupported type {_describe(kind)}")


def _choices(args: tuple) -> str:
    return ", ".join(str(choice) for choice in args)


def _condition(condition: str, name: str) -> str:
    """A rule as shown to the user: "> 0" -> "NAME > 0", "0 < x <= 1" -> "0 < NAME <= 1"."""
    expression = f"x {condition.strip()}" if _COMPARISON_START.match(condition) else condition
    return re.sub(r"\bx\b", name, expression)


def rule_text(kind: Any, name: str) -> str:
    """What the annotation ``kind`` allows, for --help: "one of a, b", "0 < TOP_P <= 1", or ""."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        return "; ".join([text for text in [rule_text(args[0], name)] if text]
                         + [_condition(c, name) if isinstance(c, str) else f"{name} matches {c.pattern}"
                            for c in args[1:] if isinstance(c, (str, re.Pattern))])
    if origin is typing.Literal:
        return f"one of {_choices(args)}"
    if origin in (typing.Union, types.UnionType):
        texts = [rule_text(option, name) for option in args if option is not type(None)]
        return " or ".join(text for text in texts if text) + (" (or None)" if any(texts) else "")
    return ""


def check_value(name: str, value: Any, kind: Any) -> None:
    """Refuse a value its annotation does not allow (a Literal's choices, an Annotated condition)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        check_value(name, value, args[0])
        for condition in args[1:]:
            if isinstance(condition, re.Pattern) and not condition.fullmatch(value):
                raise ConfigError(f"{name}={value!r}: must match {condition.pattern}")
            if isinstance(condition, str):
                shown = _condition(condition, name)
                expression = _condition(condition, "x")
                if not eval(expression, {"__builtins__": {}}, {"x": value}):  # the script's own source
                    raise ConfigError(f"{name}={value!r}: must satisfy {shown}")
    elif origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r}: allowed values are {_choices(args)}")
    elif origin in (typing.Union, types.UnionType) and value is not None:
        options = [option for option in args if option is not type(None)]
        errors = []
        for option in options:
            try:
                check_value(name, value, option)
                return
            except ConfigError as error:
                errors.append(str(error))
        if errors and len(errors) == len(options):
            # The option of the value's own type says what is wrong (MICRO_BATCH_SIZE=0 breaks its ">= 1",
            # it is not a misspelt "auto").
            own_type = [error for option, error in zip(options, errors) if isinstance(value, _base_types(option))]
            raise ConfigError((own_type or errors)[0])


def _base_types(kind: Any) -> tuple[type, ...]:
    """The Python types an annotation's values have (a Literal's choices', an Annotated's base type)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        return _base_types(args[0])
    if origin is typing.Literal:
        return tuple({type(choice) for choice in args})
    return (kind,) if isinstance(kind, type) else (object,)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def closest_names(name: str, names, count: int = 3) -> list[str]:
    """The valid names a misspelt ``name`` most likely meant: the same name in another case, the nearest
    by difflib's similarity (lora_rank: LORA_R), then the name its words' initials spell (LEARNING_RATE: LR)."""
    names = list(names)
    upper = name.upper()
    initials = "".join(word[0] for word in upper.replace("-", "_").split("_") if word)
    found = [valid for valid in names if valid == upper]
    found += [valid for valid in difflib.get_close_matches(upper, names, n=count, cutoff=0.6) if valid not in found]
    found += [valid for valid in names if len(initials) > 1 and valid == initials and valid not in found]
    return found[:count]


def help_text(script: str, declarations: dict, namespace: dict) -> str:
    width = max((len(n) for n in declarations), default=0)
    lines = [f"usage: python {script} [--NAME=value ...]", "",
             "constants (default [what is allowed], then what it is):"]
    for name, info in declarations.items():
        rule = rule_text(_resolve_annotation(info["annotation"], namespace), name)
        lines.append(f"  --{name:<{width}} = {namespace[name]!r}" + (f"  [{rule}]" if rule else ""))
        if info["comment"]:
            lines.append(f"      {info['comment']}")
    return "\n".join(lines)


def configure(namespace: dict, argv: list[str] | None = None, source_file: str | None = None,
              quiet: bool = False) -> dict[str, Any]:
    """Apply ``--NAME=value`` overrides to the UPPER_CASE constants of ``namespace``.

    Updates ``namespace`` in place (the script's globals), prints the resolved
    config unless ``quiet``, and returns it as a JSON-friendly dict (paths as
    strings, tuples as lists) for logs and checkpoints.  A default left as it is
    that points into the repository's folders is made the repository's (repo_path).
    Reading ``sys.argv`` (``argv`` None: a script), a bad override exits with the
    message and status 2 instead of a traceback, and from then on any UserError
    the script meets is reported the same way, exit status 1 (common.errors); with
    an explicit ``argv`` it raises ConfigError.
    """
    if argv is None:
        report_user_errors()
        try:
            return _configure(namespace, sys.argv[1:], source_file, quiet)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return _configure(namespace, argv, source_file, quiet)


def _configure(namespace: dict, argv: list[str], source_file: str | None, quiet: bool) -> dict[str, Any]:
    source_file = source_file or namespace.get("__file__")
    if source_file is None:
        raise ConfigError("configure() needs the script's source file to read its constants")
    script = Path(source_file).name
    declarations = read_declarations(Path(source_file).read_text())
    declarations = {n: d for n, d in declarations.items() if n in namespace}

    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(script, declarations, namespace))
        raise SystemExit(0)

    given: set[str] = set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{script}: arguments are --NAME=value, got {arg!r} (try --help)")
        name, raw = arg[2:].split("=", 1)
        if name not in declarations:
            guesses = [f"--{guess}" for guess in closest_names(name, declarations)]
            guesses = " or ".join(filter(None, [", ".join(guesses[:-1]), guesses[-1]])) if guesses else ""
            raise ConfigError(f"{script}: unknown constant --{name}" + (f": did you mean {guesses}?" if guesses else "")
                              + " (--help lists them all)")
        kind = _resolve_annotation(declarations[name]["annotation"], namespace)
        namespace[name] = convert(raw, kind, namespace[name], name)
        given.add(name)
    for name in declarations.keys() - given:  # the script's own defaults: the repository's folders, from anywhere
        if isinstance(namespace[name], (str, Path)):
            namespace[name] = repo_path(namespace[name])
    # Every value, the defaults too: a constant edited at the top of the script is checked as well.
    for name, info in declarations.items():
        check_value(name, namespace[name], _resolve_annotation(info["annotation"], namespace))

    config = {name: "***" if _SECRET_NAME.search(name) and namespace[name] is not None
              else _jsonable(namespace[name]) for name in declarations}
    if not quiet:
        print(f"config of {script}:")
        print(json.dumps(config, indent=2))
    return config
