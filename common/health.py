"""A run's health: the symptoms of a run going wrong, read from its metrics, each said in one line.

Every trainer hands each step's metrics (an eval's arrive in the same dict, as ``eval/...`` keys) to
a HealthMonitor (common/run.py's TrainingRun does, in end_step). Each check below is a small pure
function of the recent metrics: it returns a Symptom (what it saw, with the numbers and the steps;
the likely cause; the constant to change) or None. A check whose metrics a trainer does not log
returns None: DPO has no rollouts, so no truncation check runs there.

The monitor prints ONE line per episode of a symptom, beginning ``health:``; a symptom absent for
EPISODE_GAP steps in a row has cleared, and its return is a new episode (a new line). The end of the
run sums the episodes up (``summary``). HEALTH (a constant of every trainer): "warn" prints, "stop"
also ends the run at the step that showed a new symptom (saved; exit status HEALTH_EXIT_STATUS),
"off" runs no check.

The thresholds are the named constants below, each with its reason; none fires on the recorded
demo runs (tests/test_health.py replays them).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable

HEALTH_MODES = ("warn", "stop", "off")
HEALTH_EXIT_STATUS = 3  # a run HEALTH=stop ended (1: a user error, 2: a bad setting, 128 + n: signal n)

# ----------------------------------------------------------------------------- windows
START_STEPS = 3  # "where the run started": the mean of its first 3 steps (one step alone is noisy)
RECENT_STEPS = 5  # "now": the mean of the last 5 steps, which averages one step's noise out
HISTORY_STEPS = 50  # the most steps any check looks back on
EPISODE_GAP = 5  # a symptom absent 5 steps in a row has cleared: a check near its threshold does not flap

# ----------------------------------------------------------------------------- thresholds
TRUNCATION_STEPS = 3  # the truncated share is read over the last 3 steps
TRUNCATION_SHARE = 0.2  # one completion in 5 cut at MAX_NEW_TOKENS: their rewards judge unfinished answers
#                         (the healthy demos cut under 1%)
NO_SIGNAL_STEPS = 5  # "for a while": 5 steps in a row
NO_SIGNAL_SPREAD = 1e-9  # a step's reward spread below this is rounding: every completion scored the same (PPO)
NO_SIGNAL_SHARE = 0.75  # 3 groups in 4 with every answer scored alike give no gradient: the step learns from the
#                         rest (the healthy GRPO demo's 5-step mean peaks at 48%)
COLLAPSE_FRACTION = 0.5  # accuracy or format rate below half of where the run started is a collapse, not noise
#                          (the demos' 5-step means never fall more than 13% below their start)
COLLAPSE_REWARD_STDS = 1.0  # the mean reward a whole standard deviation of the start's rewards below the start
ENTROPY_COLLAPSE_FRACTION = 0.1  # the policy's entropy at a tenth of its start: it samples one answer, no longer
#                                  explores (the demos' 5-step entropy stays above two thirds of its start)
GRAD_JUMP = 10.0  # a gradient norm 10x the median of the last steps' (the demos' largest jump is 4.5x)
GRAD_JUMP_HISTORY = 20  # the median over the last 20 steps' gradient norms ...
GRAD_JUMP_MIN_HISTORY = 3  # ... once there are 3 of them
UPDATE_RATIO_LIMIT = 0.5  # one step moved the adapter by half its size: the learning rate is far too large (the
#                           GRPO demo's steps move it by 0.1-0.35%; LR=1e3 by 100%)
ADAPTER_GROWTH = 3.0  # the adapter's norm x3 within ADAPTER_GROWTH_STEPS: growing without bound (a fresh adapter's
#                       norm is its random A's; the GRPO demo's grows 4% in 150 steps, at most 0.4% in 10)
ADAPTER_GROWTH_STEPS = 10
STILL_STEPS = 5  # "after several steps with a signal": 5 steps whose gradient was not zero
STILL_UPDATE_RATIO = 1e-6  # steps moving the adapter by under a millionth of its size: a thousand of them move it by
#                            a thousandth, nothing learnt (fp32 itself rounds away changes under ~6e-8)
KL_LIMIT = 0.25  # nats per answer token, over RECENT_STEPS: a 100-token answer e^25 times likelier under the policy
#                  than under the reference, far beyond what a working KL penalty allows (the PPO demo: under 0.05)
MISMATCH_GROWTH = 10.0  # the sampler/trainer log-prob gap 10x what it was at the start ...
MISMATCH_FLOOR = 0.01  # ... and above 0.01 per token, each token's probability 1% off (fp32 on the CPU: 6e-7)
FP16_CALIBRATION_STEPS = 10  # the loss scale starts at 2^16 and halves at each overflow until gradients fit:
#                              falls in the first 10 steps are that calibration, not a symptom
FP16_SCALE_FALLS = 3  # 3 falls of the loss scale within HISTORY_STEPS after calibration (once calibrated, it
#                       falls about once per 2,000 steps, when it tries doubling)
FP16_SKIPPED_IN_A_ROW = 5  # 5 steps in a row with a skipped update: fp16 cannot hold these gradients at any scale
HACK_REWARD_RISE = 0.1  # "the reward rose": by a tenth of the start's spread of rewards, more than a step's noise
HACK_ACCURACY_DROP = 0.1  # the reward up while the accuracy is 10 points below the start (the demos: at most 5)
HACK_REPETITION_RISE = 0.2  # the reward up while a fifth more of the lines repeat an earlier line than at the start
#                             (the GRPO demo's steps: at most 0.016)
HACK_LENGTH_GROWTH = 2.0  # the reward up, the accuracy not, and the answers twice as long as at the start
#                           (the demos' 5-step length stays within 7% of its start)


@dataclass(frozen=True)
class Symptom:
    """One finding: ``name`` (the symptom, as the summary lists it), what was ``seen`` (numbers and
    steps), its likely ``cause`` and the constant(s) to ``change``."""

    name: str
    seen: str
    cause: str
    change: str

    def line(self) -> str:
        return f"health: {self.name}: {self.seen}; likely cause: {self.cause}; change {self.change}"


@dataclass(frozen=True)
class History:
    """What the checks read: the first START_STEPS training steps' metrics (``start``), the last
    HISTORY_STEPS' (``recent``, the newest last; an eval's keys on its step's dict) and the first
    eval's metrics (``first_eval``: step 0's, before any update, in a new run)."""

    start: list[dict]
    recent: list[dict]
    first_eval: dict | None


# ----------------------------------------------------------------------------- helpers
def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that hold ``key`` as a finite number."""
    found = [(row["step"], _number(row.get(key))) for row in rows]
    return [(step, value) for step, value in found if value is not None and math.isfinite(value)]


