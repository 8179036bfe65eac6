"""Build the built-in tiny model from nothing: models/tiny-gemma2-math/.

    python make_tiny_model.py            # skips the build when the model is already there
    python make_tiny_model.py --FORCE=true

1. trains a byte-level BPE tokenizer (one token per digit, so numbers are
   spelled digit by digit) on synthetic problems, and gives it Gemma's special
   tokens and a Gemma-style chat template;
2. creates a Gemma 2 model of about 1M parameters from a small config, random weights;
3. teaches it the synthetic word problems with run_sft.py (all weights, loss on
   the solution tokens), then saves it with save_pretrained, so common/model.py
   loads it exactly as it loads Gemma 2 2B.
Deterministic for a seed.  The trained model is a competent-but-imperfect
policy (57% of the held-out problems right), so RL has room to show gains.
SFT keeps a constant learning rate on purpose: decaying it at the end (cosine)
sharpens the model the way RL would, and left GRPO nothing to gain (a cosine-SFT
model at 57% stayed at 57% over 80 GRPO steps; this one gains ~9 points in 60).
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.config import configure

# ---------------------------------------------------------------- constants
OUT_DIR = "models/tiny-gemma2-math"  # where the finished model goes
FORCE = False  # rebuild even if OUT_DIR exists
SEED = 0  # seed of the tokenizer corpus, the initial weights and SFT
TOKENIZER_CORPUS_SIZE = 20000  # synthetic problems the tokenizer is trained on
VOCAB_SIZE = 1024  # BPE vocabulary size (Gemma 2 has 256,000)
HIDDEN_SIZE = 128  # model width
NUM_LAYERS = 4  # transformer blocks (Gemma 2 alternates sliding-window and global attention)
NUM_HEADS = 4  # attention heads (and key/value heads)
HEAD_DIM = 32  # width of one head
INTERMEDIATE_SIZE = 512  # MLP width
MAX_POSITIONS = 512  # longest sequence; the sliding window covers all of it
SFT_STEPS = 1200  # supervised steps of run_sft.py
SFT_BATCH_SIZE = 32  # examples per SFT step
SFT_LR = 2e-3  # SFT learning rate, constant after warm-up (see the docstring)
EVAL_LIMIT = 500  # held-out problems for the final accuracy (0 = all)

config = configure(globals())
# ---------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Gemma's ids for the first four; the turn markers follow.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def train_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from common import synth
    from common.prompts import user_message

    problems = synth.make_problems(TOKENIZER_CORPUS_SIZE, seed=SEED + 1)
    # The text exactly as training shows it, turn markers included, so "user" and
    # "model" get merged like every other frequent word.
    corpus = [f"<start_of_turn>user\n{user_message(p['question'])}<end_of_turn>\n<start_of_turn>model\n"
              f"{p['solution']}<end_of_turn>" for p in problems]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits first, one per pre-token: merges never cross them, so "125" is 1 2 5.  Words are
    # not pre-split (use_regex=False), so BPE merges frequent phrases ("How many", the
    # instruction) into single tokens: sequences are 40% shorter and SFT that much faster.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_initial_model(tokenizer, out_dir: Path):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig

    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model_config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS, head_dim=HEAD_DIM,
        intermediate_size=INTERMEDIATE_SIZE, query_pre_attn_scalar=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS, sliding_window=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn], tie_word_embeddings=True,
        attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    model = Gemma2ForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn])
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


out_dir = Path(OUT_DIR)
if out_dir.exists() and not FORCE:
    print(f"{out_dir} already exists; nothing to do (--FORCE=true rebuilds it)")
    raise SystemExit(0)

start = time.perf_counter()
build_dir = out_dir.with_name(out_dir.name + ".build")
shutil.rmtree(build_dir, ignore_errors=True)
initial_dir, trained_dir = build_dir / "initial", build_dir / "trained"

print(f"[1/3] training a {VOCAB_SIZE}-token BPE tokenizer on {TOKENIZER_CORPUS_SIZE} synthetic problems", flush=True)
tokenizer = train_tokenizer(initial_dir)
num_parameters = build_initial_model(tokenizer, initial_dir)
print(f"[2/3] built a random Gemma 2 model: {num_parameters / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
print(f"[3/3] supervised fine-tuning for {SFT_STEPS} steps (run_sft.py)", flush=True)
# On the CPU in fp32 whatever the machine has: the same seed then gives the same model
# everywhere, and a 1M-parameter model gains nothing from a GPU.
subprocess.run(
    [sys.executable, "run_sft.py", f"--MODEL_PATH={initial_dir}", f"--OUT_DIR={trained_dir}",
     f"--MAX_STEPS={SFT_STEPS}", f"--BATCH_SIZE={SFT_BATCH_SIZE}", f"--LR={SFT_LR}", "--LR_SCHEDULE=constant",
     "--WARMUP_STEPS=30", f"--SEED={SEED}",
     f"--EVAL_LIMIT={EVAL_LIMIT}", "--DEVICE=cpu", "--DTYPE=float32",
     f"--LOG_DIR={build_dir}", "--RUN_NAME=sft_log"],
    check=True,
)
sft_info = json.loads((trained_dir / "sft_info.json").read_text())
build_seconds = time.perf_counter() - start
(trained_dir / "build_info.json").write_text(json.dumps({
    "config": config, "parameters": num_parameters, "build_seconds": build_seconds,
    "accuracy": sft_info["eval/accuracy"], "eval_total": sft_info["eval/total"]}, indent=2))
(build_dir / "sft_log.jsonl").rename(trained_dir / "sft_log.jsonl")  # the training curve ships with the model
if out_dir.exists():
    shutil.rmtree(out_dir)
trained_dir.rename(out_dir)
shutil.rmtree(build_dir)
print(f"built {out_dir} in {build_seconds / 60:.1f} min: greedy accuracy "
      f"{100 * sft_info['eval/accuracy']:.1f}% on {sft_info['eval/total']} held-out problems")
