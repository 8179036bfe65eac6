"""What a trainer sets up before its first step, as plain functions the script calls with its constants:
the questions and their fit in the model's context, the steps they make, the memory plan, the model in
its dtype with its loss scaler, the LoRA-targets check, and the eval's sampling settings.

Nothing here reads a setting by name: each function takes what it uses. The run's bookkeeping (folder,
lock, resume, cadence, signals, metrics, saves) is common/run.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.data import iter_jsonl, load_problems
from common.evaluate import sampled_settings
from common.lora import lora_targets
from common.memory_plan import MemoryPlanError, Sizes, check_fits, choose_sizes, free_gpu_memory_gb, plan_memory
from common.model import context_length, dtype_line, get_dtype, load_model, meta_model
from common.prompts import encode_prompts
from common.run import LossScaler, RunError
from common.sampler import SamplingParams
from common.synth import normalise_question


def load_questions(train_file: str | Path, num_prompts: int, eval_file: str | Path | None, eval_limit: int,
                   gold_field: str | None, needs_numeric_gold: bool) -> tuple[list[dict], list[dict]]:
    """(training, eval) problems: ``train_file``'s first ``num_prompts`` (0: all) and ``eval_file``'s first
    ``eval_limit`` (0: all; none when ``eval_file`` is None: no eval), gold answers read as the reward
    needs them; a warning for training questions that are also eval questions."""
    problems = load_problems(train_file, num_prompts or None, gold_field, needs_numeric_gold)
    eval_problems = ([] if eval_file is None else
                     load_problems(eval_file, eval_limit or None, gold_field, needs_numeric_gold))
    warn_shared_questions([p["question"] for p in problems], [p["question"] for p in eval_problems],
                          train_file, eval_file)
    return problems, eval_problems


def questions_in_context(tokenizer, prompt_format, files: list[tuple[list[dict], str | Path | None]], model_config,
                         max_new_tokens: int, skip_long: bool) -> tuple[list[list[dict]], int]:
    """Each file's problems whose prompts leave ``max_new_tokens`` of room in the context of
    ``model_config`` (room_for_prompts; questions_that_fit: ``skip_long`` decides between refusing the
    file and skipping them; a file without questions is refused), and the longest prompt kept, for the
    memory plan. ``files``: (problems, the file they came from, or None for a file the run does not
    read: EVAL_FILE without evals)."""
    kept, longest = [], 0
    for problems, path in files:
        if path is not None:
            prompt_room = room_for_prompts(model_config, max_new_tokens)
            problems, longest_here = questions_that_fit(tokenizer, prompt_format, problems, path, prompt_room, skip_long)
            longest = max(longest, longest_here)
        kept.append(problems)
    return kept, longest


def steps_in_epoch(items: int, items_per_step: int, path: str | Path) -> int:
    """Whole steps of ``items_per_step`` in ``items``; a file with fewer than one step's is refused."""
    if items < items_per_step:
        raise RunError(f"{path} has {items} questions, fewer than one step's {items_per_step}")
    return items // items_per_step


def fit_to_context(rows: list[dict], lengths: list[int], path: str | Path, max_length: int, what: str,
                   skip: bool) -> list[dict]:
    """The rows whose ``lengths`` (in tokens) are at most ``max_length``. A longer one is refused, naming
    the file and line, or with ``skip`` left out and counted: checked at load time, since such a row
    would otherwise crash a step hours in (a 1 MB question asks for a 1 TB attention matrix) or
    silently run past the model's context."""
    line_numbers = [line_number for line_number, _ in iter_jsonl(path)]
    too_long = [index for index, length in enumerate(lengths) if length > max_length]
    if too_long and not skip:
        first = too_long[0]
        raise RunError(f"{path}:{line_numbers[first]}: the {what} is {lengths[first]} tokens, more than the "
                       f"{max_length} that fit ({len(too_long)} such line(s)); shorten them, or skip them with "
                       f"--SKIP_LONG_PROMPTS=true")
    if too_long:
        print(f"skipped {len(too_long)} line(s) of {path} whose {what} is longer than {max_length} tokens")
    dropped = set(too_long)
    return [row for index, row in enumerate(rows) if index not in dropped]


def room_for_prompts(model, max_new_tokens: int) -> int:
    """The tokens a prompt may have in the context of ``model`` (or its config) beside MAX_NEW_TOKENS of
    answer; refused when that leaves none."""
    context = context_length(model)
    if max_new_tokens >= context:
        raise RunError(f"MAX_NEW_TOKENS={max_new_tokens} leaves no room for the prompt in the model's context of "
                       f"{context} tokens: a prompt and MAX_NEW_TOKENS must fit in it together")
    return context - max_new_tokens


def questions_that_fit(tokenizer, prompt_format, problems: list[dict], path: str | Path, max_length: int,
                       skip: bool) -> tuple[list[dict], int]:
    """The problems of ``path`` whose prompts fit in ``max_length`` tokens (fit_to_context), and the
    longest of those prompts in tokens; a file without any is refused (an eval over nothing would print 0%)."""
    if not problems:
        raise RunError(f"{path} has no questions")
    lengths = [len(ids) for ids in encode_prompts(tokenizer, problems, prompt_format)]
    kept = fit_to_context(problems, lengths, path, max_length, "prompt", skip)
    return kept, max((length for length in lengths if length <= max_length), default=0)


