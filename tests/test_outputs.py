"""Where the scripts write (issue 31): every output is checked before any work (writable, and refused when it
exists unless OVERWRITE=true), a stop signal ends eval_math.py, make_dpo_pairs.py and model_soup.py with one
line saying what was kept, and the fixable faults met on the way (a truncated adapter, a missing model folder,
a PEFT folder without its config, rows without their gold answer, a file that is not JSON Lines) are one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint import save_checkpoint
from common.lora import apply_lora
from common.model import load_model_and_tokenizer
from common.peft_io import save_peft_adapter
from common.run import RunError, check_output, stop_quietly_on_signal
from tests.conftest import REPO_ROOT, run_script

TARGETS = ("q_proj", "v_proj")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The failed script's message: exit status 1, no traceback, one ``error:`` line (what follows it, if
    anything, is the indented detail of that one message)."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def lora_files(micro_model_dir, tmp_path_factory):
    """Two LoRA checkpoints of the micro model (random factors, as a trainer writes them)."""
    import torch

    directory = tmp_path_factory.mktemp("lora")
    paths = []
    for seed in (1, 2):
        model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
        apply_lora(model, 2, 4.0, TARGETS)
        torch.manual_seed(seed)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data.normal_(0, 0.1)
        paths.append(save_checkpoint(directory / f"lora_epoch0_step{seed}.pt", model, micro_model_dir, config={},
                                     step=seed))
    return paths


# ------------------------------------------------------------------ the shared check (common/run.py)

def test_check_output_refuses_what_would_fail_or_be_replaced(tmp_path):
    out = check_output(tmp_path / "new" / "deeper" / "out.jsonl", "OUT_FILE", False)
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []  # the folder made, the probe gone
    out.write_text("old")
    with pytest.raises(RunError, match=r"^OUT_FILE=.*out\.jsonl exists; give another --OUT_FILE, or replace it "
                                       r"with --OVERWRITE=true$"):
        check_output(out, "OUT_FILE", False)
    check_output(out, "OUT_FILE", True)
    assert out.read_text() == "old"  # checked, never touched
    summary = out.with_suffix(".summary.json")
    summary.write_text("{}")
    out.unlink()
    with pytest.raises(RunError, match=r"the file beside it, .*out\.summary\.json, exists"):
        check_output(out, "OUT_FILE", False, companions=(summary,))
    with pytest.raises(RunError, match=r"is a file, not a folder; give --OUT_FILE a path you can write"):
        check_output(summary / "x.jsonl", "OUT_FILE", True)
    with pytest.raises(RunError, match=r"^OUT_FILE=.* is a folder, where a file is written"):
        check_output(tmp_path / "new", "OUT_FILE", True)
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir(), full.mkdir(), (full / "adapter_config.json").write_text("{}")
    check_output(empty, "PEFT_DIR", False, folder=True)
    with pytest.raises(RunError, match=r"^PEFT_DIR=.*full exists"):
        check_output(full, "PEFT_DIR", False, folder=True)
    check_output(full, "PEFT_DIR", True, folder=True)


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="POSIX permissions; root writes anywhere")
def test_check_output_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(RunError, match=r"^OUT=.*soup\.pt: the folder .*locked is not writable: Permission "
                                           r"denied; give --OUT a path you can write$"):
            check_output(locked / "soup.pt", "OUT", False)
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------ each script, before any work

def test_model_soup_refuses_its_out_before_evaluating_anything(lora_files, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where OUT's folder would be")
    soup = ["model_soup.py", f"--CKPTS={lora_files[0]},{lora_files[1]}", "--DEVICE=cpu", "--MAX_NEW_TOKENS=4",
            "--DEV_LIMIT=2", "--TEST_LIMIT=2"]
    started = time.perf_counter()
    refused = run_script([*soup, f"--OUT={blocker / 'soup.pt'}"], check=False)
    assert "blocker is a file, not a folder" in one_line_error(refused)
    assert " on dev" not in refused.stdout and "ingredients on" not in refused.stdout  # nothing evaluated
    assert time.perf_counter() - started < 60

    out = tmp_path / "soup.pt"
    out.with_suffix(".summary.json").write_text("an earlier soup's table")
    refused = run_script([*soup, f"--OUT={out}"], check=False)
    assert "soup.summary.json, exists; give another --OUT, or replace it with --OVERWRITE=true" in one_line_error(refused)
    assert " on dev" not in refused.stdout and not out.exists()
    run_script([*soup, f"--OUT={out}", "--OVERWRITE=true"])
    assert out.is_file() and json.loads(out.with_suffix(".summary.json").read_text())["soup"]["path"] == str(out)


def test_export_lora_never_replaces_an_adapter_in_silence(lora_files, tmp_path):
    peft_dir = tmp_path / "adapter"
    run_script(["export_lora.py", f"--LORA_CKPT={lora_files[0]}", f"--PEFT_DIR={peft_dir}"])
    first = (peft_dir / "adapter_model.safetensors").read_bytes()
    refused = run_script(["export_lora.py", f"--LORA_CKPT={lora_files[1]}", f"--PEFT_DIR={peft_dir}"], check=False)
    assert one_line_error(refused) == (f"error: PEFT_DIR={peft_dir} exists; give another --PEFT_DIR, or replace "
                                       f"it with --OVERWRITE=true")
    assert "loaded" not in refused.stdout and (peft_dir / "adapter_model.safetensors").read_bytes() == first
    run_script(["export_lora.py", f"--LORA_CKPT={lora_files[1]}", f"--PEFT_DIR={peft_dir}", "--OVERWRITE=true"])
    assert (peft_dir / "adapter_model.safetensors").read_bytes() != first

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    refused = run_script(["export_lora.py", f"--LORA_CKPT={lora_files[0]}", f"--MERGED_DIR={blocker / 'merged'}"],
                         check=False)
    assert one_line_error(refused).startswith(f"error: MERGED_DIR={blocker / 'merged'}: the folder")


def test_plot_metrics_checks_its_out_file_first(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps({"step": step, "reward": 0.1 * step}) + "\n" for step in range(1, 4)))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    refused = run_script(["plot_metrics.py", f"--RUNS={run}", f"--OUT_FILE={blocker / 'm.png'}"], check=False)
    assert "blocker is a file, not a folder" in one_line_error(refused)
    out = tmp_path / "m.png"
    out.write_bytes(b"an earlier figure")
    refused = run_script(["plot_metrics.py", f"--RUNS={run}", f"--OUT_FILE={out}"], check=False)
    assert one_line_error(refused).endswith("m.png exists; give another --OUT_FILE, or replace it with --OVERWRITE=true")
    assert out.read_bytes() == b"an earlier figure"
    run_script(["plot_metrics.py", f"--RUNS={run}", f"--OUT_FILE={out}", "--OVERWRITE=true"])
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("script", ["eval_math.py", "eval_math_base.py"])
def test_eval_math_never_replaces_an_earlier_eval_in_silence(micro_model_dir, tmp_path, script):
    out = tmp_path / "base.jsonl"
    out.write_text('{"a 500-problem baseline": true}\n')
    evaluation = [script, f"--MODEL_PATH={micro_model_dir}", "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=2",
                  "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", f"--OUT_FILE={out}"]
    refused = run_script(evaluation, check=False)
    assert one_line_error(refused) == (f"error: OUT_FILE={out} exists; give another --OUT_FILE, or replace it with "
                                       f"--OVERWRITE=true")
    assert "evaluating" not in refused.stdout and out.read_text() == '{"a 500-problem baseline": true}\n'
    run_script([*evaluation, "--OVERWRITE=true"])
    assert len(out.read_text().splitlines()) == 2 and out.with_suffix(".summary.json").is_file()


def test_make_dpo_pairs_checks_its_out_file_before_sampling(micro_model_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text("earlier pairs\n")
    refused = run_script(["make_dpo_pairs.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                          "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=2", "--NUM_SAMPLES_PER_PROMPT=2",
                          "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", f"--OUT_FILE={out}"], check=False)
    assert one_line_error(refused).endswith("pairs.jsonl exists; give another --OUT_FILE, or replace it with "
                                            "--OVERWRITE=true")
    assert "samples each" not in refused.stdout and out.read_text() == "earlier pairs\n"


# ------------------------------------------------------------------ stop signals

def interrupted(command: list[str], started: str, signal_number: int) -> subprocess.CompletedProcess:
    """Run ``command``; once its stdout shows ``started`` (the work has begun), send ``signal_number``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    process = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if started in line:
            break
    assert process.poll() is None, (seen, process.communicate())
    time.sleep(0.5)  # into the work itself
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, "".join(seen) + stdout, stderr)


