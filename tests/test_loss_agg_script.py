"""LOSS_AGG end to end: run_train_grpo.py, as a user runs it, with each aggregation, for two steps.

The update is accumulated over micro-batches with the whole step's normaliser, so for every LOSS_AGG
the first update's gradients (recorded at the first optimizer step, before AdamW, by
tests.test_packing_scripts' FIRST_GRADIENT_RECORDER) with several micro-batches equal the one
micro-batch's to 1e-5. That alone would also pass with a wrong normaliser that is still the step's
(the script's normaliser arguments swapped, seq_mean dividing by tokens), so the test also checks
the normaliser grpo_loss is given against the step's own counts (NORMALIZER_RECORDER), and that the
three aggregations give different gradients from the same rollouts (each choice reaches the update).
"""

import json

import pytest
import torch

from grpo.loss import LOSS_AGGREGATIONS
from tests.conftest import TINY_MODEL_DIR, run_script
from tests.test_packing_scripts import FIRST_GRADIENT_RECORDER

MAX_NEW_TOKENS = 40
# The tiny model, so that rewards differ within groups (a random micro model scores all 0: no update).
RUN = [f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl", "--EVAL_FILE=data/synth_test.jsonl",
       "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=4", "--NUM_SAMPLES_PER_PROMPT=4", f"--MAX_NEW_TOKENS={MAX_NEW_TOKENS}",
       "--LORA_R=4", "--DEVICE=cpu", "--MAX_STEPS=2", "--EVAL_EVERY=0"]
MICRO_BATCH_SIZES = {"one": 16, "several": 2}  # one micro-batch holds the step's 16 sequences

# Prints, at exit, each grpo_loss call's completions (rows of its mask), answer tokens and normaliser.
NORMALIZER_RECORDER = (
    "import atexit, inspect, json, grpo.loss\n"
    "calls = []\n"
    "_loss = grpo.loss.grpo_loss\n"
    "def recorded_loss(*args, **kwargs):\n"
    "    given = inspect.signature(_loss).bind(*args, **kwargs).arguments\n"
    "    mask = given['completion_mask']\n"
    "    calls.append([mask.shape[0], float(mask.sum()), float(given['normalizer'])])\n"
    "    return _loss(*args, **kwargs)\n"
    "grpo.loss.grpo_loss = recorded_loss\n"
    "atexit.register(lambda: print('grpo_loss calls: ' + json.dumps(calls)))\n"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(LOSS_AGG, "one" | "several"): (first gradients, logged metrics, grpo_loss calls)}: six runs."""
    out = tmp_path_factory.mktemp("loss_agg")
    results = {}
    for loss_agg in LOSS_AGGREGATIONS:
        for name, micro_batch_size in MICRO_BATCH_SIZES.items():
            run_name = f"{loss_agg}_{name}"
            result = run_script(["-c", NORMALIZER_RECORDER + FIRST_GRADIENT_RECORDER, str(out / f"{run_name}.pt"),
                                 "run_train_grpo.py", *RUN, f"--LOSS_AGG={loss_agg}",
                                 f"--MICRO_BATCH_SIZE={micro_batch_size}", f"--CHECKPOINT_DIR={out}",
                                 f"--LOG_DIR={out}", f"--RUN_NAME={run_name}"])
            metrics = [json.loads(line) for line in (out / f"{run_name}.jsonl").read_text().splitlines()]
            calls = json.loads(result.stdout.rsplit("grpo_loss calls: ", 1)[1].splitlines()[0])
            results[loss_agg, name] = torch.load(out / f"{run_name}.pt", weights_only=True), metrics, calls
    return results


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_several_micro_batches_give_the_one_micro_batch_update(runs, loss_agg):
    (one, one_metrics, _), (several, several_metrics, _) = runs[loss_agg, "one"], runs[loss_agg, "several"]
    for metrics in (one_metrics, several_metrics):
        assert [m["step"] for m in metrics] == [1, 2]
    assert one_metrics[0]["policy_micro_batches"] == 1 < several_metrics[0]["policy_micro_batches"]
    assert any(gradient.abs().sum() > 0 for gradient in one)
    for several_gradient, one_gradient in zip(several, one, strict=True):
        torch.testing.assert_close(several_gradient, one_gradient, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("name", MICRO_BATCH_SIZES)
def test_the_normaliser_is_the_steps_for_the_aggregation(runs, loss_agg, name):
    """Every micro-batch of the first update is divided by the whole step's answer tokens
    (token_mean), completions (seq_mean) or completions x MAX_NEW_TOKENS (seq_sum_const)."""
    _, metrics, calls = runs[loss_agg, name]
    first_update = calls[:metrics[0]["policy_micro_batches"]]  # NUM_ITERATIONS = 1: one call per micro-batch
    completions = sum(rows for rows, _, _ in first_update)
    tokens = sum(answer_tokens for _, answer_tokens, _ in first_update)
    expected = {"token_mean": tokens, "seq_mean": completions,
                "seq_sum_const": completions * MAX_NEW_TOKENS}[loss_agg]
    assert tokens > completions > 0  # answers longer than one token: the three normalisers differ
    assert [normalizer for _, _, normalizer in first_update] == [expected] * len(first_update)


def test_the_aggregations_give_different_updates(runs):
    """From the same rollouts (same seed), each pair of aggregations gives first gradients that
    differ by far more than the tolerance of the micro-batch comparison."""
    rollouts = {(m[0]["reward"], m[0]["completion_len"]) for _, m, _ in (runs[agg, "one"] for agg in LOSS_AGGREGATIONS)}
    assert len(rollouts) == 1
    for index, first in enumerate(LOSS_AGGREGATIONS):
        for second in LOSS_AGGREGATIONS[index + 1:]:
            first_gradients, second_gradients = runs[first, "one"][0], runs[second, "one"][0]
            largest_difference = max((a - b).abs().max().item() for a, b in zip(first_gradients, second_gradients,
                                                                                  strict=True))
            assert largest_difference > 1e-3, (first, second)
