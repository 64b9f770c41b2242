# Every target creates the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := $(BIN)/python
STAMP := $(VENV)/.installed
RESULTS ?= results

.PHONY: help install test experiments tensors autodiff backprop config model pretrain chapter5 bench bench-generate bench-serve clean parity
.DEFAULT_GOAL := help

help:  ## this list (the other targets create .venv on first use)
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z0-9_-]+):.*## /\1\t/' | \
		awk -F'\t' '{ printf "  make %-18s %s\n", $$1, $$2 }'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install jaxllm with its test extras (constraints.txt pins)

test: $(STAMP)  ## the whole test suite on every core, PyTorch parity included
	$(RUN) -m pytest -q -n auto --durations=25

# Experiments: each writes results/<name>/results.json and results.md.
experiments: tensors autodiff backprop config model  ## tensors, autodiff, backprop, config and model (results/)

tensors: $(STAMP)  ## tensors next to torch: creation, dtypes, views, matmul
	$(RUN) -m experiments.tensors

autodiff: $(STAMP)  ## one neuron's gradients four ways
	$(RUN) -m experiments.autodiff

backprop: $(STAMP)  ## SimpleNet and SGD in JAX, Flax NNX and torch, step by step
	$(RUN) -m experiments.backprop

config: $(STAMP)  ## parameter counts and memory of every preset
	$(RUN) -m experiments.config

# jaxllm against PyTorch and transformers on small random models; PARITY=gpt2 picks checks.
PARITY ?=
parity: $(STAMP)  ## every cross-check against PyTorch: results/parity, non-zero if one fails
	JAXLLM_RESULTS=$(RESULTS) $(RUN) -m jaxllm parity $(PARITY)

clean:  ## remove .venv, results/, runs/ and the pytest cache
	rm -rf $(VENV) $(RESULTS) runs .pytest_cache

# Pretraining: the small preset (byte tokens) on Python's built-in help text.
PRETRAIN_OUT ?= runs/pretrain
PRETRAIN_ARGS ?= --reuse-host-memory --steps 1200 --set batch_size=16 --set lr=3e-3 --set warmup_steps=20 \
	--eval-every 100 --set eval_batches=8 --save-every 400 --keep 2 \
	--set sample_prompt="The " --set sample_tokens=100
pretrain: $(STAMP)  ## train the small preset on Python's help text (runs/pretrain)
	rm -rf $(PRETRAIN_OUT)
	$(RUN) -m jaxllm pretrain --preset small --out $(PRETRAIN_OUT) $(PRETRAIN_ARGS)

# The classic chapter-5 run (GPT-2 124M on the-verdict.txt); slow on a small CPU.
chapter5: $(STAMP)  ## the book's chapter-5 run: GPT-2 124M on the-verdict.txt (slow)
	$(RUN) -m experiments.chapter5

# GPT-2 vocabulary for the tokenizer: $JAXLLM_GPT2_DIR, else a shared/data folder above
# the checkout, when there is one (`make model GPT2_DIR=DIR` names another). Without the
# files the experiment says it is skipped and why, and exits 0: nothing is downloaded.
GPT2_DIR ?= $(or $(JAXLLM_GPT2_DIR),$(firstword $(wildcard ../shared/data ../../shared/data)))
model: $(STAMP)  ## GPT-2 124M against transformers (needs the GPT-2 vocabulary)
	$(RUN) -m experiments.model$(if $(GPT2_DIR), --tokenizer-dir $(GPT2_DIR))

bench: $(STAMP)  ## train-step speed, jaxllm against PyTorch, on this CPU
	$(RUN) -m experiments.bench_train

bench-generate: $(STAMP)  ## generation speed: KV cache, uncached loop, transformers
	$(RUN) -m experiments.bench_generate

# BENCH_SERVE_ARGS="--emb-dim 256 --layers 4 --heads 4 --context 256" for a smaller model.
BENCH_SERVE_ARGS ?=
bench-serve: $(STAMP)  ## jaxllm serve against transformers serve at 1, 8, 32 clients (results/bench_serve)
	$(RUN) -m experiments.bench_serve $(BENCH_SERVE_ARGS)

# Instruction fine-tuning on the shared instruction data (or INSTRUCT_DATA=FILE). With GPT-2
# weights (INSTRUCT_HF=DIR, or GPT2_DIR holding model.safetensors or pytorch_model.bin) it
# runs the classic protocol (2 epochs, lr 5e-5, batch 8); without, a short run of a small
# random model.
.PHONY: finetune-instruct
INSTRUCT_DATA ?= $(firstword $(wildcard ../shared/data/instruction-data.json ../../shared/data/instruction-data.json))
INSTRUCT_HF ?= $(if $(wildcard $(GPT2_DIR)/model.safetensors $(GPT2_DIR)/pytorch_model.bin),$(GPT2_DIR))
INSTRUCT_VOCAB ?= $(firstword $(wildcard ../shared/data ../../shared/data))
INSTRUCT_OUT ?= runs/instruct
INSTRUCT_SMALL ?= --init random --preset small --tokenizer gpt2 --set context_length=512 \
	--steps 240 --set lr=1e-3 --set warmup_steps=20 --set min_lr_ratio=0.1 --set grad_clip=1.0 \
	--eval-every 40 --save-every 120
