"""run_train_dpo.py and its log-prob helper: the answer mask, loss at step 0, smoke run, exact resume."""

import json
import math

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.data import load_problems, write_jsonl
from dpo.pairs import pack_pairs, pair_logprobs
from tests.conftest import TINY_MODEL_DIR, micro_model, run_script


@pytest.mark.parametrize("packing, pack_length", [(True, None), (True, 13), (False, None)])
def test_pair_logprobs_sum_exactly_the_answer_tokens(packing, pack_length):
    """Packed into one row, into rows of 13 tokens (7 + 6: two rows), or padded: each answer as if alone."""
    model = micro_model("gemma2", vocab_size=64)
    end = 1  # the answer-end token, in the loss like any answer token
    tokenized = [([2, 5, 6, 7], [9, 10, end], [11, end]),
                 ([2, 8], [12, 13, 14, 15, end], [16, 17, 18, end])]
    batch = pack_pairs(tokenized, pad_token_id=0, packing=packing, pack_length=pack_length)
    assert batch.layout.input_ids.size(0) == ({None: 1, 13: 2}[pack_length] if packing else 4)
    chosen, rejected, token_logps = pair_logprobs(model, batch, chunk_size=3)
    assert torch.all(token_logps[batch.answer_mask == 0] == 0)

    def naive(prompt, answer):
        ids = torch.tensor([prompt + answer])
        log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        # the logits at position p - 1 predict the token at position p
        return sum(log_probs[len(prompt) + j - 1, token] for j, token in enumerate(answer))

    with torch.no_grad():
        for row, (prompt, chosen_ids, rejected_ids) in enumerate(tokenized):
            torch.testing.assert_close(chosen[row], naive(prompt, chosen_ids), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rejected[row], naive(prompt, rejected_ids), atol=1e-5, rtol=1e-5)
    normalised_chosen, _, _ = pair_logprobs(model, pack_pairs(tokenized, 0), length_normalise=True)
    torch.testing.assert_close(normalised_chosen, chosen / torch.tensor([3.0, 5.0]))


def pairs_file(path, count):
    """``count`` pairs from the synthetic training set: its worked solution against a wrong answer."""
    problems = load_problems("data/synth_train.jsonl", limit=count)
    write_jsonl(path, [{"prompt": p["question"], "chosen": p["solution"],
                        "rejected": f"{p['gold_answer']} + 1 = {int(p['gold_answer']) + 1}\nAnswer: "
                                    f"{int(p['gold_answer']) + 1}", "gold_answer": p["gold_answer"]}
                       for p in problems])
    return path


def metrics_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_two_steps_on_micro_model(micro_model_dir, tmp_path):
    result = run_script(["run_train_dpo.py", f"--MODEL_PATH={micro_model_dir}",
                         f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 9)}",
                         "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=2", "--EVAL_EVERY=2", "--MAX_NEW_TOKENS=4",
                         "--BATCH_SIZE=3", "--MICRO_BATCH_SIZE=2", "--MAX_STEPS=2", "--LR=1e-2", "--WARMUP_STEPS=1",
                         "--LORA_R=2", "--RPO_ALPHA=0.5", "--DEVICE=cpu", f"--CHECKPOINT_DIR={tmp_path}",
                         f"--LOG_DIR={tmp_path}", "--RUN_NAME=smoke"])
    assert "step 2/2" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "smoke" / "lora_epoch0_step2.pt")
    assert checkpoint["step"] == 2 and checkpoint["config"]["RPO_ALPHA"] == 0.5
    metrics = metrics_of(tmp_path / "smoke.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[2]
    # The LoRA starts at B = 0: the policy is the reference, so every pair's loss is -log sigma(0).
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[1]["reward_margin"] == pytest.approx(0, abs=1e-5)
    for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
                "sft_loss", "grad_norm", "step_s", "elapsed_s"):
        assert key in metrics[2], key
    assert metrics[1]["sft_loss"] > 0 and metrics[1]["chosen_logp"] < 0


def test_ipo_with_per_batch_reference_starts_at_its_target(micro_model_dir, tmp_path):
    run_script(["run_train_dpo.py", f"--MODEL_PATH={micro_model_dir}",
                f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 4)}", "--EVAL_FILE=data/synth_test.jsonl",
                "--EVAL_EVERY=0", "--BATCH_SIZE=2", "--MICRO_BATCH_SIZE=1", "--MAX_STEPS=1", "--LORA_R=2",
                "--LOSS_TYPE=ipo", "--BETA=0.1", "--PRECOMPUTE_REF=False", "--DEVICE=cpu",
                f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=ipo"])
    assert metrics_of(tmp_path / "ipo.jsonl")[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-4)


TINY_RUN = [f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_EVERY=0",
            "--BATCH_SIZE=2", "--MICRO_BATCH_SIZE=1", "--MAX_STEPS=4", "--SAVE_EVERY=2", "--LORA_R=4", "--LR=1e-3",
            "--WARMUP_STEPS=1", "--DEVICE=cpu"]


def test_resume_equals_uninterrupted_run(tmp_path):
    train_file = f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 6)}"
    run_script(["run_train_dpo.py", *TINY_RUN, train_file, f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
                "--RUN_NAME=straight"])
    run_script(["run_train_dpo.py", *TINY_RUN, train_file, f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
                "--RUN_NAME=resumed", f"--RESUME={tmp_path / 'straight' / 'lora_epoch0_step2.pt'}"])
    # 6 pairs in batches of 2: steps 3-4 cross into epoch 1, whose order must also match.
    straight = load_checkpoint(tmp_path / "straight" / "lora_epoch1_step4.pt")["lora"]
    resumed = load_checkpoint(tmp_path / "resumed" / "lora_epoch1_step4.pt")["lora"]
    halfway = load_checkpoint(tmp_path / "straight" / "lora_epoch0_step2.pt")["lora"]
    assert any(not torch.equal(straight[key], halfway[key]) for key in straight)  # steps 3-4 did update
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)
