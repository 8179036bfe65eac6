"""A run's bookkeeping (common/run.py) and the checks every script makes before its model loads.

Each refusal is tested as a user meets it: the script run as a subprocess, the message naming the
thing, and nothing lost. A refusal that must come before the model loads is run against a model
path that does not exist where it can be, so that reaching the loading code would fail otherwise.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from common.metrics_log import MetricsFileError, MetricsLogger, read_metrics
from common.run import RunError, RunLock, check_writable
from common.run_setup import fit_to_context
from tests.conftest import REPO_ROOT, run_script
from tests.test_dpo_trainer import pairs_file

SMALL_GRPO = ["--TRAIN_FILE=data/synth_train.jsonl", "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8",
              "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6", "--EVAL_EVERY=0",
              "--DEVICE=cpu", "--LORA_R=2", "--WARMUP_STEPS=0"]


def grpo(model_dir, tmp_path, *extra, check=True):
    return run_script(["run_train_grpo.py", f"--MODEL_PATH={model_dir}", *SMALL_GRPO,
                       f"--CHECKPOINT_DIR={tmp_path / 'ck'}", f"--LOG_DIR={tmp_path / 'logs'}", *extra], check=check)


def refused(result, *fragments):
    """The script stopped with an error naming every fragment, and never started loading a model."""
    assert result.returncode != 0, result.stdout
    assert "Loading weights" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


# ------------------------------------------------------------------------- run names and locks

def test_a_second_run_on_a_used_name_is_refused_and_the_first_is_kept(micro_model_dir, tmp_path):
    grpo(micro_model_dir, tmp_path, "--RUN_NAME=exp", "--MAX_STEPS=1")
    metrics_before = (tmp_path / "logs" / "exp.jsonl").read_text()
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=exp", "--MAX_STEPS=1", check=False)
    refused(result, "run 'exp' already exists", str(tmp_path / "ck" / "exp"), "--RESUME=", "--RUN_NAME",
            "--OVERWRITE=true")
    assert (tmp_path / "logs" / "exp.jsonl").read_text() == metrics_before
    assert [p.name for p in (tmp_path / "ck" / "exp").iterdir()] == ["lora_epoch0_step1.pt"]

    grpo(micro_model_dir, tmp_path, "--RUN_NAME=exp", "--MAX_STEPS=2", "--OVERWRITE=true")
    assert [json.loads(line)["step"] for line in (tmp_path / "logs" / "exp.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "ck" / "exp").iterdir()) == ["lora_epoch0_step2.pt"]


def test_a_running_run_is_locked_and_a_dead_processs_lock_is_taken_over(micro_model_dir, tmp_path):
    run_dir = tmp_path / "ck" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text(f"{os.getpid()}\n")  # this test's own process: alive
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=busy", "--MAX_STEPS=1", check=False)
    refused(result, f"in use by process {os.getpid()}")

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".lock").write_text(finished.stdout)  # a process that has exited
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=busy", "--MAX_STEPS=1")
    assert "taking over the stale lock" in result.stdout
    assert not (run_dir / ".lock").exists()  # released at the end
    assert (run_dir / "lora_epoch0_step1.pt").is_file()


def test_the_lock_is_taken_by_one_process_only(tmp_path):
    first, second = RunLock(tmp_path / ".lock"), RunLock(tmp_path / ".lock")
    first.acquire()
    with pytest.raises(RunError, match="in use by process"):
        second.acquire()
    first.release()
    second.acquire()
    assert json.loads((tmp_path / ".lock").read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    second.release()


# ------------------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def three_step_run(micro_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", "--MAX_STEPS=3", "--SAVE_EVERY=1", "--LR=2e-4")
    return tmp_path


def test_resume_applies_a_new_learning_rate_and_records_it(micro_model_dir, three_step_run, tmp_path):
    shutil.copytree(three_step_run / "ck", tmp_path / "ck")
    shutil.copytree(three_step_run / "logs", tmp_path / "logs")
    (tmp_path / "ck" / "base" / "lora_epoch0_step3.pt").unlink()  # step 2 the newest: a run killed in step 3
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", "--MAX_STEPS=4", "--LR=1e-3",
                  f"--RESUME={tmp_path / 'ck' / 'base' / 'lora_epoch0_step2.pt'}")
    assert "resume: LR: 0.0002 -> 0.001 (applied from step 2 on)" in result.stdout
    assert (f"resume: 1 line(s) of {tmp_path / 'logs' / 'base.jsonl'} come after step 2, the run's newest "
            f"checkpoint: steps no checkpoint kept, which this run does again and logs anew") in result.stdout
    assert "warning" not in result.stdout
    checkpoint = load_checkpoint(tmp_path / "ck" / "base")  # its newest: step 4 (lora_epoch1_step4.pt)
    assert checkpoint["step"] == 4
    assert checkpoint["config"]["LR"] == 1e-3
    assert [group["lr"] for group in checkpoint["optimizer"]["param_groups"]] == [1e-3]
    assert checkpoint["scheduler"]["base_lrs"] == [1e-3]
    # The metrics file keeps the first run's steps 1-2 and continues: no step is logged twice.
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "base.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["lr"] for m in metrics] == [2e-4, 2e-4, 1e-3, 1e-3]


@pytest.mark.parametrize("setting", ["--LORA_R=8", "--NUM_SAMPLES_PER_PROMPT=4", "--PROMPTS_PER_STEP=4",
                                     "--SEED=3"])
def test_resume_refuses_what_it_cannot_change(three_step_run, setting):
    name, value = setting[2:].split("=")
    result = grpo("models/not-there", three_step_run, "--RUN_NAME=other", "--MAX_STEPS=4", setting,
                  f"--RESUME={three_step_run / 'ck' / 'base' / 'lora_epoch0_step2.pt'}", check=False)
    refused(result, f"error: {name}={value}", "differs from the resumed run's", "a resume cannot change it")
    assert len(result.stderr.strip().splitlines()) == 1


def test_resume_refuses_another_trainers_checkpoint(three_step_run, micro_model_dir, tmp_path):
    result = run_script(["run_train_dpo.py", f"--MODEL_PATH={micro_model_dir}",
                         f"--RESUME={three_step_run / 'ck' / 'base' / 'lora_epoch0_step2.pt'}",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"], check=False)
    refused(result, "is a checkpoint of a grpo run: a dpo run cannot continue it")


@pytest.mark.parametrize("trainer", ["run_train_grpo.py", "run_train_ppo.py", "run_train_dpo.py"])
def test_init_lora_trains_the_checkpoints_layout_says_so_and_records_it(three_step_run, micro_model_dir, tmp_path,
                                                                         trainer):
    """Issue 31, item 7: LORA_* settings that differ from INIT_LORA's are replaced by its own, in one line, and the
    new run's checkpoints record the values it trained with (they recorded the replaced ones)."""
    init = three_step_run / "ck" / "base" / "lora_epoch0_step3.pt"  # r=2, alpha 32, every projection
    data = ([f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 4)}", "--BATCH_SIZE=2", "--MICRO_BATCH_SIZE=1"]
            if trainer == "run_train_dpo.py" else SMALL_GRPO[:6])
    result = run_script([trainer, f"--MODEL_PATH={micro_model_dir}", *data, "--EVAL_FILE=data/synth_test.jsonl",
                         "--EVAL_EVERY=0", "--DEVICE=cpu", "--MAX_STEPS=1", f"--CHECKPOINT_DIR={tmp_path}",
                         f"--LOG_DIR={tmp_path}", "--RUN_NAME=from-init", f"--INIT_LORA={init}", "--LORA_R=8",
                         "--LORA_ALPHA=16", "--LORA_TARGETS=v_proj,q_proj"])
    every = sorted(load_checkpoint(init)["lora_config"]["target_modules"])
    assert len(every) == 7
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"INIT_LORA={init}")]
    assert lines == [f"INIT_LORA={init}: the LoRA's own layout replaces LORA_R=8 -> 2, LORA_ALPHA=16.0 -> 32.0, "
                     f"LORA_TARGETS=('v_proj', 'q_proj') -> {tuple(every)!r} (its weights have that shape; the run's "
                     f"checkpoints record it)"]
    checkpoint = load_checkpoint(tmp_path / "from-init")
    assert checkpoint["lora_config"]["r"] == 2 and checkpoint["lora_config"]["target_modules"] == every
    config = checkpoint["config"]
    assert (config["LORA_R"], config["LORA_ALPHA"], config["LORA_TARGETS"]) == (2, 32.0, every)


