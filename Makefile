# make demo : set up .venv, build the built-in tiny model if absent, evaluate it, train it with GRPO, evaluate again
# make demo-passk : mean@16, pass@1..16 and maj@16 of the tiny model and of the GRPO demo's LoRA, and their pass@k figure
# make test : set up .venv (with test tools) and run the test suite
# make gpu-check : the first GPU hour in one command (bench/gpu_check.py; python bench/gpu_check.py where there is no make)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TINY   := models/tiny-gemma2-math
SYNTH  := --TRAIN_FILE=data/synth_train.jsonl --EVAL_FILE=data/synth_test.jsonl
# The GRPO demo: the constants of run_train_grpo.py set for the tiny model (see docs/tiny-model.md, "The demo").
DEMO_GRPO := --MODEL_PATH=$(TINY) $(SYNTH) --EVAL_LIMIT=0 --EVAL_EVERY=25 --MAX_STEPS=150 \
             --PROMPTS_PER_STEP=16 --NUM_SAMPLES_PER_PROMPT=8 --MAX_NEW_TOKENS=40 --LR=2e-4 \
             --RUN_NAME=demo-grpo --SAMPLE_EVERY=25 --SAVE_EVERY=50 --OVERWRITE=true

# The soup demo: the GRPO demo's checkpoints at steps 50, 100 and 150, souped (see docs/soup.md).
DEMO_SOUP_RUN := checkpoints/demo-grpo
DEMO_SOUP := --MODEL_PATH=$(TINY) --MAX_NEW_TOKENS=40 \
             --CKPTS=$(DEMO_SOUP_RUN)/lora_epoch0_step50.pt,$(DEMO_SOUP_RUN)/lora_epoch0_step100.pt,$(DEMO_SOUP_RUN)/lora_epoch0_step150.pt

# The DPO demo: on-policy pairs from the tiny model, then DPO with an SFT term on the chosen answers (RPO).
DEMO_PAIRS := --MODEL_PATH=$(TINY) $(SYNTH) --NUM_PROMPTS=1500 --MAX_NEW_TOKENS=40 --BATCH_SIZE=32 \
              --OUT_FILE=logs/demo/dpo_pairs.jsonl --OVERWRITE=true
DEMO_DPO := --MODEL_PATH=$(TINY) --TRAIN_FILE=logs/demo/dpo_pairs.jsonl --EVAL_FILE=data/synth_test.jsonl \
            --EVAL_LIMIT=0 --EVAL_EVERY=20 --MAX_NEW_TOKENS=40 --NUM_EPOCHS=2 --LR=1e-4 --RPO_ALPHA=1.0 \
            --MICRO_BATCH_SIZE=16 --RUN_NAME=demo-dpo --OVERWRITE=true

# The PPO demo: LoRA actor + value-head critic, KL penalty in the token rewards.
DEMO_PPO := --MODEL_PATH=$(TINY) $(SYNTH) --EVAL_LIMIT=0 --EVAL_EVERY=20 --MAX_STEPS=100 --MAX_NEW_TOKENS=40 \
            --LR=2e-4 --RUN_NAME=demo-ppo --SAMPLE_EVERY=50 --OVERWRITE=true

# The pass@k demo: the tiny model and the GRPO demo's LoRA, 16 samples per held-out problem at temperature 1.
DEMO_PASSK := --MODEL_PATH=$(TINY) --EVAL_FILE=data/synth_test.jsonl --MAX_NEW_TOKENS=40 --NUM_SAMPLES=16 \
              --TEMPERATURE=1 --GREEDY_TOO=true

.PHONY: demo demo-qlora demo-dpo demo-ppo demo-soup demo-passk test gpu-check venv tiny-model clean-venv