INSTRUCT_ARGS ?=
finetune-instruct: $(STAMP)  ## instruction fine-tuning on the shared data (INSTRUCT_HF=DIR for GPT-2)
	@test -n "$(INSTRUCT_DATA)" || { echo "no instruction data found beside the checkout: make finetune-instruct INSTRUCT_DATA=FILE"; exit 2; }
	@echo "finetune-instruct: $(if $(INSTRUCT_HF),GPT-2 weights from $(INSTRUCT_HF) (the classic protocol),no GPT-2 weights given (INSTRUCT_HF=DIR): a small random model, a short run)"
	rm -rf $(INSTRUCT_OUT)
	$(RUN) -m jaxllm finetune instruct $(if $(INSTRUCT_HF),--hf $(INSTRUCT_HF),$(INSTRUCT_SMALL)) \
		--data $(INSTRUCT_DATA) $(if $(INSTRUCT_VOCAB),--tokenizer-dir $(INSTRUCT_VOCAB)) \
		--out $(INSTRUCT_OUT) $(INSTRUCT_ARGS)

# Preference tuning (DPO, the book's chapter 7 bonus) on the shared preference data (or
# DPO_DATA=FILE). With GPT-2 weights (DPO_HF=DIR, or GPT2_DIR as for finetune-instruct) it first
# runs instruction tuning (finetune-instruct) and then DPO from that run with the book's
# protocol; without, a short DPO run of a small random model (a trial, not the result).
.PHONY: finetune-dpo
comma := ,
DPO_DATA ?= $(firstword $(wildcard ../shared/data/instruction-data-with-preference.json ../../shared/data/instruction-data-with-preference.json))
DPO_HF ?= $(INSTRUCT_HF)
DPO_OUT ?= runs/dpo
DPO_SMALL ?= --init random --preset small --tokenizer gpt2 --set context_length=512 \
	--steps 40 --set lr=1e-4 --eval-every 10 --max-new-tokens 64
DPO_ARGS ?=
finetune-dpo: $(STAMP)  ## preference tuning (DPO) on the shared data: instruct then DPO from GPT-2 weights, else a small random model
	@test -n "$(DPO_DATA)" || { echo "no preference data found beside the checkout: make finetune-dpo DPO_DATA=FILE"; exit 2; }
	@echo "finetune-dpo: $(if $(DPO_HF),GPT-2 weights from $(DPO_HF): instruction tuning into $(INSTRUCT_OUT)$(comma) then DPO from it (the book's protocol),no GPT-2 weights given (DPO_HF=DIR): a small random model$(comma) a short DPO run)"
	$(if $(DPO_HF),$(MAKE) finetune-instruct INSTRUCT_HF=$(DPO_HF))
	rm -rf $(DPO_OUT)
	$(RUN) -m jaxllm finetune dpo $(if $(DPO_HF),--run-dir $(INSTRUCT_OUT) --protocol book,$(DPO_SMALL)) \
		--data $(DPO_DATA) $(if $(INSTRUCT_VOCAB),--tokenizer-dir $(INSTRUCT_VOCAB)) \
		--out $(DPO_OUT) $(DPO_ARGS)

# Classification fine-tuning (the book's chapter 6: spam or not) on the shared SMS Spam
# Collection (or CLASSIFY_DATA=FILE). With GPT-2 weights (CLASSIFY_HF=DIR, or GPT2_DIR holding
# model.safetensors or pytorch_model.bin) it runs the classic protocol; with CLASSIFY_RUN=DIR
# it starts from a jaxllm run; without either, a small random model with every leaf trained
# (a trial, not the result).
.PHONY: finetune-classify bench-classify
CLASSIFY_DATA ?= $(firstword $(wildcard ../shared/data/sms_spam_collection.tsv ../../shared/data/sms_spam_collection.tsv))
CLASSIFY_HF ?= $(if $(wildcard $(GPT2_DIR)/model.safetensors $(GPT2_DIR)/pytorch_model.bin),$(GPT2_DIR))
CLASSIFY_RUN ?=
CLASSIFY_VOCAB ?= $(firstword $(wildcard ../shared/data ../../shared/data))
CLASSIFY_OUT ?= runs/classify
CLASSIFY_SMALL ?= --init random --preset small --tokenizer gpt2 --trainable all --set lr=1e-3
CLASSIFY_ARGS ?=
finetune-classify: $(STAMP)  ## spam classification on the shared data (CLASSIFY_HF=DIR for GPT-2)
	@test -n "$(CLASSIFY_DATA)" || { echo "no sms_spam_collection.tsv found beside the checkout: make finetune-classify CLASSIFY_DATA=FILE"; exit 2; }
	@echo "finetune-classify: $(if $(CLASSIFY_HF),GPT-2 weights from $(CLASSIFY_HF) (the classic protocol),$(if $(CLASSIFY_RUN),the jaxllm run $(CLASSIFY_RUN) (the classic protocol),no GPT-2 weights given (CLASSIFY_HF=DIR): a small random model; the published accuracies need OpenAI's GPT-2 weights))"
	rm -rf $(CLASSIFY_OUT)
	$(RUN) -m jaxllm finetune classify $(if $(CLASSIFY_HF),--hf $(CLASSIFY_HF) --protocol book,$(if $(CLASSIFY_RUN),--run-dir $(CLASSIFY_RUN) --protocol book,$(CLASSIFY_SMALL))) \
		--data $(CLASSIFY_DATA) $(if $(CLASSIFY_VOCAB),--tokenizer-dir $(CLASSIFY_VOCAB)) \
		--out $(CLASSIFY_OUT) $(CLASSIFY_ARGS)

bench-classify: $(STAMP)  ## frozen layers cost no gradient work (results/bench_classify)
	$(RUN) -m experiments.bench_classify
