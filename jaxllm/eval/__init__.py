"""Evaluation: the sliding-window perplexity of held-out text (`perplexity.py`)."""
