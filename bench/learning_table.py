"""The learning table: base -> SFT -> GRPO, PPO, DPO and soup on the built-in tiny model, from fresh runs.

    python bench/learning_table.py          # about 30 minutes on 2 idle CPU cores

Every row is a fresh run with the default seeds, timed from start to end, and scored by greedy
accuracy on the same 500 held-out problems (data/synth_test.jsonl) with a 95% Wilson interval:

  base   the tiny Gemma 2 at its random initialisation (make_tiny_model.py with SFT_STEPS=0): the
         starting point of everything, which has never seen a problem;
  SFT    make_tiny_model.py rebuilding the tiny model from nothing (tokenizer, random Gemma 2,
         run_sft.py on all weights) into REBUILD_DIR; checked to equal the committed model
         models/tiny-gemma2-math bit for bit (the same seed), so the rows below, which start
         from the committed model, start from this SFT;
  GRPO, soup, PPO, DPO   `make demo`, `make demo-soup`, `make demo-ppo`, `make demo-dpo`: exactly
         the demos of docs/tiny-model.md (each target's time includes its evals; DPO's includes sampling its
         preference pairs, the soup's evaluating its three ingredients on dev and test).

Prints the table and writes it to OUT_FILE; each run's output goes to LOG_DIR/<row>.log.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

# Run as `python bench/learning_table.py`, Python puts bench/ on the path, not the repository root with common/.
repo_root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(repo_root))

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
REBUILD_DIR = "logs/bench/tiny-rebuild"  # where the base and SFT rows rebuild the tiny model
COMMITTED_MODEL = "models/tiny-gemma2-math"  # the model the demos start from
TEST_FILE = "data/synth_test.jsonl"  # the held-out problems every row is scored on
ROWS = ("base", "sft", "grpo", "soup", "ppo", "dpo")  # which rows to run, in this order
REBUILD_ARGS: tuple[str, ...] = ()  # extra make_tiny_model.py arguments of the base and SFT rebuilds (tests shrink them)
LOG_DIR = "logs/bench/learning"  # one log per row
OUT_FILE = "logs/bench/learning_table.json"  # the table as JSON

config = configure(globals())
# ---------------------------------------------------------------------------

from bench import markdown_table, write_results  # noqa: E402
from common.evaluate import wilson_interval  # noqa: E402

NUM_TEST_PROBLEMS = sum(1 for line in (repo_root / TEST_FILE).read_text().splitlines() if line.strip())
# Row -> (label, command, where its accuracy is read from after the run).
MAKE_TINY_MODEL = [sys.executable, "make_tiny_model.py", "--FORCE=true", *REBUILD_ARGS]
COMMANDS = {
    "base": ("base (random init)", MAKE_TINY_MODEL + [f"--OUT_DIR={REBUILD_DIR}/base", "--SFT_STEPS=0"]),
    "sft": ("SFT (make_tiny_model.py)", MAKE_TINY_MODEL + [f"--OUT_DIR={REBUILD_DIR}/sft"]),
    "grpo": ("GRPO (make demo)", ["make", "demo"]),
    "soup": ("uniform soup of GRPO steps 50/100/150 (make demo-soup)", ["make", "demo-soup"]),
    "ppo": ("PPO (make demo-ppo)", ["make", "demo-ppo"]),
    "dpo": ("DPO (make demo-dpo)", ["make", "demo-dpo"]),
}


def accuracy_of(row: str) -> tuple[int, int]:
    """(correct, total) of a finished row, from the files its run wrote."""
    if row in ("base", "sft"):
        info = json.loads((repo_root / REBUILD_DIR / row / "build_info.json").read_text())
        return round(info["accuracy"] * info["eval_total"]), info["eval_total"]
    if row == "soup":
        soup = json.loads((repo_root / "checkpoints/demo-soup/uniform.summary.json").read_text())["soup"]
        return round(soup["test_accuracy"] * NUM_TEST_PROBLEMS), NUM_TEST_PROBLEMS
    summary = json.loads((repo_root / f"logs/demo/{row}.summary.json").read_text())
    return round(summary["eval/accuracy"] * summary["eval/total"]), summary["eval/total"]


def same_weights(model_dir: Path, other_dir: Path) -> bool:
    from safetensors.torch import load_file
    mine, theirs = load_file(model_dir / "model.safetensors"), load_file(other_dir / "model.safetensors")
    return mine.keys() == theirs.keys() and all(mine[name].equal(theirs[name]) for name in mine)


unknown = [row for row in ROWS if row not in COMMANDS]
if unknown:
    raise SystemExit(f"error: unknown rows {unknown}; the rows are {list(COMMANDS)}")
log_dir = repo_root / LOG_DIR
log_dir.mkdir(parents=True, exist_ok=True)
table = []
for row in ROWS:
    label, command = COMMANDS[row]
    log_path = log_dir / f"{row}.log"
    print(f">> {label}: {' '.join(command)} (output in {log_path})", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(command, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {result.returncode}; see {log_path}")
    correct, total = accuracy_of(row)
    low, high = wilson_interval(correct, total)
    entry = {"row": row, "label": label, "accuracy": correct / total, "correct": correct, "total": total,
             "ci_low": low, "ci_high": high, "seconds": seconds}
    if row == "sft":
        entry["equals_committed_model"] = same_weights(repo_root / REBUILD_DIR / "sft", repo_root / COMMITTED_MODEL)
    table.append(entry)
    print(f"   {100 * entry['accuracy']:.1f}% ({correct}/{total}) in {seconds / 60:.1f} min", flush=True)

print("\n" + markdown_table(
    ["run", "accuracy", "95% CI", "wall time"],
    [[entry["label"], f"{100 * entry['accuracy']:.1f}%", f"{100 * entry['ci_low']:.1f}-{100 * entry['ci_high']:.1f}%",
      f"{entry['seconds'] / 60:.1f} min"] for entry in table]))
sft = next((entry for entry in table if entry["row"] == "sft"), None)
if sft is not None:
    print(f"rebuilt SFT model {'equals' if sft['equals_committed_model'] else 'DIFFERS FROM'} {COMMITTED_MODEL}")
out_path = write_results(repo_root / OUT_FILE, "learning_table", config,
                         {"test_problems": NUM_TEST_PROBLEMS, "rows": table})
print(f"table written to {out_path}")
