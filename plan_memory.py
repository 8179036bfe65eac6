"""The memory plan of a training run, before anything is downloaded or loaded: will it fit on this GPU?

    python plan_memory.py --MODEL_PATH=models/gemma-2-2b-it                     # the GRPO defaults, this machine's GPU
    python plan_memory.py --MODEL_PATH=models/gemma-2-2b-it --DEVICE=cuda --GPU_MEMORY_GB=22.5   # a 24 GB card
    python plan_memory.py --MODEL_PATH=meta-llama/Llama-3.1-8B-Instruct --QUANT=nf4 \
        --DEVICE=cuda --GPU_MEMORY_GB=11.2                                        # a 12 GB card
    python plan_memory.py ... --MICRO_BATCH_SIZE=8 --GRADIENT_CHECKPOINTING=true   # sizes of your own, not auto

Only the model's config.json is read (a Hub id fetches that file alone). Prints, in GB, the weights
(by QUANT and dtype), the LoRA and its AdamW state, the rollout's KV cache, a micro-batch's activations
with and without gradient checkpointing, the chunked head's buffers and the peak; then whether it fits
in the GPU's free memory (or GPU_MEMORY_GB) and, when it does not, the settings that would make it fit.
MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, GENERATION_BATCH_SIZE and EVAL_BATCH_SIZE at auto are resolved as
the trainers resolve them (common.memory_plan.choose_sizes), said in one line. How each item is counted:
common/memory_plan.py. The constants and their defaults are the trainers' (run_train_grpo.py).
"""

from typing import Annotated, Literal

from common.config import Dtype, configure
from common.quant import Quant

# ---------------------------------------------------------------- constants
MODEL_PATH = "models/gemma-2-2b-it"  # model directory or Hub id (only its config.json is read)
QUANT: Quant = "none"  # none, or nf4: the base's linear layers in 4 bits
DTYPE: Dtype = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
DEVICE: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # the device the run will use (auto: this machine's, cuda > mps > cpu)
PROMPTS_PER_STEP: Annotated[int, ">= 0"] = 16  # questions per step (0 = no rollouts: SFT, DPO)
NUM_SAMPLES_PER_PROMPT: Annotated[int, ">= 1"] = 8  # completions sampled per question
GENERATION_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 0"] = "auto"  # rows sampled together: auto, the fewest
#                                   equal chunks that fit; 0, all of a step's rows at once
PROMPT_TOKENS: Annotated[int, ">= 1"] = 256  # the longest prompt, in tokens
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 256  # completion length limit
MICRO_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # sequences per forward and backward (auto: the
#                                   fastest that fits, at most 16; 16 without a GPU)
LOGPROB_CHUNK_SIZE: Annotated[int, ">= 1"] = 1024  # positions per chunk of the output head
EVAL_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 0"] = "auto"  # prompts per eval generation batch (0 = no
#                                   evaluation; auto: the most that fit, at most 64; 64 without a GPU)
LORA_R: Annotated[int, ">= 1"] = 16  # adapter rank
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # adapted layers (or all-linear)
GRADIENT_CHECKPOINTING: Literal["auto"] | bool = "auto"  # recompute each layer's activations in the backward (auto:
#                                   where that is faster than smaller micro-batches; never without a GPU)
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # the static and compiled samplers keep their KV buffers
GPU_MEMORY_GB: Annotated[float, ">= 0"] = 0.0  # memory to plan for (0 = the GPU's free memory; none to compare with off CUDA)

config = configure(globals())
# ---------------------------------------------------------------------------

import torch  # noqa: E402

from common.memory_plan import MemoryPlanError, Sizes, check_fits, choose_sizes, free_gpu_memory_gb, plan_memory  # noqa: E402
from common.model import get_device, get_dtype  # noqa: E402

device = get_device("auto") if DEVICE == "auto" else torch.device(DEVICE)
planning_ahead = device.type == "cuda" and not torch.cuda.is_available()  # for a GPU this machine lacks
dtype = torch.bfloat16 if planning_ahead and DTYPE == "auto" else get_dtype(DTYPE, device)
gpu_gb = GPU_MEMORY_GB or free_gpu_memory_gb(device)
rows = PROMPTS_PER_STEP * NUM_SAMPLES_PER_PROMPT
plan = plan_memory(MODEL_PATH, quant=QUANT, dtype=dtype, device=device.type, rows=rows,
                   samples_per_prompt=NUM_SAMPLES_PER_PROMPT, prompt_tokens=PROMPT_TOKENS,
                   max_new_tokens=MAX_NEW_TOKENS, lora_r=LORA_R, lora_targets=LORA_TARGETS,
                   logprob_chunk_size=LOGPROB_CHUNK_SIZE, sampler=SAMPLER)
# The sizes left at auto, as run_train_grpo.py resolves them (without a GPU: its sizes from before auto).
plan, _, auto_choice = choose_sizes(
    plan, Sizes(MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, GENERATION_BATCH_SIZE, EVAL_BATCH_SIZE),
    Sizes(16, False, 0, 64), gpu_gb, evaluates=EVAL_BATCH_SIZE != 0)
print(plan.table(gpu_gb))
if auto_choice:
    print(auto_choice)
if gpu_gb is None:
    print("no GPU here to compare with: give --GPU_MEMORY_GB=... (and --DEVICE=cuda) to plan for one")
try:
    check_fits(plan, gpu_gb)
except MemoryPlanError as error:
    raise SystemExit(f"error: {error}") from None