def _mean(points: list[tuple[int, float]]) -> float:
    return sum(value for _, value in points) / len(points)


def _steps(points: list[tuple[int, float]]) -> str:
    first, last = points[0][0], points[-1][0]
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _last(rows: list[dict], key: str, count: int) -> list[tuple[int, float]] | None:
    """The last ``count`` values of ``key``, or None when there are fewer."""
    points = series(rows, key)[-count:]
    return points if len(points) == count else None


def start_and_now(history: History, key: str) -> tuple[list, list] | None:
    """(the start's values, the last RECENT_STEPS values after the start) of ``key``, or None before
    there are both."""
    start = series(history.start, key)
    if len(start) < START_STEPS:
        return None
    now = [point for point in series(history.recent, key) if point[0] > start[-1][0]][-RECENT_STEPS:]
    return (start, now) if len(now) == RECENT_STEPS else None


def reward_rose(history: History) -> bool:
    """Whether the mean reward now is above the start's by more than HACK_REWARD_RISE of its spread."""
    windows, spread = start_and_now(history, "reward"), series(history.start, "reward_std")
    return bool(windows) and _mean(windows[1]) > _mean(windows[0]) + HACK_REWARD_RISE * (_mean(spread) if spread else 0)


# ----------------------------------------------------------------------------- the checks
def truncation(history: History) -> Symptom | None:
    points = _last(history.recent, "truncated", TRUNCATION_STEPS)
    if points is None or _mean(points) < TRUNCATION_SHARE:
        return None
    return Symptom("truncation", f"{_mean(points):.0%} of the completions cut at MAX_NEW_TOKENS over {_steps(points)}",
                   "the answers need more tokens than the limit, and a cut answer is scored unfinished",
                   "MAX_NEW_TOKENS (raise it)")