# A stamp per requirements file: re-installs only when the file changes.
$(VENV)/.runtime-installed: requirements.txt
	@test -x $(PY) || { echo ">> creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> installing requirements.txt into $(VENV)"
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	@echo ">> installing requirements-dev.txt into $(VENV)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

venv: $(VENV)/.runtime-installed

tiny-model: $(VENV)/.runtime-installed
	@echo ">> built-in tiny model: $(TINY) (built by make_tiny_model.py when absent)"
	$(PY) make_tiny_model.py --OUT_DIR=$(TINY)

demo: tiny-model
	@echo ">> [1/3] baseline: greedy accuracy of the tiny model on the 500 held-out synthetic problems"
	$(PY) eval_math_base.py --MODEL_PATH=$(TINY) --EVAL_FILE=data/synth_test.jsonl --MAX_NEW_TOKENS=40 \
	    --OUT_FILE=logs/demo/base.jsonl --OVERWRITE=true
	@echo ">> [2/3] GRPO with a LoRA on the tiny model (checkpoints/demo-grpo/, metrics logs/demo-grpo.jsonl)"
	$(PY) run_train_grpo.py $(DEMO_GRPO)
	@echo ">> [3/3] the trained LoRA on the same held-out problems, before -> after"
	$(PY) eval_math.py --MODEL_PATH=$(TINY) --LORA_CKPT=checkpoints/demo-grpo --EVAL_FILE=data/synth_test.jsonl \
	    --MAX_NEW_TOKENS=40 --OUT_FILE=logs/demo/grpo.jsonl --OVERWRITE=true --COMPARE_TO=logs/demo/base.summary.json

demo-qlora: tiny-model $(VENV)/.dev-installed
	@echo ">> [1/3] baseline with the base in 4-bit NF4 (QUANT=nf4, bitsandbytes from requirements-dev.txt)"
	$(PY) eval_math_base.py --MODEL_PATH=$(TINY) --EVAL_FILE=data/synth_test.jsonl --MAX_NEW_TOKENS=40 --QUANT=nf4 \
	    --OUT_FILE=logs/demo/base-nf4.jsonl --OVERWRITE=true
	@echo ">> [2/3] GRPO with a LoRA on the 4-bit base: the demo's settings (checkpoints/demo-qlora/)"
	$(PY) run_train_grpo.py $(DEMO_GRPO) --QUANT=nf4 --RUN_NAME=demo-qlora
	@echo ">> [3/3] the trained LoRA on the 4-bit base, before -> after"
	$(PY) eval_math.py --MODEL_PATH=$(TINY) --LORA_CKPT=checkpoints/demo-qlora --EVAL_FILE=data/synth_test.jsonl \
	    --MAX_NEW_TOKENS=40 --QUANT=nf4 --OUT_FILE=logs/demo/qlora.jsonl --OVERWRITE=true --COMPARE_TO=logs/demo/base-nf4.summary.json

demo-dpo: tiny-model
	@echo ">> [1/4] baseline: greedy accuracy of the tiny model on the 500 held-out synthetic problems"
	$(PY) eval_math_base.py --MODEL_PATH=$(TINY) --EVAL_FILE=data/synth_test.jsonl --MAX_NEW_TOKENS=40 \
	    --OUT_FILE=logs/demo/base.jsonl --OVERWRITE=true
	@echo ">> [2/4] preference pairs sampled from the tiny model itself (logs/demo/dpo_pairs.jsonl)"
	$(PY) make_dpo_pairs.py $(DEMO_PAIRS)
	@echo ">> [3/4] DPO with a LoRA on those pairs (checkpoints/demo-dpo/, metrics logs/demo-dpo.jsonl)"
	$(PY) run_train_dpo.py $(DEMO_DPO)
	@echo ">> [4/4] the trained LoRA on the same held-out problems, before -> after"
	$(PY) eval_math.py --MODEL_PATH=$(TINY) --LORA_CKPT=checkpoints/demo-dpo --EVAL_FILE=data/synth_test.jsonl \
	    --MAX_NEW_TOKENS=40 --OUT_FILE=logs/demo/dpo.jsonl --OVERWRITE=true --COMPARE_TO=logs/demo/base.summary.json

demo-ppo: tiny-model
	@echo ">> [1/3] baseline: greedy accuracy of the tiny model on the 500 held-out synthetic problems"
	$(PY) eval_math_base.py --MODEL_PATH=$(TINY) --EVAL_FILE=data/synth_test.jsonl --MAX_NEW_TOKENS=40 \
	    --OUT_FILE=logs/demo/base.jsonl --OVERWRITE=true
	@echo ">> [2/3] PPO with a LoRA actor and a value-head critic (checkpoints/demo-ppo/, metrics logs/demo-ppo.jsonl)"
	$(PY) run_train_ppo.py $(DEMO_PPO)
	@echo ">> [3/3] the trained LoRA on the same held-out problems, before -> after"
	$(PY) eval_math.py --MODEL_PATH=$(TINY) --LORA_CKPT=checkpoints/demo-ppo --EVAL_FILE=data/synth_test.jsonl \
	    --MAX_NEW_TOKENS=40 --OUT_FILE=logs/demo/ppo.jsonl --OVERWRITE=true --COMPARE_TO=logs/demo/base.summary.json

demo-soup: tiny-model
	@test -f $(DEMO_SOUP_RUN)/lora_epoch0_step50.pt || { \
	    echo ">> [0/2] no checkpoints of the GRPO demo yet: running it ($(DEMO_SOUP_RUN)/)"; \
	    $(PY) run_train_grpo.py $(DEMO_GRPO); }
	@echo ">> [1/2] uniform soup of the GRPO demo's last 3 checkpoints (mean of the LoRA updates): dev and test accuracy"
	$(PY) model_soup.py $(DEMO_SOUP) --RECIPE=uniform --OUT=checkpoints/demo-soup/uniform.pt --OVERWRITE=true
	@echo ">> [2/2] greedy soup: best on data/synth_dev.jsonl first, the next kept if dev accuracy does not drop"
	$(PY) model_soup.py $(DEMO_SOUP) --RECIPE=greedy --OUT=checkpoints/demo-soup/greedy.pt --OVERWRITE=true

demo-passk: tiny-model $(VENV)/.dev-installed
	@test -f $(DEMO_SOUP_RUN)/lora_epoch0_step150.pt || { \
	    echo ">> [0/3] no checkpoint of the GRPO demo yet: running it ($(DEMO_SOUP_RUN)/)"; \
	    $(PY) run_train_grpo.py $(DEMO_GRPO); }
	@echo ">> [1/3] the tiny model: 16 samples per held-out problem at T=1: mean@16, pass@1..16, maj@16 (and greedy)"
	$(PY) eval_math_base.py $(DEMO_PASSK) --OUT_FILE=logs/demo/passk-base.jsonl --OVERWRITE=true
	@echo ">> [2/3] the GRPO demo's LoRA, the same settings and seed, before -> after"
	$(PY) eval_math.py $(DEMO_PASSK) --LORA_CKPT=$(DEMO_SOUP_RUN) --OUT_FILE=logs/demo/passk-grpo.jsonl --OVERWRITE=true \
	    --COMPARE_TO=logs/demo/passk-base.summary.json
	@echo ">> [3/3] pass@k against k for both (matplotlib from requirements-dev.txt): logs/demo/passk.png"
	$(PY) plot_metrics.py --PASS_AT_K=logs/demo/passk-base.summary.json,logs/demo/passk-grpo.summary.json \
	    --OUT_FILE=logs/demo/passk.png --OVERWRITE=true

test: $(VENV)/.dev-installed
	@echo ">> running the test suite"
	$(PY) -m pytest -q tests

# The CUDA equivalence tests, the Llama 3.1 8B NF4 step under 12 GB, bench_gpu.py at Gemma 2 2B's shapes: parts
# limited to 120 + 180 + 240 s, 9 minutes (GPU_CHECK_ARGS=--QUICK=true: parts 1 and 2, 6); thin-body versions without CUDA.
gpu-check: $(VENV)/.dev-installed
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