def stop_line(result: subprocess.CompletedProcess, signal_number: int) -> str:
    assert result.returncode == 128 + signal_number, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(signal.Signals(signal_number).name)]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_eval_says_it_wrote_nothing(micro_model_dir, tmp_path, signal_number):
    out = tmp_path / "eval.jsonl"
    result = interrupted(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", "--EVAL_FILE=data/synth_test.jsonl",
                          "--EVAL_BATCH_SIZE=1", "--MAX_NEW_TOKENS=64", "--DEVICE=cpu", f"--OUT_FILE={out}"],
                         "evaluating", signal_number)
    assert stop_line(result, signal_number) == f"{signal.Signals(signal_number).name}: stopped; nothing written"
    assert list(tmp_path.iterdir()) == []


def test_stopped_pairs_and_soup_say_they_wrote_nothing(micro_model_dir, lora_files, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = interrupted(["make_dpo_pairs.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                          "--EVAL_FILE=data/synth_test.jsonl", "--BATCH_SIZE=1", "--NUM_SAMPLES_PER_PROMPT=2",
                          "--MAX_NEW_TOKENS=64", "--DEVICE=cpu", f"--OUT_FILE={out}"], "samples each", signal.SIGTERM)
    assert stop_line(result, signal.SIGTERM) == "SIGTERM: stopped; nothing written"
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "soup" / "soup.pt"
    result = interrupted(["model_soup.py", f"--CKPTS={lora_files[0]},{lora_files[1]}", "--DEVICE=cpu",
                          "--BATCH_SIZE=1", "--MAX_NEW_TOKENS=64", f"--OUT={out}"], "ingredients on", signal.SIGINT)
    assert stop_line(result, signal.SIGINT) == "SIGINT: stopped; nothing written"
    assert list(out.parent.iterdir()) == []


def test_the_stop_line_names_what_was_written_and_what_was_not(tmp_path, capfd):
    records, summary = tmp_path / "eval.jsonl", tmp_path / "eval.summary.json"
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_quietly_on_signal([records], [records, summary])
        with pytest.raises(SystemExit) as stopped:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    assert stopped.value.code == 143
    assert capfd.readouterr().err.strip() == f"SIGTERM: stopped; kept {records} ({summary} not written)"


# ------------------------------------------------------------------ one line for each fixable fault

def test_a_truncated_adapter_is_one_line(micro_model_dir, lora_files, tmp_path):
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    apply_lora(model, 2, 4.0, TARGETS)
    adapter = save_peft_adapter(model, tmp_path / "adapter", str(micro_model_dir))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # the header cut short: safetensors' "incomplete metadata"
    refused = run_script(["export_lora.py", f"--LORA_CKPT={adapter}", f"--PEFT_DIR={tmp_path / 'out'}"], check=False)
    assert one_line_error(refused).startswith(f"error: {weights}: cut short: 40 bytes, its header alone needs ")
    assert one_line_error(refused).endswith("; export or copy the adapter again")


def test_a_peft_folder_without_its_config_says_so(micro_model_dir, lora_files, tmp_path):
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    apply_lora(model, 2, 4.0, TARGETS)
    adapter = save_peft_adapter(model, tmp_path / "adapter", str(micro_model_dir))
    (adapter / "adapter_config.json").unlink()
    refused = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--LORA_CKPT={adapter}",
                          "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=1", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu",
                          f"--OUT_FILE={tmp_path / 'eval.jsonl'}"], check=False)
    assert one_line_error(refused) == (f"error: {adapter} holds adapter_model.safetensors but no adapter_config.json: "
                                       f"a PEFT adapter folder needs both; copy the adapter's adapter_config.json "
                                       f"beside it")