def warn_shared_questions(train_questions: list[str], eval_questions: list[str], train_path, eval_path) -> int:
    """Warn (and return how many) training questions are also eval questions, compared normalised:
    the eval then measures memory as well as skill."""
    held_out = {normalise_question(question) for question in eval_questions}
    shared = sum(normalise_question(question) in held_out for question in train_questions)
    if shared:
        print(f"warning: {shared} of the {len(train_questions)} questions of {train_path} are also in "
              f"{eval_path}: the eval is no longer held out for them")
    return shared


def check_lora_targets(model_path: str | Path, targets) -> None:
    """LORA_TARGETS matched against the model's layers on the model without its weights (meta_model):
    a name that matches nothing is refused now, not after the weights load."""
    lora_targets(meta_model(model_path), targets)


def load_model_for_training(model_path: str | Path, device: torch.device, dtype_name: str, quant: str,
                            every_weight: bool = False, quiet: bool = False) -> tuple[torch.nn.Module, LossScaler]:
    """The causal LM of ``model_path`` on ``device`` in DTYPE ``dtype_name``, its linear layers in QUANT
    (common.model.load_model), the dtype said in one line, and the run's LossScaler (enabled for an fp16
    model). ``every_weight`` (run_sft.py with LORA_R=0): DTYPE=auto gives fp32 where it would give fp16,
    since fp16 weights would be their own optimizer masters and updates below their resolution lost."""
    dtype = get_dtype(dtype_name, device)
    line = dtype_line(dtype_name, device)
    if dtype is torch.float16 and dtype_name == "auto" and every_weight:
        dtype, line = torch.float32, f"{line}; float32 instead: LORA_R=0 trains every weight"
    if not quiet:
        print(line)
    return load_model(model_path, device, dtype, quant), LossScaler(dtype, device)


def check_memory(model_path: str | Path, device: torch.device, gpu_memory_gb: float, sizes: Sizes, fallback: Sizes,
                 micro_batch_scale: int = 1, evaluates: bool = True, **settings) -> Sizes:
    """Print the run's memory plan (common/memory_plan.py, from config.json: call it before the weights
    load) with the ``sizes`` left at auto resolved to the fastest that fit in ``gpu_memory_gb`` (0: the
    device's free memory; none on a CPU, nor for an architecture the plan does not know: then auto is
    ``fallback``'s, the trainer's sizes from before auto), the choice in one line; and refuse a run that
    will not fit, naming the settings that would make it fit. ``micro_batch_scale``: sequences per
    MICRO_BATCH_SIZE unit (a DPO pair is two); ``evaluates``: whether the run evaluates. ``settings``: the
    plan's other RunSettings (quant, dtype: the DTYPE setting, resolved for ``device`` here, lora_r,
    lora_targets, logprob_chunk_size, sampler, rows: a step's, samples_per_prompt, prompt_tokens,
    max_new_tokens, ...). Returns the sizes to use, with whether the sampler's static KV must be freed
    before each policy pass (it does not fit beside it)."""
    gpu_gb = gpu_memory_gb or free_gpu_memory_gb(device)
    settings["dtype"] = get_dtype(settings["dtype"], device)
    try:
        plan = plan_memory(model_path, device=device.type, **settings)
    except ValueError as error:  # an architecture the plan does not know: the run goes on without one
        print(f"no memory plan: {error}")
        return unplanned_sizes(sizes, fallback, settings.get("rows", 0))
    plan, resolved, choice = choose_sizes(plan, sizes, fallback, gpu_gb, micro_batch_scale, evaluates)
    print(plan.table(gpu_gb))
    if choice:
        print(choice)
    try:
        check_fits(plan, gpu_gb)
    except MemoryPlanError as error:
        raise RunError(str(error)) from None
    return resolved


def unplanned_sizes(sizes: Sizes, fallback: Sizes, rows: int = 0) -> Sizes:
    """``sizes`` with each auto ``fallback``'s, for a run without a memory plan to choose by (``rows``: a
    step's rollout rows), said in one line."""
    resolved = sizes.or_else(fallback)
    line = resolved.choice_line(sizes, rows, "without a memory plan")
    if line:
        print(line)
    return resolved


def eval_sampling(max_new_tokens: int, batch_size: int, sampler: str, num_samples: int = 1,
                  temperature: float = 0.0, cuda_graphs: bool = True) -> tuple[SamplingParams, SamplingParams | None]:
    """The periodic eval's SamplingParams: greedy, ``batch_size`` problems per batch (the static path pads
    the last one), and the sampled pass beside it: ``num_samples`` per problem at ``temperature`` (None
    at 0, the greedy eval alone; common.evaluate.sampled_settings); ``cuda_graphs``: SamplingParams'."""
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, chunk_rows=batch_size, sampler=sampler,
                            cuda_graphs=cuda_graphs)
    return greedy, sampled_settings(greedy, num_samples, temperature)