def no_learning_signal(history: History) -> Symptom | None:
    zero = _last(history.recent, "zero_adv_groups", NO_SIGNAL_STEPS)
    if zero is not None:
        if _mean(zero) < NO_SIGNAL_SHARE:
            return None
        seen = f"{_mean(zero):.0%} of the groups scored alike (zero advantage, no gradient) over {_steps(zero)}"
    else:  # no groups (PPO): every completion of the step scored alike
        spread = _last(history.recent, "reward_std", NO_SIGNAL_STEPS)
        if spread is None or any(value > NO_SIGNAL_SPREAD for _, value in spread):
            return None
        seen = f"every completion got the same reward over {_steps(spread)}"
    return Symptom("no learning signal", seen,
                   "each question's answers are all right (too easy), all wrong (too hard), or the reward does "
                   "not tell them apart",
                   "NUM_SAMPLES_PER_PROMPT (more answers per question), TEMPERATURE (more varied answers), or the "
                   "data's difficulty (TRAIN_FILE), or REWARD")


def collapse(history: History) -> Symptom | None:
    cause = "updates too large for the policy: it forgets what it could do"
    evals = series(([history.first_eval] if history.first_eval else []) + history.recent, "eval/accuracy")
    if len(evals) >= 2 and evals[-1][0] > evals[0][0] and evals[-1][1] < COLLAPSE_FRACTION * evals[0][1]:
        return Symptom("collapse", f"eval accuracy fell from {evals[0][1]:.1%} (step {evals[0][0]}) to "
                                   f"{evals[-1][1]:.1%} (step {evals[-1][0]})", cause, "LR (lower it)")
    for key, what in (("format_rate", "format rate"), ("accuracy", "training accuracy")):  # the reward up: hacking
        windows = start_and_now(history, key)
        if windows and not reward_rose(history) and _mean(windows[1]) < COLLAPSE_FRACTION * _mean(windows[0]):
            start, now = windows
            return Symptom("collapse", f"the {what} fell from {_mean(start):.2f} ({_steps(start)}) to "
                                       f"{_mean(now):.2f} ({_steps(now)})", cause, "LR (lower it), TEMPERATURE (lower it)")
    reward, spread = start_and_now(history, "reward"), series(history.start, "reward_std")
    if reward and spread:
        start, now = reward
        if _mean(now) < _mean(start) - COLLAPSE_REWARD_STDS * _mean(spread):
            return Symptom("collapse", f"the mean reward fell from {_mean(start):.3f} ({_steps(start)}) to "
                                       f"{_mean(now):.3f} ({_steps(now)})", cause, "LR (lower it), TEMPERATURE (lower it)")
    windows = start_and_now(history, "entropy")
    if windows and _mean(windows[1]) < ENTROPY_COLLAPSE_FRACTION * _mean(windows[0]):
        start, now = windows
        return Symptom("collapse", f"the entropy fell from {_mean(start):.3g} ({_steps(start)}) to "
                                   f"{_mean(now):.3g} ({_steps(now)})",
                       "the policy samples a single answer and no longer explores",
                       "TEMPERATURE (raise it), LR (lower it)")
    return None


