"""Reward and accuracy curves of training runs, from their metric files (logs/RUN_NAME.jsonl), to a PNG;
or pass@k against k from sampled evaluations (--PASS_AT_K).

    python plot_metrics.py                                    # every run under logs/ -> logs/metrics.png
    python plot_metrics.py --RUNS=logs/demo-grpo.jsonl,logs/demo-ppo.jsonl --OUT_FILE=logs/grpo-vs-ppo.png
    python plot_metrics.py --PASS_AT_K=logs/base.summary.json,logs/grpo.summary.json --OUT_FILE=logs/passk.png

The trainers write a line per step ("step", "reward": the mean reward of the step's samples,
"accuracy": the share of them that is correct, ...) and, at every evaluation, the greedy accuracy
on held-out questions ("eval/accuracy", lenient, and "eval/accuracy_strict", the answers given in the
requested format; from common.evaluate.EvalResult.metrics), with, when EVAL_TEMPERATURE > 0, the
sampled metrics ("eval/mean@k", "eval/pass@j", "eval/maj@k"). Three panels, a curve per run: reward
and sampled accuracy per step (moving averages over SMOOTHING steps), and held-out accuracy at each
evaluation: greedy lenient (solid, circles) and strict (solid, squares, labelled "strict"), and when
logged mean@k (dashed), pass@k for the largest k (dotted) and maj@k (dash-dot). A run without some of
these (DPO logs no reward) is left out of that panel.

PASS_AT_K names the summaries eval_math.py writes with TEMPERATURE > 0 (OUT_FILE's .summary.json):
one curve each of pass@j against j (log2 axis) with its 95% interval shaded, maj@k as a point at
k and, when the eval had GREEDY_TOO=true, the greedy accuracy as a dashed line (strict: dash-dot); e.g. the base
model and a GRPO checkpoint on one figure. Each curve's values are printed too.

matplotlib is an optional dependency (`.venv/bin/pip install matplotlib`); without it the script
says so and stops.
"""

import json
import re
from pathlib import Path

from common.config import configure

# ---------------------------------------------------------------- constants
RUNS: tuple[str, ...] = ()  # metric files to plot (empty: every LOG_DIR/*.jsonl with reward or accuracy lines)
LOG_DIR = "logs"  # where the trainers write their metric files
SMOOTHING = 10  # steps per moving average of the per-step curves (1 = raw values)
OUT_FILE = "logs/metrics.png"  # the PNG written
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)
PASS_AT_K: tuple[str, ...] = ()  # summaries of sampled evals (eval_math.py --TEMPERATURE > 0: its .summary.json) to
#                                   draw as pass@k against k instead of the training curves

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
from common.run import check_output  # noqa: E402

check_output(OUT_FILE, "OUT_FILE", OVERWRITE)  # before the files are read: a figure it cannot write is lost

PER_STEP_PANELS = {"reward": "mean reward of the step's samples", "accuracy": "accuracy of the step's samples (%)"}
# A sampled eval's metric: "eval/mean@16", "eval/pass@4", "eval/maj@16" (not their _ci_low / _ci_high).
SAMPLED_METRIC = re.compile(r"^(?P<prefix>.+)/(?P<name>mean|pass|maj)@(?P<k>\d+)$")
SAMPLED_STYLE = {"mean": "--", "pass": ":", "maj": "-."}  # beside greedy accuracy's solid line
GREEDY_METRIC_ENDINGS = ("/accuracy", "/accuracy_strict")  # lenient and strict greedy accuracy


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a metric file: "reward", "accuracy", every "<prefix>/accuracy"
    and "<prefix>/accuracy_strict", and every sampled metric ("<prefix>/mean@k", "<prefix>/pass@j", "<prefix>/maj@k"); a torn last line,
    a killed run's, is left out with a warning (read_metrics)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    try:
        records = read_metrics(path)
    except MetricsFileError as error:
        raise SystemExit(f"error: {error}") from None
    for _, record in records:
        for key, value in record.items():
            wanted = key in PER_STEP_PANELS or key.endswith(GREEDY_METRIC_ENDINGS) or SAMPLED_METRIC.match(key)
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


def _greedy_label(key: str) -> str:
    """" strict" for eval/accuracy_strict, " (<prefix>)" / " (<prefix>) strict" for another prefix's."""
    prefix, _, name = key.rpartition("/")
    return ("" if prefix == "eval" else f" ({prefix})") + (" strict" if name == "accuracy_strict" else "")


def held_out_curves(curves: dict) -> list[tuple[str, str, str, str]]:
    """(metric, label suffix, line style, marker) of a run's held-out curves: each greedy "<prefix>/accuracy"
    (circles) with its "<prefix>/accuracy_strict" (squares), then per prefix its mean@k, its pass@j of the
    largest j (pass@k) and its maj@k."""
    chosen = [(key, _greedy_label(key), "-", "s" if key.endswith("_strict") else "o")
              for key in sorted(key for key in curves if key.endswith(GREEDY_METRIC_ENDINGS))]
    sampled = {}
    for key in curves:
        match = SAMPLED_METRIC.match(key)
        if match and int(match["k"]) >= sampled.get((match["prefix"], match["name"]), (0, ""))[0]:
            sampled[(match["prefix"], match["name"])] = (int(match["k"]), key)
    order = list(SAMPLED_STYLE)  # mean, pass, maj
    for (prefix, name), (k, key) in sorted(sampled.items(), key=lambda item: (item[0][0], order.index(item[0][1]))):
        chosen.append((key, f" {name}@{k}" if prefix == "eval" else f" ({prefix}) {name}@{k}", SAMPLED_STYLE[name],
                       "o"))
    return chosen


