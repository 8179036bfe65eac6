"""Preference pairs: building them from scored samples, and laying them out for DPO training.

Building (make_dpo_pairs.py). For each question K sampled answers are scored; the pair is

    chosen   = the correct answer with the HIGHEST reward,
    rejected = the incorrect answer with the LOWEST reward,

ties broken by sample order (the earliest sample wins), so the same samples always give the
same pairs. A blank answer (e.g. an immediate end-of-turn) is never picked: a pairs file may
not hold empty text (common.data.load_pairs). A question with no eligible correct answer is
skipped as all-wrong, one with no eligible incorrect answer as all-correct: such a group
carries no preference.

Layout (run_train_dpo.py). A batch of n pairs is ONE forward pass over 2n sequences, the n chosen
then the n rejected, each  prompt + answer + answer-end token, laid out by common.packing: packed
into rows without pads (position ids restarting per sequence), or one right-padded row each
(PACKING=false):

    packed  [p p p a a a END | p p a a END | ...]      padded  [p p p p a a a END pad pad]

The answer mask is built from the lengths, never from pad ids (the pad id may also be a real
token): answer_mask[i, j] is 1 for answer token j of sequence i, the per-token log-probs come back
in the same [2n, longest answer] layout (PassLayout.per_token), and the output head runs on the
positions that predict answer tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.logprobs import body_hidden_states, head_token_logprobs, sequence_logprobs
from common.packing import PassLayout, pass_layout, to_device
from common.synth import normalise_question


def exclude_eval_questions(problems: list[dict], eval_problems: list[dict]) -> tuple[list[dict], int]:
    """(the problems whose question is not an eval question, how many were dropped); questions are
    compared normalised (case, spacing, end punctuation), so a reworded copy is still caught."""
    held_out = {normalise_question(p["question"]) for p in eval_problems}
    kept = [p for p in problems if normalise_question(p["question"]) not in held_out]
    return kept, len(problems) - len(kept)


def _first_extreme(candidates: list[int], rewards: list[float], highest: bool) -> int:
    """The candidate with the highest (or lowest) reward, the earliest one on ties."""
    best = candidates[0]
    for index in candidates[1:]:
        if (rewards[index] > rewards[best]) if highest else (rewards[index] < rewards[best]):
            best = index
    return best


def build_pairs(problems: list[dict], texts_per_question: list[list[str]], correct_per_question: list[list[bool]],
                rewards_per_question: list[list[float]]) -> tuple[list[dict], dict[str, int]]:
    """One pair per problem (a row of common.data.load_problems) with both a correct and an incorrect
    answer (chosen/rejected as in the module docstring), and the counts {"questions", "pairs",
    "skipped_all_correct", "skipped_all_wrong"}.  A pair keeps the problem's prompt as it came: its
    bare "question" (the trainer's prompt format wraps it again) or its own "prompt" (used as given),
    then "chosen", "rejected" and "gold_answer"."""
    if not len(problems) == len(texts_per_question) == len(correct_per_question) == len(rewards_per_question):
        raise ValueError("build_pairs needs one text list, correctness list and reward list per problem")
    pairs: list[dict] = []
    counts = {"questions": len(problems), "pairs": 0, "skipped_all_correct": 0, "skipped_all_wrong": 0}
    for problem, texts, correct, rewards in zip(problems, texts_per_question, correct_per_question,
                                                rewards_per_question):
        if not len(texts) == len(correct) == len(rewards):
            raise ValueError(f"question {problem['question']!r}: {len(texts)} texts, {len(correct)} correctness "
                             f"flags, {len(rewards)} rewards")
        eligible = [i for i, text in enumerate(texts) if text.strip()]
        right = [i for i in eligible if correct[i]]
        wrong = [i for i in eligible if not correct[i]]
        if not right:
            counts["skipped_all_wrong"] += 1
            continue
        if not wrong:
            counts["skipped_all_correct"] += 1
            continue
        chosen = _first_extreme(right, rewards, highest=True)
        rejected = _first_extreme(wrong, rewards, highest=False)
        prompt = {"prompt": problem["prompt"]} if "prompt" in problem else {"question": problem["question"]}
        pairs.append({**prompt, "chosen": texts[chosen], "rejected": texts[rejected],
                      "gold_answer": problem["gold_answer"]})
    counts["pairs"] = len(pairs)
    return pairs, counts


def tokenize_pair(tokenizer, prompt_ids: list[int], chosen: str, rejected: str,
                  answer_end_id: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids): each answer without special tokens, then the token that
    ends an answer, which is in the loss so the model learns where to stop (as in run_sft.py)."""
    chosen_ids, rejected_ids = tokenizer([chosen, rejected], add_special_tokens=False)["input_ids"]
    return list(prompt_ids), chosen_ids + [answer_end_id], rejected_ids + [answer_end_id]


@dataclass
class PairBatch:
    layout: PassLayout            # the 2n sequences, chosen then rejected (common.packing)
    answer_mask: torch.Tensor     # [2n, longest answer] float, 1 on each sequence's answer tokens

    @property
    def num_pairs(self) -> int:
        return self.answer_mask.size(0) // 2

    @property
    def answer_lengths(self) -> torch.Tensor:
        return self.answer_mask.sum(dim=1)


def pack_pairs(tokenized: list[tuple[list[int], list[int], list[int]]], pad_token_id: int, packing: bool = True,
               pack_length: int | None = None) -> PairBatch:
    """The 2n sequences of n tokenized pairs laid out for one pass (see the module docstring): packed
    into rows of at most ``pack_length`` tokens (None: one row), or padded rows."""
    prompts = [prompt for prompt, _, _ in tokenized] * 2
    answers = [chosen for _, chosen, _ in tokenized] + [rejected for _, _, rejected in tokenized]
    sequences = [torch.tensor(prompt + answer, dtype=torch.long) for prompt, answer in zip(prompts, answers)]
    answer_lengths = [len(answer) for answer in answers]
    width = max(answer_lengths)
    answer_mask = (torch.arange(width) < torch.tensor(answer_lengths)[:, None]).float()
    return PairBatch(pass_layout(sequences, answer_lengths, width, pack_length, packing, pad_token_id), answer_mask)


def pair_logprobs(model, batch: PairBatch, chunk_size: int = 1024,
                  length_normalise: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n], token log-probs [2n, longest answer]) under ``model`` in one forward pass.

    The sequence log-prob is the sum of the answer tokens' log-probs, the answer-end token
    included; with ``length_normalise`` (IPO) it is divided by the answer's token count.
    Differentiable; the token log-probs (0 past each answer) are returned for RPO's SFT term on the
    chosen rows."""
    device = next(model.parameters()).device
    layout, answer_mask = to_device((batch.layout, batch.answer_mask), device)
    hidden_states = body_hidden_states(model, layout.input_ids, layout.attention_mask, layout.position_ids)
    token_logps = layout.per_token(head_token_logprobs(model, hidden_states, layout.input_ids, chunk_size=chunk_size,
                                                       from_position=layout.predicting))
    sequence_logps = sequence_logprobs(token_logps, answer_mask)
    if length_normalise:
        sequence_logps = sequence_logps / answer_mask.sum(dim=1)
    return sequence_logps[:batch.num_pairs], sequence_logps[batch.num_pairs:], token_logps