# ---------------------------------------------- resuming an older checkpoint: one line of history

@pytest.fixture(scope="module")
def four_step_run(micro_model_dir, tmp_path_factory):
    """Checkpoints at steps 2 and 4, metrics of steps 1-4."""
    tmp_path = tmp_path_factory.mktemp("history")
    grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", "--MAX_STEPS=4", "--SAVE_EVERY=2", "--LR=2e-4")
    return tmp_path


def untimed(line: str) -> dict:
    """A metrics record without its wall-clock times (the keys ending in _s), which no two runs share."""
    return {key: value for key, value in json.loads(line).items() if not key.endswith("_s")}


def test_resuming_an_older_checkpoint_is_refused_and_its_branch_continues_it_exactly(micro_model_dir, four_step_run,
                                                                                     tmp_path):
    """Issue 31, item 1: steps 3-4 of the run are never lost, and the suggested branch is the resume of step 2."""
    shutil.copytree(four_step_run / "ck", tmp_path / "ck")
    shutil.copytree(four_step_run / "logs", tmp_path / "logs")
    run_dir, metrics_file = tmp_path / "ck" / "base", tmp_path / "logs" / "base.jsonl"
    before = {path.name: path.read_bytes() for path in (*run_dir.iterdir(), metrics_file)}
    step2 = run_dir / "lora_epoch0_step2.pt"
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=base", "--MAX_STEPS=3", f"--RESUME={step2}", check=False)
    refused(result, f"error: {step2} is step 2 of run 'base', which went on to step 4",
            "Continue it as a branch with --RUN_NAME=base-from-step2", "move steps 3-4 aside with --OVERWRITE=true")
    assert len(result.stderr.strip().splitlines()) == 1
    assert {path.name: path.read_bytes() for path in (*run_dir.iterdir(), metrics_file)} == before

    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=base-from-step2", "--MAX_STEPS=4", "--SAVE_EVERY=2",
                  "--LR=2e-4", f"--RESUME={step2}")
    branch = tmp_path / "logs" / "base-from-step2.jsonl"
    assert (f"resume: a branch of {run_dir} at step 2, as the new run 'base-from-step2': {branch} starts with the "
            f"lines up to step 2 of {metrics_file}") in result.stdout
    assert {path.name: path.read_bytes() for path in (*run_dir.iterdir(), metrics_file)} == before  # untouched
    original, branched = metrics_file.read_text().splitlines(), branch.read_text().splitlines()
    assert branched[:2] == original[:2]  # the history up to step 2, copied as it was
    assert [untimed(line) for line in branched[2:]] == [untimed(line) for line in original[2:]]  # steps 3-4 again
    assert [path.name for path in (tmp_path / "ck" / "base-from-step2").iterdir()] == ["lora_epoch1_step4.pt"]
    resumed = load_checkpoint(tmp_path / "ck" / "base-from-step2")  # the folder's newest: the branch's step 4
    straight = load_checkpoint(run_dir / "lora_epoch1_step4.pt")
    assert resumed["step"] == 4 and resumed["config"]["RUN_NAME"] == "base-from-step2"
    for key in straight["lora"]:
        torch.testing.assert_close(resumed["lora"][key], straight["lora"][key], atol=1e-6, rtol=0)


