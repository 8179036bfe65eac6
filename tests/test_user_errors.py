"""Every error a user can fix is one ``error: ...`` message, exit status 1, without a traceback (common/errors.py);
the small frictions: a byte-order mark and CRLF, the repository's default paths from any folder, a local path
never sent to the Hub, exported files readable as any other, a unique default eval OUT_FILE.

Where the behaviour is the script's own, the script runs as a subprocess, as a user meets it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint
from common.config import REPO_ROOT, ConfigError, configure, repo_path
from common.data import MAX_BAD_LINES, DataError, DataFileNotFoundError, load_pairs, load_problems
from common.errors import UserError
from common.lora import LoRAStateError, LoRATargetError, lora_targets
from common.memory_plan import MemoryPlanError
from common.model import (DeviceUnavailableError, IncompleteModelError, ModelNotFoundError, get_device,
                          looks_like_hub_id, meta_model)
from common.peft_io import PeftAdapterError, save_peft_adapter
from common.prompts import ChatTemplateNotFoundError
from common.quant import QuantizationUnavailable
from common.reward import RewardSpecError
from common.run import RunError
from common.run_setup import room_for_prompts
from tests.conftest import TINY_MODEL_DIR, micro_model, run_script
from tests.test_run import SMALL_GRPO


def one_error_line(result, *fragments) -> str:
    """The script stopped with status 1 and a stderr of one ``error: ...`` line holding every fragment (beside
    the progress bars: an eval's tqdm bar is on stderr too)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------- the handler

@pytest.mark.parametrize("error", [RunError, CheckpointError, CheckpointNotFoundError, ConfigError, DataError,
                                   DataFileNotFoundError, RewardSpecError, LoRATargetError, LoRAStateError,
                                   MemoryPlanError, ModelNotFoundError, IncompleteModelError, PeftAdapterError,
                                   QuantizationUnavailable, ChatTemplateNotFoundError, DeviceUnavailableError])
def test_the_projects_errors_are_user_errors_and_keep_their_bases(error):
    assert issubclass(error, UserError)
    assert not issubclass(error, SystemExit)  # caught by the handler, not by Python's SystemExit printing


HOOK_SCRIPT = """
import sys
from common.config import configure
X = 1  # a constant
configure(globals(), quiet=True)
raise {error}
"""


@pytest.mark.parametrize("error, status, expected", [
    ("__import__('common.run').run.RunError('the run cannot start: do this')", 1,
     "error: the run cannot start: do this\n"),
    ("ValueError('a bug')", 1, None),
])
def test_configure_installs_the_handler_a_user_error_is_one_line_a_bug_a_traceback(tmp_path, error, status,
                                                                                 expected):
    script = tmp_path / "script.py"
    script.write_text(HOOK_SCRIPT.format(error=error))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == status
    if expected is None:
        assert "Traceback" in result.stderr and result.stderr.strip().endswith("ValueError: a bug")
    else:
        assert result.stderr == expected


# ------------------------------------------------------------------------- data files

def test_a_data_file_lists_its_first_bad_lines_each_as_file_colon_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join([
        '{"question": "1 + 1?", "gold_answer": "2"}',
        '{"question": "broken", "gold_answer": ',      # 2: malformed JSON
        '{"question": "2 + 2?", "gold_answer": "four"}',  # 3: a gold that is not a number
        '',                                             # a blank line: skipped, still counted
        '{"question": "3 + 3?", "gold_answer": NaN}',   # 5: NaN
        '{"question": "4 + 4?"}',                       # 6: no gold
        '{"question": "  ", "gold_answer": "1"}',       # 7: an empty question
        '{"question": "5 + 5?", "gold_answer": "10"}',
    ]) + "\n")
    with pytest.raises(DataError) as caught:
        load_problems(path)
    lines = str(caught.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:{n}" for n in (2, 3, 5, 6, 7)]
    assert lines[0].startswith(f"{path}:2: bad JSON (Expecting value")
    assert lines[1] == f"{path}:3: gold_answer 'four' is not a number"
    assert lines[2] == f"{path}:5: gold_answer nan is not a number"
    assert lines[3].startswith(f"{path}:6: no gold answer")
    assert lines[4] == f"{path}:7: empty question"


def test_more_than_five_bad_lines_say_that_more_follow(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "chosen": "a", "rejected": "a"}}\n' for i in range(9)))
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    lines = str(caught.value).splitlines()
    assert lines[:MAX_BAD_LINES] == [f"{path}:{n}: chosen and rejected are the same text"
                                     for n in range(1, MAX_BAD_LINES + 1)]
    assert lines[MAX_BAD_LINES:] == [f"{path}: more bad lines follow (the first {MAX_BAD_LINES} are shown)"]


def test_a_limit_reads_only_its_lines(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "1?", "gold_answer": "1"}\n{"question": "2?", "gold_answer": "x"}\n')
    assert [p["question"] for p in load_problems(path, limit=1)] == ["1?"]  # line 2 is never read