def exploding_updates(history: History) -> Symptom | None:
    cause = "the learning rate is too large for this model and data"
    change = "LR (lower it), GRAD_CLIP (lower it)"
    last = history.recent[-1]
    fp16 = "loss_scale" in last  # overflows are the loss scaler's business: fp16_loss_scale reads them
    if not fp16:
        bad = [key for key, value in last.items() if _number(value) is not None and not math.isfinite(value)]
        if bad:
            return Symptom("exploding updates", f"non-finite {', '.join(bad)} at step {last['step']}", cause, change)
        skipped = series(history.recent[-2:], "skipped_updates")
        if len(skipped) == 2 and skipped[1][1] > skipped[0][1]:
            return Symptom("exploding updates", f"{skipped[1][1] - skipped[0][1]:.0f} update(s) skipped at step "
                                                f"{last['step']} (non-finite loss or gradient)", cause, change)
    norms = series(history.recent, "grad_norm")
    if norms and norms[-1][0] == last["step"]:
        earlier = [point for point in norms[:-1] if point[1] > 0][-GRAD_JUMP_HISTORY:]
        if len(earlier) >= GRAD_JUMP_MIN_HISTORY:
            median = statistics.median(value for _, value in earlier)
            if norms[-1][1] > GRAD_JUMP * median:
                return Symptom("exploding updates",
                               f"gradient norm {norms[-1][1]:.3g} at step {last['step']}, {norms[-1][1] / median:.0f}x "
                               f"the median {median:.3g} of {_steps(earlier)}", cause, change)
    size, update = _number(last.get("lora_norm")), _number(last.get("lora_update_norm"))
    if size and update is not None and update > UPDATE_RATIO_LIMIT * size:
        return Symptom("exploding updates", f"step {last['step']} moved the LoRA by {update:.3g}, {update / size:.0%} "
                                            f"of its norm {size:.3g}", cause, change)
    sizes = series(history.recent, "lora_norm")[-ADAPTER_GROWTH_STEPS - 1:]
    if len(sizes) > ADAPTER_GROWTH_STEPS and sizes[0][1] > 0 and sizes[-1][1] > ADAPTER_GROWTH * sizes[0][1]:
        return Symptom("exploding updates", f"the LoRA's norm grew from {sizes[0][1]:.3g} to {sizes[-1][1]:.3g} over "
                                            f"{_steps(sizes)}", cause, change)
    return None


def adapter_not_moving(history: History) -> Symptom | None:
    rows = [row for row in history.recent if (_number(row.get("grad_norm")) or 0) > 0
            and _number(row.get("lora_norm")) is not None]  # steps with a signal
    if len(rows) < STILL_STEPS:
        return None
    rows = rows[-STILL_STEPS:]
    steps = _steps([(row["step"], 0.0) for row in rows])
    if all(row.get("lora_b_norm") == 0 for row in rows):
        seen = f"LoRA B still exactly zero after {steps}, each with a gradient"
    else:
        ratios = [row["lora_update_norm"] / row["lora_norm"] for row in rows
                  if _number(row.get("lora_update_norm")) is not None and row["lora_norm"] > 0]
        if len(ratios) < STILL_STEPS or max(ratios) >= STILL_UPDATE_RATIO:
            return None
        seen = f"each of {steps} moved the LoRA by under {max(ratios):.1e} of its norm, with a gradient"
    return Symptom("adapter not moving", seen, "a learning rate too small for the updates to change the adapter",
                   "LR (raise it)")


def kl_runaway(history: History) -> Symptom | None:
    points = _last(history.recent, "kl", RECENT_STEPS)
    if points is None or _mean(points) <= KL_LIMIT:
        return None
    return Symptom("KL runaway", f"KL to the reference {_mean(points):.3g} nats per token over {_steps(points)}",
                   "the KL penalty is too weak to keep the policy near the reference", "KL_COEF (raise it), or LR")


def logprob_mismatch(history: History) -> Symptom | None:
    windows = start_and_now(history, "logprob_mismatch_mean")
    if not windows:
        return None
    start, now = windows
    if _mean(now) < MISMATCH_FLOOR or _mean(now) < MISMATCH_GROWTH * _mean(start):
        return None
    return Symptom("log-prob mismatch", f"the sampler's and the trainer's log-probs differ by {_mean(now):.3g} per "
                                        f"token over {_steps(now)}, {_mean(now) / max(_mean(start), 1e-12):.0f}x "
                                        f"the start's {_mean(start):.2g}",
                   "the low-precision sampler drifts from the trainer: the updates are off-policy",
                   "DTYPE (float32), IMPORTANCE_CORRECTION (tis)")


def fp16_loss_scale(history: History) -> Symptom | None:
    scales = series(history.recent, "loss_scale")
    if not scales:
        return None
    change = "DTYPE=float32 (or bfloat16 on a card that has it)"
    cause = "the gradients overflow fp16's range"
    skipped = series(history.recent, "skipped_updates")[-FP16_SKIPPED_IN_A_ROW - 1:]
    if len(skipped) > FP16_SKIPPED_IN_A_ROW and all(b[1] > a[1] for a, b in zip(skipped, skipped[1:])):
        return Symptom("fp16 loss scale", f"an update skipped at each of {_steps(skipped[1:])} (the loss scale now "
                                          f"{scales[-1][1]:g})", cause, change)
    falls = [b for a, b in zip(scales, scales[1:]) if b[1] < a[1] and b[0] > FP16_CALIBRATION_STEPS]
    if len(falls) >= FP16_SCALE_FALLS:
        return Symptom("fp16 loss scale", f"the loss scale fell {len(falls)} times, at steps "
                                          f"{', '.join(str(step) for step, _ in falls)}, to {scales[-1][1]:g}",
                       cause, change)
    return None


