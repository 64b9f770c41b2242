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

clean:
	rm -rf $(VENV) $(RESULTS) runs .pytest_cache

bench: $(STAMP)
	$(RUN) -m experiments.bench_train