def test_a_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    lines = ['{"question": "What is 2 + 3?", "gold_answer": "5"}', '{"question": "Zoë: 7 - 1?", "gold_answer": 6}']
    plain, windows = tmp_path / "plain.jsonl", tmp_path / "windows.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    windows.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))  # as Notepad saves it
    assert windows.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_problems(windows) == load_problems(plain) == [
        {"question": "What is 2 + 3?", "gold_answer": "5"}, {"question": "Zoë: 7 - 1?", "gold_answer": "6"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes('{"prompt": "2 + 3 =", "chosen": "5", "rejected": "6"}\r\n'.encode("utf-8-sig"))
    assert load_pairs(pairs)[0]["chosen"] == "5"


def test_a_chat_template_with_a_byte_order_mark_loads_without_it(tmp_path):
    from common.prompts import configure_prompts

    class Tokenizer:
        chat_template = None

    template = tmp_path / "t.jinja"
    template.write_bytes("{% for m in messages %}{{ m['content'] }}{% endfor %}\r\n".encode("utf-8-sig"))
    tokenizer = Tokenizer()
    configure_prompts(tokenizer, chat_template=template)
    assert tokenizer.chat_template.startswith("{% for")


def test_a_script_reports_bad_data_lines_without_a_traceback(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "1 + 1?", "gold_answer": "2"}\n{"question": "", "gold_answer": "1"}\n'
                    '{"question": "2 + 2?", "gold_answer": null}\n')
    result = run_script(["eval_math.py", "--MODEL_PATH=models/tiny-gemma2-math", f"--EVAL_FILE={path}",
                         "--DEVICE=cpu", f"--OUT_FILE={tmp_path / 'out.jsonl'}"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: {path}:2: empty question",
                                          f"{path}:3: gold_answer must be a string or number, got NoneType"]


# ------------------------------------------------------------------------- messages

def test_no_room_for_the_prompt_says_so():
    config = micro_model().config  # a context of 128 tokens
    assert room_for_prompts(config, 100) == 28
    with pytest.raises(RunError, match="^MAX_NEW_TOKENS=128 leaves no room for the prompt in the model's context "
                                       "of 128 tokens"):
        room_for_prompts(config, 128)


def test_lora_targets_are_checked_on_the_model_without_weights(micro_model_dir):
    model = meta_model(micro_model_dir)
    assert next(model.parameters()).device.type == "meta"
    assert lora_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(LoRATargetError, match="no nn.Linear layer named qproj in Gemma2ForCausalLM; its linear "
                                              "layers are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                              "down_proj, lm_head"):
        lora_targets(model, ["q_proj", "qproj"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_device_this_machine_lacks_says_what_to_give():
    with pytest.raises(DeviceUnavailableError, match="give --DEVICE=auto or cpu"):
        get_device("cuda")


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(text)
    assert str(caught.value) == f"{text}: not a checkpoint (a .pt from this repository, or a PEFT adapter folder)"


def test_run_train_grpo_refuses_unknown_lora_targets_before_the_weights_load(micro_model_dir, tmp_path):
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", *SMALL_GRPO, "--LORA_TARGETS=qproj",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"], check=False)
    one_error_line(result, "LORA_TARGETS: no nn.Linear layer named qproj", "its linear layers are: q_proj, k_proj")
    assert "Loading weights" not in result.stderr


def test_run_train_grpo_says_max_new_tokens_leaves_no_room(micro_model_dir, tmp_path):
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", *SMALL_GRPO,
                         "--MAX_NEW_TOKENS=100000", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"],
                        check=False)
    one_error_line(result, "MAX_NEW_TOKENS=100000 leaves no room for the prompt in the model's context of 128 tokens")


def test_run_sft_refuses_fp16_weights_in_one_line(tmp_path):
    """DTYPE=float16 with LORA_R=0 crashed in the loss scaler, which cannot unscale fp16 gradients (issue 29,
    finding 7); auto gives float32 there instead (common.run_setup.load_model_for_training)."""
    result = run_script(["run_sft.py", f"--MODEL_PATH={TINY_MODEL_DIR}", f"--OUT_DIR={tmp_path / 'sft'}",
                         "--MAX_STEPS=1", "--BATCH_SIZE=2", "--EVAL_EVERY=0", "--DEVICE=cpu", "--DTYPE=float16",
                         "--LORA_R=0", "--TRAIN_FILE=data/synth_train.jsonl", f"--LOG_DIR={tmp_path}"], check=False)
    one_error_line(result, "DTYPE=float16 with LORA_R=0", "use --DTYPE=float32")


def test_eval_math_says_a_text_file_is_not_a_checkpoint(micro_model_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("a text file given as LORA_CKPT\n")
    result = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--LORA_CKPT={text}",
                         "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=1", "--MAX_NEW_TOKENS=2", "--DEVICE=cpu",
                         f"--OUT_FILE={tmp_path / 'out.jsonl'}"], check=False)
    one_error_line(result, f"{text}: not a checkpoint (a .pt from this repository, or a PEFT adapter folder)")


REWARDS = '''
def nan_reward(completion, **row):
    return float("nan")


def text_reward(completion, **row):
    return "0.5"


def none_reward(completion, **row):
    pass
'''


@pytest.mark.parametrize("function, message", [
    ("nan_reward", "returned nan: rewards must be finite"),
    ("text_reward", "returned '0.5': return a number, a bool"),
    ("none_reward", "returned None: return a number, a bool"),
])
def test_a_custom_reward_returning_no_number_is_one_line(micro_model_dir, tmp_path, function, message):
    (tmp_path / "rewards.py").write_text(REWARDS)
    result = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", "--EVAL_FILE=data/synth_test.jsonl",
                         f"--REWARD={tmp_path / 'rewards.py'}:{function}", "--EVAL_LIMIT=1", "--MAX_NEW_TOKENS=2",
                         "--DEVICE=cpu", f"--OUT_FILE={tmp_path / 'out.jsonl'}"], check=False)
    one_error_line(result, f"error: reward {tmp_path / 'rewards.py'}:{function} {message}")


