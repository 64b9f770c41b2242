# Every target creates the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := $(BIN)/python
STAMP := $(VENV)/.installed
RESULTS ?= results

.PHONY: install test experiments tensors autodiff backprop config model pretrain chapter5 bench bench-generate clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(RUN) -m pytest -q -n auto

# Experiments: each writes results/<name>/results.json and results.md.
experiments: tensors autodiff backprop config model

tensors: $(STAMP)
	$(RUN) -m experiments.tensors

autodiff: $(STAMP)
	$(RUN) -m experiments.autodiff

backprop: $(STAMP)
	$(RUN) -m experiments.backprop

config: $(STAMP)
	$(RUN) -m experiments.config

clean:
	rm -rf $(VENV) $(RESULTS) runs .pytest_cache

# Pretraining: the small preset (byte tokens) on Python's built-in help text.
PRETRAIN_OUT ?= runs/pretrain
PRETRAIN_ARGS ?= --reuse-host-memory --steps 1200 --set batch_size=16 --set lr=3e-3 --set warmup_steps=20 \
	--eval-every 100 --set eval_batches=8 --save-every 400 --keep 2 \
	--set sample_prompt="The " --set sample_tokens=100
pretrain: $(STAMP)
	rm -rf $(PRETRAIN_OUT)
	$(RUN) -m jaxllm pretrain --preset small --out $(PRETRAIN_OUT) $(PRETRAIN_ARGS)

# The classic chapter-5 run (GPT-2 124M on the-verdict.txt); slow on a small CPU.
chapter5: $(STAMP)
	$(RUN) -m experiments.chapter5

# GPT-2 vocabulary for the tokenizer: $JAXLLM_GPT2_DIR, else a shared/data folder above
# the checkout (experiments/model.py looks there itself). Without it the experiment says
# it is skipped and exits 0: nothing is downloaded. `make model GPT2_DIR=DIR` names one.
GPT2_DIR ?=
model: $(STAMP)
	$(RUN) -m experiments.model$(if $(GPT2_DIR), --tokenizer-dir $(GPT2_DIR))

bench: $(STAMP)
	$(RUN) -m experiments.bench_train

bench-generate: $(STAMP)  ## generation speed: KV cache vs uncached loop vs PyTorch (results/bench_generate)
	$(RUN) -m experiments.bench_generate
