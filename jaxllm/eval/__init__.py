"""Evaluation: the sliding-window perplexity of held-out text (`perplexity.py`)
and lm-evaluation-harness tasks (`harness.py`, with the eval extra), both on
one batched scorer of token log-likelihoods (`score.py`)."""