def test_plan_memory_on_a_missing_model_folder_prints_the_download_command():
    result = run_script(["plan_memory.py", "--MODEL_PATH=models/gemma-2-2b-it-absent"], check=False)
    assert one_line_error(result) == "error: model directory 'models/gemma-2-2b-it-absent' not found."
    assert "hf download google/gemma-2-2b-it --local-dir models/gemma-2-2b-it" in result.stderr
    assert "--MODEL_PATH=models/tiny-gemma2-math" in result.stderr


@pytest.mark.parametrize("lines, expected", [
    (['{"question": "Sum?", "solution": "We add 2 and 3."}'] * 2,
     "{path}:1: no 'gold_answer' or 'answer' field, and the next gold field it has, 'solution', holds 'We add 2 and 3.', not a "
     "number; the line's fields are question, solution: name the one that holds the gold answer with GOLD_FIELD"),
    (['[{"question": "Sum?", "gold_answer": 5},', '{"question": "Product?", "gold_answer": 6}]'],
     "{path}:1: bad JSON (Expecting value at column 1): {path} must be JSON Lines, one JSON object per line; it "
     "looks like a JSON array: write each element on a line of its own"),
    (["question,gold_answer", "Sum?,5", "Product?,6"],
     "{path}:1: bad JSON (Expecting value at column 1): {path} must be JSON Lines, one JSON object per line; it "
     "looks like CSV or plain text: write each row as a JSON object"),
], ids=["no-gold", "json-array", "csv"])
def test_a_data_file_that_misleads_no_more(micro_model_dir, tmp_path, lines, expected):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    refused = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--EVAL_FILE={path}", "--DEVICE=cpu",
                          f"--OUT_FILE={tmp_path / 'out.jsonl'}"], check=False)
    assert one_line_error(refused) == "error: " + expected.format(path=path)