def test_overwrite_moves_the_later_steps_aside_and_the_folder_picks_the_new_line(micro_model_dir, four_step_run,
                                                                                 tmp_path):
    shutil.copytree(four_step_run / "ck", tmp_path / "ck")
    shutil.copytree(four_step_run / "logs", tmp_path / "logs")
    run_dir, metrics_file = tmp_path / "ck" / "base", tmp_path / "logs" / "base.jsonl"
    original = metrics_file.read_text().splitlines()
    old_step4 = (run_dir / "lora_epoch1_step4.pt").read_bytes()
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", "--MAX_STEPS=3", "--SAVE_EVERY=2", "--LR=2e-4",
                  "--OVERWRITE=true", f"--RESUME={run_dir / 'lora_epoch0_step2.pt'}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("OVERWRITE=true: steps 3-4")]
    assert len(lines) == 1 and "(1 checkpoint(s), 2 metrics line(s)) will be moved to" in lines[0], result.stdout
    aside = Path(lines[0].split(" will be moved to ")[1].split(" when ")[0])
    assert aside.parent == run_dir and aside.name.startswith("abandoned-")
    assert sorted(path.name for path in aside.iterdir()) == ["base.jsonl", "lora_epoch1_step4.pt"]
    assert (aside / "lora_epoch1_step4.pt").read_bytes() == old_step4  # moved, not rewritten
    assert (aside / "base.jsonl").read_text().splitlines() == original[2:]  # the abandoned steps 3-4
    kept = metrics_file.read_text().splitlines()
    assert kept[:2] == original[:2] and [json.loads(line)["step"] for line in kept] == [1, 2, 3]
    assert [path.name for path in list_checkpoints(run_dir)] == ["lora_epoch0_step2.pt", "lora_epoch0_step3.pt"]
    assert resolve_checkpoint(run_dir) == run_dir / "lora_epoch0_step3.pt"  # --RESUME= and --LORA_CKPT= the folder
    assert untimed(kept[2]) == untimed(original[2])  # step 3 done again, as the first time


