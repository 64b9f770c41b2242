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
	$(RUN) -m pytest -q

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

# GPT-2 vocabulary for the tokenizer: a shared data folder above the checkout, when there is one.
GPT2_DIR ?= $(firstword $(wildcard ../shared/data ../../shared/data))

model: $(STAMP)
	$(if $(GPT2_DIR),JAXLLM_GPT2_DIR=$(GPT2_DIR) )$(RUN) -m experiments.model
