"""Reward and accuracy curves of training runs, from their metric files (logs/RUN_NAME.jsonl), to a PNG.

    python plot_metrics.py                                    # every run under logs/ -> logs/metrics.png
    python plot_metrics.py --RUNS=logs/demo-grpo.jsonl,logs/demo-ppo.jsonl --OUT_FILE=logs/grpo-vs-ppo.png

The trainers write a line per step ("step", "reward": the mean reward of the step's samples,
"accuracy": the share of them that is correct, ...) and, at every evaluation, the greedy accuracy
on held-out questions ("eval/accuracy", from common.evaluate.EvalResult.metrics). Three panels,
a curve per run: reward and sampled accuracy per step (moving averages over SMOOTHING steps), and
held-out accuracy at each evaluation. A run without some of these (DPO logs no reward) is left
out of that panel.

matplotlib is an optional dependency (`.venv/bin/pip install matplotlib`); without it the script
says so and stops.
"""

from pathlib import Path

from common.config import configure

# ---------------------------------------------------------------- constants
RUNS: tuple[str, ...] = ()  # metric files to plot (empty: every LOG_DIR/*.jsonl with reward or accuracy lines)
LOG_DIR = "logs"  # where the trainers write their metric files
SMOOTHING = 10  # steps per moving average of the per-step curves (1 = raw values)
OUT_FILE = "logs/metrics.png"  # the PNG written

config = configure(globals())
# ---------------------------------------------------------------------------

try:
    import matplotlib
except ImportError:
    raise SystemExit("error: plot_metrics.py needs matplotlib, an optional dependency not in requirements.txt; "
                     "install it with `.venv/bin/pip install matplotlib`") from None
matplotlib.use("Agg")  # writes files; needs no display
import matplotlib.pyplot as plt  # noqa: E402

from common.metrics_log import MetricsFileError, read_metrics  # noqa: E402

PER_STEP_PANELS = {"reward": "mean reward of the step's samples", "accuracy": "accuracy of the step's samples"}


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a metric file: "reward", "accuracy" and every "<prefix>/accuracy"
    (a torn last line, a killed run's, is left out with a warning: read_metrics)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    try:
        records = read_metrics(path)
    except MetricsFileError as error:
        raise SystemExit(f"error: {error}") from None
    for _, record in records:
        for key, value in record.items():
            wanted = key in PER_STEP_PANELS or key.endswith("/accuracy")
            if wanted and "step" in record and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((record["step"], value))
    return curves


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to window - 1 values before it."""
    averages = []
    for end in range(1, len(values) + 1):
        recent = values[max(0, end - window):end]
        averages.append(sum(recent) / len(recent))
    return averages


if RUNS:
    missing = [run for run in RUNS if not Path(run).is_file()]
    if missing:
        raise SystemExit(f"error: no such metric file: {', '.join(missing)}")
    runs = {Path(run).stem: read_curves(Path(run)) for run in RUNS}
else:
    runs = {path.stem: read_curves(path) for path in sorted(Path(LOG_DIR).glob("*.jsonl"))}
    runs = {name: curves for name, curves in runs.items() if curves}
if not runs:
    raise SystemExit(f"error: no metric file with reward or accuracy lines in {LOG_DIR}/ "
                     f"(train first, e.g. `make demo`, or name the files with --RUNS=)")

colors = {name: f"C{index % 10}" for index, name in enumerate(runs)}  # a run keeps its colour in every panel
figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
for axis, (metric, title) in zip(axes, PER_STEP_PANELS.items()):
    for name, curves in runs.items():
        if metric in curves:
            steps, values = zip(*curves[metric])
            axis.plot(steps, moving_average(list(values), SMOOTHING), color=colors[name], label=name)
    axis.set_title(f"{title} (moving average of {SMOOTHING})" if SMOOTHING > 1 else title)
held_out_axis = axes[2]
for name, curves in runs.items():
    for metric in sorted(key for key in curves if key.endswith("/accuracy")):
        steps, values = zip(*curves[metric])
        prefix = metric.removesuffix("/accuracy")
        held_out_axis.plot(steps, values, marker="o", color=colors[name],
                           label=name if prefix == "eval" else f"{name} ({prefix})")
held_out_axis.set_title("greedy accuracy on held-out questions")
for axis in axes:
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    if axis.has_data():
        axis.legend(fontsize="small")
figure.tight_layout()
Path(OUT_FILE).parent.mkdir(parents=True, exist_ok=True)
figure.savefig(OUT_FILE, dpi=120)
print(f"wrote {OUT_FILE} from {len(runs)} metric files: {', '.join(runs)}")