READ_ONLY_AFTER_FIRST_SAVE = '''
import subprocess
from pathlib import Path

FOLDER = Path({folder!r})
turned = []


def reward(completion, **row):
    """0 for every answer; once the run's first checkpoint is written, its folder turns read-only: a read-only
    bind mount as root (in the test's own mount namespace: root writes through a chmod), else a chmod."""
    if not turned and list(FOLDER.glob("lora_*.pt")):
        if {as_root}:
            subprocess.run(["mount", "--bind", str(FOLDER), str(FOLDER)], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(FOLDER)], check=True)
        else:
            FOLDER.chmod(0o555)
        turned.append(True)
    return 0.0
'''


def can_mount_privately() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or (os.geteuid() == 0 and not can_mount_privately()),
                    reason="a folder read-only to this user: POSIX, and as root an unprivileged mount namespace")
def test_a_checkpoint_folder_turned_read_only_mid_run_is_one_line_and_the_earlier_checkpoints_stay(
        micro_model_dir, tmp_path):
    """Issue 31, item 5: the failed save is one line naming the folder, what is intact and what would work (and
    the lock file the read-only folder keeps), never a traceback; that advice then works."""
    as_root = os.geteuid() == 0
    run_dir = tmp_path / "ck" / "ro"
    (tmp_path / "ro.py").write_text(READ_ONLY_AFTER_FIRST_SAVE.format(folder=str(run_dir), as_root=as_root))
    arguments = [f"--MODEL_PATH={micro_model_dir}", *SMALL_GRPO, f"--CHECKPOINT_DIR={tmp_path / 'ck'}",
                 f"--LOG_DIR={tmp_path / 'logs'}", "--RUN_NAME=ro", "--LR=2e-4", "--MAX_STEPS=3"]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    try:
        result = subprocess.run([*(["unshare", "-rm"] if as_root else []), sys.executable, "run_train_grpo.py",
                                 *arguments, "--SAVE_EVERY=1", f"--REWARD={tmp_path / 'ro.py'}:reward"],
                                cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    finally:
        run_dir.chmod(0o755)
    step1 = run_dir / "lora_epoch0_step1.pt"
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and result.stderr.strip().endswith(lines[0]), result.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write the checkpoint of step 2 in the run folder {run_dir}: "), lines
    assert (f"not written, the earlier checkpoints are intact; make {run_dir} writable, then continue with "
            f"--RESUME={step1}; the lock file {run_dir / '.lock'} (") in lines[0]
    assert sorted(path.name for path in run_dir.iterdir()) == [".lock", step1.name]  # no temporary file
    assert load_checkpoint(step1)["step"] == 1
    assert not (tmp_path / "logs" / ".ro.jsonl.lock").exists()  # the lock beside the metrics file is released
    result = grpo(micro_model_dir, tmp_path, *arguments[len(SMALL_GRPO) + 1:], f"--RESUME={step1}")
    assert f"taking over the stale lock {run_dir / '.lock'}" in result.stdout
    assert load_checkpoint(run_dir)["step"] == 3
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------------------------- preflight

def test_an_unusable_checkpoint_folder_is_refused_before_the_model_loads(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    result = run_script(["run_train_grpo.py", "--MODEL_PATH=models/tiny-gemma2-math", *SMALL_GRPO,
                         f"--CHECKPOINT_DIR={not_a_folder}", f"--LOG_DIR={tmp_path}"], check=False)
    refused(result, f"CHECKPOINT_DIR {not_a_folder}: {not_a_folder} is a file, not a folder")


def test_check_writable_creates_and_probes(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "X") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(RunError, match=f"X {tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a file, not a folder"):
        check_writable(tmp_path / "f" / "sub", "X")


def test_eval_math_refuses_an_unwritable_out_file_before_evaluating(micro_model_dir, tmp_path):
    (tmp_path / "file").write_text("")
    result = run_script(["eval_math.py", "--MODEL_PATH=models/not-there", "--EVAL_FILE=data/synth_test.jsonl",
                         f"--OUT_FILE={tmp_path / 'file' / 'eval.jsonl'}"], check=False)
    refused(result, f"OUT_FILE={tmp_path / 'file' / 'eval.jsonl'}: the folder {tmp_path / 'file'}: {tmp_path / 'file'} "
                    f"is a file, not a folder; give --OUT_FILE a path you can write")


@pytest.mark.parametrize("setting, message", [
    ("--TOP_P=0", "TOP_P=0.0: must satisfy 0 < TOP_P <= 1"),
    ("--TOP_P=2", "TOP_P=2.0: must satisfy 0 < TOP_P <= 1"),
    ("--TOP_K=-5", "TOP_K=-5: must satisfy TOP_K >= 0"),
    ("--LOSS_AGG=foo", "--LOSS_AGG='foo': allowed values are token_mean, seq_mean, seq_sum_const"),
    ("--MICRO_BATCH_SIZE=0", "MICRO_BATCH_SIZE=0: must satisfy MICRO_BATCH_SIZE >= 1"),
    ("--PROMPTS_PER_STEP=0", "PROMPTS_PER_STEP=0: must satisfy PROMPTS_PER_STEP >= 1"),
    ("--NUM_SAMPLES_PER_PROMPT=1", "NUM_SAMPLES_PER_PROMPT=1: must satisfy NUM_SAMPLES_PER_PROMPT >= 2"),
    ("--TEMPERATURE=0", "TEMPERATURE=0.0: must satisfy TEMPERATURE > 0"),
    ("--MAX_NEW_TOKENS=0", "MAX_NEW_TOKENS=0: must satisfy MAX_NEW_TOKENS >= 1"),
    ("--MAX_STEPS=-1", "MAX_STEPS=-1: must satisfy MAX_STEPS >= 0"),
    ("--DEVICE=tpu", "DEVICE='tpu': must satisfy DEVICE in ('auto', 'cpu', 'mps', 'cuda') or DEVICE.startswith('cuda:')"),
])
def test_a_wrong_value_is_one_line_naming_the_constant_and_what_is_allowed(setting, message):
    result = run_script(["run_train_grpo.py", "--MODEL_PATH=models/not-there", setting], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"


def test_help_shows_a_constants_whole_comment_and_its_rule():
    help_text = run_script(["run_train_ppo.py", "--help"]).stdout
    critic_help = help_text[help_text.index("--CRITIC_FEATURES"):help_text.index("--CRITIC_LR")]
    assert "one of detached, adapter, shared" in critic_help
    assert "a second LoRA of its own on the same base (adapter)" in critic_help
    assert "or the actor's, trained (shared)" in critic_help
    assert "[TOP_P: 0 < TOP_P <= 1]" not in help_text and "[0 < TOP_P <= 1]" in help_text


@pytest.mark.parametrize("break_it, message", [
    (lambda d: [(d / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json") if (d / name).exists()],
     "has no tokenizer"),
    (lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
     "model.safetensors: cut short"),
    (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
])
def test_an_incomplete_model_directory_is_refused_naming_the_file(micro_model_dir, tmp_path, break_it, message):
    model_dir = tmp_path / "model"
    shutil.copytree(micro_model_dir, model_dir)
    break_it(model_dir)
    for script in (["run_train_grpo.py", *SMALL_GRPO, f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"],
                   ["eval_math.py", "--EVAL_FILE=data/synth_test.jsonl", f"--OUT_FILE={tmp_path / 'e.jsonl'}"]):
        result = run_script([script[0], f"--MODEL_PATH={model_dir}", *script[1:]], check=False)
        refused(result, message)


# -------------------------------------------------------------------------------- data guards

def test_a_prompt_too_long_for_the_context_is_refused_or_skipped(micro_model_dir, tmp_path):
    lines = open("data/synth_train.jsonl").read().splitlines()[:8]
    huge = {"question": "How many apples? " * 20_000, "gold_answer": "3"}
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[:5] + [json.dumps(huge)] + lines[5:]) + "\n")
    run = ["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", *SMALL_GRPO, f"--TRAIN_FILE={train}",
           "--NUM_PROMPTS=0", "--MAX_STEPS=1", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"]
    result = run_script(run + ["--RUN_NAME=refused"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{train}:6: the prompt is" in result.stderr and "--SKIP_LONG_PROMPTS=true" in result.stderr
    result = run_script(run + ["--RUN_NAME=skipped", "--SKIP_LONG_PROMPTS=true"])
    assert f"skipped 1 line(s) of {train}" in result.stdout and "8 training questions" in result.stdout


def test_fit_to_context_names_the_file_line_of_a_long_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": 1}\n\n{"q": 2}\n{"q": 3}\n')  # a blank line: the third row is on line 4
    rows = [{"q": 1}, {"q": 2}, {"q": 3}]
    with pytest.raises(RunError, match=r"rows.jsonl:4: the prompt is 9 tokens, more than the 5"):
        fit_to_context(rows, [3, 5, 9], path, 5, "prompt", skip=False)
    assert fit_to_context(rows, [3, 5, 9], path, 5, "prompt", skip=True) == rows[:2]


def test_eval_math_refuses_an_empty_eval_file(micro_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--EVAL_FILE={empty}",
                         "--MAX_NEW_TOKENS=8", f"--OUT_FILE={tmp_path / 'e.jsonl'}"], check=False)
    assert result.returncode != 0 and f"{empty} has no questions" in result.stderr
    assert "Accuracy" not in result.stdout


@pytest.mark.parametrize("script", ["run_train_grpo.py", "run_train_ppo.py"])
def test_training_questions_shared_with_the_eval_file_are_warned(micro_model_dir, tmp_path, script):
    train = tmp_path / "train.jsonl"
    test_lines = open("data/synth_test.jsonl").read().splitlines()
    train.write_text("\n".join(open("data/synth_train.jsonl").read().splitlines()[:6] + test_lines[:2]) + "\n")
    result = run_script([script, f"--MODEL_PATH={micro_model_dir}", *SMALL_GRPO, f"--TRAIN_FILE={train}",
                         "--MAX_STEPS=1", "--EVAL_EVERY=1", "--EVAL_LIMIT=4", f"--CHECKPOINT_DIR={tmp_path}",
                         f"--LOG_DIR={tmp_path}"])
    assert f"warning: 2 of the 8 questions of {train} are also in data/synth_test.jsonl" in result.stdout


# ------------------------------------------------------------------------ metrics and temp files

def test_metrics_are_valid_json_and_a_resume_drops_the_lines_past_its_step(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        for step in range(1, 5):
            log.log({"step": step, "loss": float("nan") if step == 2 else 1.0, "grad": [float("inf"), 1.0]})
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "loss": None, "grad": [None, 1.0]}
    with MetricsLogger(path, start_step=2) as log:
        log.log({"step": 3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    with MetricsLogger(path) as log:  # a new run (OVERWRITE): the file starts anew
        log.log({"step": 1})
    assert len(path.read_text().splitlines()) == 1
    with MetricsLogger(tmp_path / "other.jsonl", is_main=False) as log:
        log.log({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()  # ranks other than 0 write nothing


def test_a_killed_saves_temporary_file_is_removed_at_the_next_start(micro_model_dir, tmp_path):
    run_dir = tmp_path / "ck" / "killed"
    run_dir.mkdir(parents=True)
    (run_dir / ".lora_epoch0_step1.pt.99999.tmp").write_bytes(torch.zeros(10).numpy().tobytes())
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=killed", "--MAX_STEPS=1")
    assert "removed 1 temporary file(s) of a killed save" in result.stdout
    assert [p.name for p in run_dir.iterdir()] == ["lora_epoch0_step1.pt"]


# ---------------------------------------------------------------- names stay inside their folder

@pytest.mark.parametrize("script", ["run_train_grpo.py", "run_train_ppo.py", "run_train_dpo.py", "run_sft.py"])
@pytest.mark.parametrize("name, rule", [("", "must match [A-Za-z0-9._-]+"), ("a/b", "must match [A-Za-z0-9._-]+"),
                                        ("..", "must satisfy RUN_NAME not in ('.', '..')")])
def test_a_run_name_that_is_not_a_plain_name_is_refused_and_nothing_is_removed(tmp_path, script, name, rule):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "other-run.pt").write_text("another run's")
    folder = f"--OUT_DIR={tmp_path / 'ck' / 'sft'}" if script == "run_sft.py" else f"--CHECKPOINT_DIR={tmp_path / 'ck'}"
    result = run_script([script, "--MODEL_PATH=models/not-there", f"--RUN_NAME={name}", "--OVERWRITE=true", folder,
                         f"--LOG_DIR={tmp_path / 'ck'}"], check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"error: RUN_NAME={name!r}: {rule}"
    assert (tmp_path / "ck" / "other-run.pt").read_text() == "another run's"


def test_a_run_folder_that_links_outside_checkpoint_dir_is_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ck" / "linked").symlink_to(tmp_path / "elsewhere")
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=linked", check=False)
    refused(result, f"resolves to {tmp_path / 'elsewhere'}, outside CHECKPOINT_DIR")


def test_overwrite_removes_only_what_a_run_wrote_and_lists_it(micro_model_dir, tmp_path):
    grpo(micro_model_dir, tmp_path, "--RUN_NAME=exp", "--MAX_STEPS=2", "--SAVE_EVERY=1")
    tensorboard = tmp_path / "logs" / "tensorboard" / "exp"
    tensorboard.mkdir(parents=True)
    (tensorboard / "events.out").write_text("x")
    (tmp_path / "logs" / "exp-notes.txt").write_text("mine")  # LOG_DIR's other files are no run's
    # An OVERWRITE that fails before its first step (a missing training file) removes nothing.
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=exp", "--OVERWRITE=true",
                  "--TRAIN_FILE=data/missing.jsonl", check=False)
    assert result.returncode != 0
    assert sorted(p.name for p in (tmp_path / "ck" / "exp").iterdir()) == ["lora_epoch0_step1.pt", "lora_epoch0_step2.pt"]
    assert (tmp_path / "logs" / "exp.jsonl").exists() and tensorboard.exists()

    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=exp", "--MAX_STEPS=1", "--OVERWRITE=true")
    listed = next(line for line in result.stdout.splitlines() if line.startswith("OVERWRITE=true: the earlier run"))
    for path in ("lora_epoch0_step1.pt", "lora_epoch0_step2.pt", "exp.jsonl", str(tensorboard)):
        assert path in listed
    assert "OVERWRITE=true: removed 4 file(s) of the earlier run 'exp'" in result.stdout
    assert [p.name for p in (tmp_path / "ck" / "exp").iterdir()] == ["lora_epoch0_step1.pt"]
    assert not tensorboard.exists() and (tmp_path / "logs" / "exp-notes.txt").read_text() == "mine"

    for name in ("notes.txt", "data.csv", "b.txt", "c.txt"):
        (tmp_path / "ck" / "exp" / name).write_text("mine")
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=exp", "--OVERWRITE=true", check=False)
    refused(result, "holds files that no run wrote (b.txt, c.txt, data.csv, ... (4 in all))")
    assert len(list((tmp_path / "ck" / "exp").iterdir())) == 5


def test_resume_is_offered_only_where_there_is_a_checkpoint(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "exp.jsonl").write_text('{"step": 1}\n')  # a run killed before its first save
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=exp", check=False)
    refused(result, "run 'exp' already exists", "Choose another --RUN_NAME, or replace it with --OVERWRITE=true")
    assert "--RESUME" not in result.stderr


# ------------------------------------------------------------ a resume changes nothing until it runs

def test_a_resume_that_fails_its_checks_leaves_the_metrics_file_as_it_was(micro_model_dir, three_step_run, tmp_path):
    shutil.copytree(three_step_run / "ck", tmp_path / "ck")
    shutil.copytree(three_step_run / "logs", tmp_path / "logs")
    before = (tmp_path / "logs" / "base.jsonl").read_bytes()
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", "--MAX_STEPS=4", "--TRAIN_FILE=data/typo.jsonl",
                  f"--RESUME={tmp_path / 'ck' / 'base' / 'lora_epoch0_step3.pt'}", check=False)
    assert result.returncode != 0 and "data/typo.jsonl" in result.stderr
    assert (tmp_path / "logs" / "base.jsonl").read_bytes() == before


def test_a_checkpoint_without_optimizer_state_is_refused_as_a_resume(micro_model_dir, three_step_run, tmp_path):
    soup = load_checkpoint(three_step_run / "ck" / "base" / "lora_epoch0_step1.pt")
    soup.update(optimizer=None, scheduler=None, step=0)
    torch.save(soup, tmp_path / "soup.pt")
    shutil.copytree(three_step_run / "logs", tmp_path / "logs")
    before = (tmp_path / "logs" / "base.jsonl").read_bytes()
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", f"--RESUME={tmp_path / 'soup.pt'}", check=False)
    refused(result, "holds no optimizer state", "--INIT_LORA")
    assert (tmp_path / "logs" / "base.jsonl").read_bytes() == before


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(micro_model_dir, three_step_run, tmp_path):
    shutil.copytree(three_step_run / "ck", tmp_path / "ck")
    shutil.copytree(three_step_run / "logs", tmp_path / "logs")
    metrics_file = tmp_path / "logs" / "base.jsonl"
    whole = metrics_file.read_text().splitlines()
    metrics_file.write_text("\n".join(whole[:2]) + "\n" + whole[2][:25])  # step 3's line cut by a kill
    result = run_script(["plot_metrics.py", f"--RUNS={metrics_file}", f"--OUT_FILE={tmp_path / 'm.png'}"])
    assert f"warning: {metrics_file}:3: the last line is cut short" in result.stdout
    (tmp_path / "ck" / "base" / "lora_epoch0_step3.pt").unlink()  # killed in step 3's save: step 2 the newest
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=base", "--MAX_STEPS=3", "--LR=2e-4",
                  f"--RESUME={tmp_path / 'ck' / 'base' / 'lora_epoch0_step2.pt'}")
    assert f"warning: {metrics_file}:3: the last line is cut short" in result.stdout
    assert [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()] == [1, 2, 3]


def test_a_bad_metrics_line_before_the_last_is_refused_naming_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(MetricsFileError, match=r"m.jsonl:2: not a metrics record"):
        read_metrics(path)


# ------------------------------------------------------------------ saves on the clock, kept

def test_save_every_minutes_saves_on_the_clock_and_keep_checkpoints_keeps_the_newest(micro_model_dir, tmp_path):
    result = grpo(micro_model_dir, tmp_path, "--RUN_NAME=clock", "--MAX_STEPS=3", "--SAVE_EVERY_MINUTES=1e-9",
                  "--KEEP_CHECKPOINTS=2")
    assert result.stdout.count("saved ") == 3  # after every step: its minutes have always passed
    assert sorted(p.name for p in (tmp_path / "ck" / "clock").iterdir()) == ["lora_epoch0_step2.pt",
                                                                             "lora_epoch0_step3.pt"]


# ------------------------------------------------------------------------------------ locks

def test_one_lock_covers_the_metrics_file_too(micro_model_dir, tmp_path):
    (tmp_path / "logs").mkdir()
    lock = tmp_path / "logs" / ".exp.jsonl.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # a run in another CHECKPOINT_DIR
    result = grpo("models/not-there", tmp_path, "--RUN_NAME=exp", check=False)
    refused(result, f"{tmp_path / 'logs' / 'exp.jsonl'} is in use by process {os.getpid()}")
    assert not (tmp_path / "ck" / "exp" / ".lock").exists()  # the run folder's lock, taken first, is given back


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": "gpu-node-7", "pid": int(finished.stdout)}))
    with pytest.raises(RunError, match=f"in use by process {int(finished.stdout)} on host gpu-node-7"):
        RunLock(tmp_path / ".lock").acquire()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "gpu-node-7"


def test_process_alive_tells_a_running_process_from_a_finished_one():
    from common.run import process_alive

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_alive(os.getpid())
    assert not process_alive(int(finished.stdout))


def test_model_soup_refuses_to_overwrite_an_ingredient_or_an_existing_file(three_step_run, tmp_path):
    ingredient = tmp_path / "lora_epoch0_step1.pt"
    shutil.copy(three_step_run / "ck" / "base" / "lora_epoch0_step1.pt", ingredient)
    shutil.copy(three_step_run / "ck" / "base" / "lora_epoch0_step2.pt", tmp_path / "b.pt")
    before = ingredient.read_bytes()
    soup = ["model_soup.py", f"--CKPTS={ingredient},{tmp_path / 'b.pt'}", "--MODEL_PATH=models/not-there"]
    result = run_script([*soup, f"--OUT={ingredient}", "--OVERWRITE=true"], check=False)
    refused(result, f"OUT={ingredient} is one of the CKPTS")
    (tmp_path / "soup.pt").write_text("an earlier soup")
    result = run_script([*soup, f"--OUT={tmp_path / 'soup.pt'}"], check=False)
    refused(result, "exists", "--OVERWRITE=true")
    assert ingredient.read_bytes() == before and (tmp_path / "soup.pt").read_text() == "an earlier soup"