def reward_hacking(history: History) -> Symptom | None:
    if not reward_rose(history):
        return None
    start, now = start_and_now(history, "reward")
    rose = f"the mean reward rose from {_mean(start):.3f} ({_steps(start)}) to {_mean(now):.3f} ({_steps(now)})"
    cause = "the reward pays for something other than correct answers"
    accuracy = start_and_now(history, "accuracy")
    if accuracy and _mean(accuracy[1]) < _mean(accuracy[0]) - HACK_ACCURACY_DROP:
        return Symptom("reward hacking", f"{rose} while the accuracy fell from {_mean(accuracy[0]):.2f} to "
                                         f"{_mean(accuracy[1]):.2f}", cause, "REWARD")
    repetition = start_and_now(history, "repetition")
    if repetition and _mean(repetition[1]) > _mean(repetition[0]) + HACK_REPETITION_RISE:
        return Symptom("reward hacking", f"{rose} while the share of repeated lines rose from "
                                         f"{_mean(repetition[0]):.2f} to {_mean(repetition[1]):.2f}", cause, "REWARD")
    length = start_and_now(history, "completion_len")
    if (length and _mean(length[1]) > HACK_LENGTH_GROWTH * _mean(length[0])
            and not (accuracy and _mean(accuracy[1]) > _mean(accuracy[0]))):
        return Symptom("reward hacking", f"{rose} while the answers grew from {_mean(length[0]):.1f} to "
                                         f"{_mean(length[1]):.1f} tokens and the accuracy did not rise",
                       cause, "REWARD")
    return None


# The checks, the likely root causes first: the first line a user reads names what to change first.
CHECKS: tuple[Callable[[History], Symptom | None], ...] = (
    exploding_updates, fp16_loss_scale, adapter_not_moving, collapse, kl_runaway, logprob_mismatch,
    reward_hacking, no_learning_signal, truncation)


class HealthMonitor:
    """Feed it each step's metrics (``observe``): it returns the ``health:`` lines of the symptoms
    that begin an episode at that step (none for HEALTH=off). ``summary()``: the episodes seen."""

    def __init__(self, mode: str = "warn"):
        if mode not in HEALTH_MODES:
            raise ValueError(f"HEALTH must be one of {', '.join(HEALTH_MODES)}, got {mode!r}")
        self.mode = mode
        self.start: list[dict] = []
        self.recent: deque[dict] = deque(maxlen=HISTORY_STEPS)
        self.first_eval: dict | None = None
        self.episodes: dict[str, list[list[int]]] = {}  # symptom -> [first step, last step] of each episode

    def observe(self, metrics: dict) -> list[str]:
        if self.mode == "off":
            return []
        if self.first_eval is None and "eval/accuracy" in metrics:
            self.first_eval = dict(metrics)
        step = metrics["step"]
        if step < 1:
            return []  # step 0's eval: the baseline, nothing trained yet
        if len(self.start) < START_STEPS:
            self.start.append(dict(metrics))
        self.recent.append(dict(metrics))
        history = History(self.start, list(self.recent), self.first_eval)
        lines = []
        for check in CHECKS:
            symptom = check(history)
            if symptom is None:
                continue
            episodes = self.episodes.setdefault(symptom.name, [])
            if episodes and step - episodes[-1][1] <= EPISODE_GAP:
                episodes[-1][1] = step
            else:
                episodes.append([step, step])
                lines.append(symptom.line())
        return lines

    def summary(self) -> str:
        """The symptoms seen, each with its episodes' steps ("" when none: a healthy run says nothing)."""
        if not self.episodes:
            return ""
        seen = ", ".join(f"{name} ({'step' if spans == [[spans[0][0]] * 2] else 'steps'} "
                         + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) + ")"
                         for name, spans in self.episodes.items())
        count = len(self.episodes)
        return f"health: {count} symptom{'s' if count > 1 else ''} seen: {seen}"