def summary_label(summary: dict, settings: bool) -> str:
    """The model a summary evaluated (+ its LoRA), with its temperature and questions when ``settings``."""
    config = summary["config"]
    model = Path(config["MODEL_PATH"]).name + (f" + {config['LORA_CKPT']}" if config.get("LORA_CKPT") else "")
    return f"{model} (T={config['TEMPERATURE']:g}, {summary['eval/total']} questions)" if settings else model


def plot_pass_at_k(paths: tuple[str, ...], out_file: str) -> None:
    """pass@j against j for each summary, 95% intervals shaded, maj@k a point at k, greedy dashed."""
    summaries = [json.loads(Path(path).read_text()) for path in paths]
    settings = {(summary["config"].get("TEMPERATURE"), summary.get("eval/total")) for summary in summaries}
    figure, axis = plt.subplots(figsize=(7.5, 6))
    ticks, entries = set(), []  # entries: (artist, label), a model's together, for the legend's columns
    for index, (path, summary) in enumerate(zip(paths, summaries)):
        ks = sorted(int(m["k"]) for key in summary if (m := SAMPLED_METRIC.match(key)) and m["name"] == "pass")
        if not ks:
            raise SystemExit(f"error: {path} holds no pass@k: PASS_AT_K takes the summaries of sampled evals "
                             f"(eval_math.py --NUM_SAMPLES=16 --TEMPERATURE=1 ...)")
        color, label, k = f"C{index % 10}", summary_label(summary, len(settings) > 1), ks[-1]
        values = [100 * summary[f"eval/pass@{j}"] for j in ks]
        lows = [100 * summary[f"eval/pass@{j}_ci_low"] for j in ks]
        highs = [100 * summary[f"eval/pass@{j}_ci_high"] for j in ks]
        entries.append((axis.plot(ks, values, marker="o", color=color)[0], f"{label}: pass@k"))
        axis.fill_between(ks, lows, highs, color=color, alpha=0.15, linewidth=0)
        printed = [f"pass@{j} {value:.2f}% ({low:.1f}-{high:.1f})" for j, value, low, high in zip(ks, values, lows, highs)]
        if f"eval/maj@{k}" in summary:
            majority = [100 * summary[f"eval/maj@{k}{end}"] for end in ("", "_ci_low", "_ci_high")]
            bar = axis.errorbar([k], [majority[0]], yerr=[[majority[0] - majority[1]], [majority[2] - majority[0]]],
                                marker="s", markersize=7, color=color, capsize=4, linestyle="none")
            entries.append((bar, f"maj@{k} (majority vote of the {k})"))
            printed.append(f"maj@{k} {majority[0]:.2f}% ({majority[1]:.1f}-{majority[2]:.1f})")
        if "eval/accuracy" in summary:
            greedy = 100 * summary["eval/accuracy"]
            entries.append((axis.axhline(greedy, color=color, linestyle="--", linewidth=1), "greedy accuracy (T=0)"))
            printed.append(f"greedy {greedy:.2f}%")
        if "eval/accuracy_strict" in summary:
            strict = 100 * summary["eval/accuracy_strict"]
            entries.append((axis.axhline(strict, color=color, linestyle="-.", linewidth=1),
                            "greedy accuracy, strict (T=0)"))
            printed.append(f"greedy strict {strict:.2f}%")
        ticks.update(ks)
        print(f"{summary_label(summary, True)} [{path}]: {', '.join(printed)}")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
    axis.minorticks_off()
    axis.set_xlabel("k: samples per question (log scale)")
    axis.set_ylabel("held-out accuracy (%)")
    (temperature, questions), = settings if len(settings) == 1 else ((None, None),)
    shared = f" ({questions} held-out questions, T={temperature:g})" if temperature is not None else ""
    axis.set_title(f"pass@k, the chance that one of k samples is right{shared}\n"
                   "(shaded, and the bars: 95% bootstrap intervals over the questions)", fontsize="medium")
    axis.grid(alpha=0.3)
    # Below the axes, a column per model: nothing of the curves is hidden.
    axis.legend(*zip(*entries), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13),
                ncol=min(len(paths), 2))
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    print(f"wrote {out_file} from {len(paths)} summaries")


if PASS_AT_K:
    missing = [path for path in PASS_AT_K if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"error: no such summary file: {', '.join(missing)}")
    plot_pass_at_k(PASS_AT_K, OUT_FILE)
    raise SystemExit(0)

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
    scale = 100 if metric == "accuracy" else 1
    for name, curves in runs.items():
        if metric in curves:
            steps, values = zip(*curves[metric])
            axis.plot(steps, [scale * value for value in moving_average(list(values), SMOOTHING)],
                      color=colors[name], label=name)
    axis.set_title(f"{title} (moving average of {SMOOTHING})" if SMOOTHING > 1 else title)
held_out_axis = axes[2]
for name, curves in runs.items():
    held_out = held_out_curves(curves)
    for metric, suffix, style, marker in held_out:
        steps, values = zip(*curves[metric])
        held_out_axis.plot(steps, [100 * value for value in values], marker=marker, linestyle=style,
                           color=colors[name], label=f"{name}{suffix}")
    if held_out:
        print(f"{name}: held-out {', '.join(metric for metric, _, _, _ in held_out)}")
held_out_axis.set_title("held-out accuracy (%): greedy (lenient, strict), and sampled when logged")
axes[0].set_ylabel("reward")
axes[1].set_ylabel("accuracy (%)")
held_out_axis.set_ylabel("accuracy (%)")
for axis in axes:
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    if axis.has_data():
        axis.legend(fontsize="small")
figure.tight_layout()
figure.savefig(OUT_FILE, dpi=120)
print(f"wrote {OUT_FILE} from {len(runs)} metric files: {', '.join(runs)}")
