# make demo : set up .venv, build the built-in tiny model if absent, evaluate it
# make test : set up .venv (with test tools) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TINY   := models/tiny-gemma2-math

.PHONY: demo test venv clean-venv

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

demo: $(VENV)/.runtime-installed
	@echo ">> built-in tiny model: $(TINY) (built by make_tiny_model.py when absent)"
	$(PY) make_tiny_model.py --OUT_DIR=$(TINY)
	@echo ">> greedy evaluation of the tiny model on the held-out synthetic test set"
	$(PY) eval_math.py --MODEL_PATH=$(TINY) --TEST_FILE=data/synth_test.jsonl

test: $(VENV)/.dev-installed
	@echo ">> running the test suite"
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
