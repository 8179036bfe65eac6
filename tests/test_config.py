"""Command-line overrides of a script's constants: types, errors, --help, the resolved dict."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, closest_names, configure, read_declarations
from tests.conftest import REPO_ROOT

SCRIPT = '''\
from pathlib import Path
MODEL_PATH = "models/x"  # local model directory
LR = 1e-4  # learning rate
MAX_STEPS = 10  # steps to run
USE_KL = True  # add the KL term
LORA_TARGETS = ("q_proj", "v_proj")  # layers that get an adapter
CKPT: Path | None = None  # checkpoint to resume from
OUT = Path("logs")  # output directory
LIMIT = None  # optional string setting
SIZES = (1, 2)  # integers
lowercase_helper = 3
'''


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    namespace = {"__file__": str(path)}
    exec(compile(SCRIPT, str(path), "exec"), namespace)
    return path, namespace


def test_defaults_untouched_and_resolved_dict(script):
    path, namespace = script
    config = configure(namespace, argv=[], quiet=True)
    assert config == {"MODEL_PATH": "models/x", "LR": 1e-4, "MAX_STEPS": 10, "USE_KL": True,
                      "LORA_TARGETS": ["q_proj", "v_proj"], "CKPT": None, "OUT": "logs", "LIMIT": None,
                      "SIZES": [1, 2]}
    assert "lowercase_helper" not in config


@pytest.mark.parametrize("arg, name, expected", [
    ("--LR=3e-4", "LR", 3e-4),
    ("--LR=2", "LR", 2.0),
    ("--MAX_STEPS=25", "MAX_STEPS", 25),
    ("--MAX_STEPS=1e3", "MAX_STEPS", 1000),
    ("--USE_KL=false", "USE_KL", False),
    ("--USE_KL=0", "USE_KL", False),
    ("--USE_KL=Yes", "USE_KL", True),
    ("--MODEL_PATH=models/gemma-2-2b-it", "MODEL_PATH", "models/gemma-2-2b-it"),
    ("--MODEL_PATH=a=b", "MODEL_PATH", "a=b"),
    ("--LORA_TARGETS=q_proj,k_proj,v_proj", "LORA_TARGETS", ("q_proj", "k_proj", "v_proj")),
    ("--LORA_TARGETS=o_proj", "LORA_TARGETS", ("o_proj",)),
    ("--SIZES=4,5,6", "SIZES", (4, 5, 6)),
    ("--CKPT=checkpoints/run/a.pt", "CKPT", Path("checkpoints/run/a.pt")),
    ("--CKPT=None", "CKPT", None),
    ("--OUT=/tmp/out", "OUT", Path("/tmp/out")),
    ("--LIMIT=abc", "LIMIT", "abc"),
    ("--LIMIT=none", "LIMIT", None),
])
def test_override_converts_by_type(script, arg, name, expected):
    _, namespace = script
    configure(namespace, argv=[arg], quiet=True)
    assert namespace[name] == expected
    assert type(namespace[name]) is type(expected)


def test_override_updates_namespace_and_dict(script):
    _, namespace = script
    config = configure(namespace, argv=["--MAX_STEPS=3", "--CKPT=a.pt"], quiet=True)
    assert namespace["MAX_STEPS"] == 3 and config["MAX_STEPS"] == 3
    assert config["CKPT"] == "a.pt"


def test_unknown_name_names_the_closest_valid_one(script):
    _, namespace = script
    with pytest.raises(ConfigError) as error:
        configure(namespace, argv=["--LEARNING_RATE=1"], quiet=True)
    message = str(error.value)
    assert "unknown constant --LEARNING_RATE: did you mean --LR?" in message
    for other in ("MODEL_PATH", "MAX_STEPS", "LORA_TARGETS", "CKPT"):
        assert other not in message


@pytest.mark.parametrize("arg, words", [
    ("--LR=fast", ["LR", "float"]),
    ("--MAX_STEPS=2.5", ["MAX_STEPS", "int"]),
    ("--MAX_STEPS=ten", ["MAX_STEPS", "int"]),
    ("--USE_KL=maybe", ["USE_KL", "bool"]),
    ("--SIZES=1,x", ["SIZES", "int"]),
])
def test_wrong_type_names_constant_and_type(script, arg, words):
    _, namespace = script
    with pytest.raises(ConfigError) as error:
        configure(namespace, argv=[arg], quiet=True)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("arg", ["LR=1", "-LR=1", "--LR"])
def test_malformed_argument(script, arg):
    _, namespace = script
    with pytest.raises(ConfigError, match="--NAME=value"):
        configure(namespace, argv=[arg], quiet=True)


def test_help_lists_constants_comments_defaults(script, capsys):
    _, namespace = script
    with pytest.raises(SystemExit) as exit_info:
        configure(namespace, argv=["--help"], quiet=True)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--LR" in out and "learning rate" in out and "0.0001" in out
    assert "--CKPT" in out and "checkpoint to resume from" in out
    assert "lowercase_helper" not in out


def test_config_is_printed(script, capsys):
    _, namespace = script
    configure(namespace, argv=["--MAX_STEPS=7"])
    assert '"MAX_STEPS": 7' in capsys.readouterr().out


def test_read_declarations_keeps_order_annotation_comment():
    declarations = read_declarations(SCRIPT)
    assert list(declarations)[:3] == ["MODEL_PATH", "LR", "MAX_STEPS"]
    assert declarations["CKPT"]["annotation"] == "Path | None"
    assert declarations["LR"]["comment"] == "learning rate"


def test_script_exits_with_message_not_traceback():
    result = subprocess.run([sys.executable, "eval_math.py", "--NOT_A_SETTING=1"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown constant --NOT_A_SETTING" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argument, meant", [("--lr=1e-4", "--LR"), ("--LEARNING_RATE=1e-4", "--LR"),
                                             ("--max_step=3", "--MAX_STEPS"), ("--lora_rank=8", "--LORA_R")])
def test_misspelt_constant_gets_the_closest_names_in_one_short_line(argument, meant):
    """Issue 31, item 6: the closest names (case, edit distance, initials), not the list of every name."""
    result = subprocess.run([sys.executable, "run_train_grpo.py", argument], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 160, lines
    name = argument[2:].split("=")[0]
    assert lines[0].startswith(f"error: run_train_grpo.py: unknown constant --{name}: did you mean {meant}")
    assert lines[0].endswith("(--help lists them all)")
    assert "SAMPLE_EVERY" not in lines[0]  # not the list of every valid name


def test_closest_names_offers_nothing_for_a_name_like_none():
    assert closest_names("ZZZQ", ["LR", "MAX_STEPS"]) == []
    assert closest_names("seed", ["SEED", "SAMPLE_EVERY"])[0] == "SEED"


def test_secret_values_are_not_printed_or_returned(tmp_path, capsys):
    path = tmp_path / "dl.py"
    source = 'TOKEN = None  # access token\nMAX_NEW_TOKENS = 8  # not a secret\n'
    path.write_text(source)
    namespace = {"__file__": str(path)}
    exec(source, namespace)
    config = configure(namespace, argv=["--TOKEN=hf_secret123"])
    assert namespace["TOKEN"] == "hf_secret123"
    assert config == {"TOKEN": "***", "MAX_NEW_TOKENS": 8}
    assert "hf_secret123" not in capsys.readouterr().out