# ------------------------------------------------------------------------- paths

DEFAULTS_SCRIPT = '''
from pathlib import Path
MODEL_PATH = "models/tiny-gemma2-math"  # a default in the repository's models/
TRAIN_FILE = "data/synth_train.jsonl"  # a default in data/
LOG_DIR = "logs"  # the repository's logs/
OUT: Path = Path("checkpoints/x.pt")  # a Path default
EVAL_FILE = "data/synth_test.jsonl"  # given on the command line below
REWARD = "math"  # not a path
'''


def test_the_repositorys_default_paths_are_its_own_from_any_folder(tmp_path, monkeypatch):
    script = tmp_path / "script.py"
    script.write_text(DEFAULTS_SCRIPT)
    namespace: dict = {"Path": Path, "__file__": str(script)}
    exec(DEFAULTS_SCRIPT, namespace)
    monkeypatch.chdir(tmp_path)
    config = configure(namespace, ["--EVAL_FILE=data/mine.jsonl"], quiet=True)
    assert config["MODEL_PATH"] == str(REPO_ROOT / "models/tiny-gemma2-math")
    assert config["TRAIN_FILE"] == str(REPO_ROOT / "data/synth_train.jsonl")
    assert config["LOG_DIR"] == str(REPO_ROOT / "logs")
    assert namespace["OUT"] == REPO_ROOT / "checkpoints/x.pt"
    assert config["EVAL_FILE"] == "data/mine.jsonl"  # given: relative to the current folder, as usual
    assert config["REWARD"] == "math"
    # Started in the repository's root, the defaults stay as written (the printed and stored config too).
    monkeypatch.chdir(REPO_ROOT)
    assert repo_path("models/tiny-gemma2-math") == "models/tiny-gemma2-math"
    assert repo_path(Path("/abs/models")) == Path("/abs/models")


def test_a_repository_folder_is_never_a_hub_id_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here
    assert not looks_like_hub_id("models/tiny-gemma2-math")
    assert looks_like_hub_id("Qwen/Qwen2.5-1.5B-Instruct")


def test_a_local_path_from_another_folder_is_not_downloaded(tmp_path):
    result = run_script([str(REPO_ROOT / "eval_math.py"), "--MODEL_PATH=models/tiny-gemma2-math"], cwd=tmp_path,
                        check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(  # then the commands that get a model, a line each
        "error: model directory 'models/tiny-gemma2-math' not found (a relative path is taken from the current "
        f"folder, {tmp_path}; the repository has {REPO_ROOT / 'models/tiny-gemma2-math'}).\n"), result.stderr
    assert "Hub id" not in result.stdout and not (tmp_path / "models").exists()


def test_two_evals_started_together_write_two_files_in_the_repositorys_logs(micro_model_dir, tmp_path):
    """Started at once from another folder, with the default OUT_FILE: each run its own file, under logs/ of the
    repository."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    command = [sys.executable, str(REPO_ROOT / "eval_math.py"), f"--MODEL_PATH={micro_model_dir}",
               f"--EVAL_FILE={REPO_ROOT / 'data/synth_test.jsonl'}", "--EVAL_LIMIT=2", "--MAX_NEW_TOKENS=2",
               "--DEVICE=cpu"]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    written = []
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
        match = re.search(r"per-question results: (\S+)  summary: (\S+)", stdout)
        assert match, stdout[-3000:]
        written.append([Path(match[1]), Path(match[2])])
    try:
        assert written[0][0] != written[1][0]
        for out_file, summary in written:
            assert out_file.parent == REPO_ROOT / "logs" and out_file.name.startswith(f"eval_{micro_model_dir.name}_")
            assert len(out_file.read_text().splitlines()) == 2 and summary.is_file()
    finally:
        for path in sum(written, []):
            path.unlink(missing_ok=True)


@pytest.mark.skipif(os.name == "nt", reason="Windows keeps only a read-only flag")
def test_an_exported_adapter_gets_the_usual_file_mode(tmp_path):
    from common.lora import apply_lora

    model = micro_model()
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    previous = os.umask(0o022)
    try:
        save_peft_adapter(model, tmp_path / "adapter", "org/base")
    finally:
        os.umask(previous)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o644, name
