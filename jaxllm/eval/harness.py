"""jaxllm as a model of EleutherAI's lm-evaluation-harness (`lm_eval`).

    jaxllm eval harness --tasks hellaswag,arc_easy --hf path/to/gpt2
    lm_eval.simple_evaluate(model="jaxllm", model_args="hf=path/to/gpt2", tasks=[...])

Importing this module registers the model as "jaxllm" (`lm_eval`'s registry
has no plugin discovery, so `jaxllm eval harness` and `python -m
jaxllm.eval.lm_eval_cli`, lm_eval's own command line, import it first). Log-likelihoods come from `jaxllm.eval.score` (the batched
forward, requests sorted by length), generations from `jaxllm.generate`
(requests with the same settings batched, longest first). Needs the eval
extra: pip install "jaxllm[eval]".
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from jaxllm.eval.score import Scored, score


@register_model("jaxllm")
class JaxLLM(TemplateLM):
    """A jaxllm run (`run_dir=`) or Hugging Face folder (`hf=`), loaded as
    `jaxllm generate` loads it, with the same tokenizer search; or `model=`
    (params, config, tokenizer) already loaded. lm_eval's `device` and
    `max_batch_size` are taken and unused (JAX places the arrays)."""

    def __init__(self, run_dir: str | None = None, hf: str | None = None, *,
                 batch_size: int | str = 8, max_gen_toks: int = 256,
                 tokenizer: str | None = None, tokenizer_dir: str | None = None,
                 no_fallback: bool = False, model=None, device=None, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"jaxllm: unknown model argument(s) {', '.join(sorted(unknown))} "
                             "(it takes run_dir, hf, batch_size, max_gen_toks, tokenizer, "
                             "tokenizer_dir, no_fallback)")
        if model is None:
            from jaxllm.cli.generate import load_model

            if (run_dir is None) == (hf is None):
                raise ValueError("jaxllm: give exactly one of run_dir= and hf=")
            args = argparse.Namespace(run_dir=run_dir, hf=hf, tokenizer=tokenizer,
                                      tokenizer_dir=tokenizer_dir, no_fallback=no_fallback)
            model = load_model(args, "evaluate")[:3]
        self.params, self.config, self.tok = model
        self.batch_size = 8 if batch_size in ("auto", None) else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.config.context_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string, allow_eot=True)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def _score(self, rows: list[Scored], disable_tqdm: bool) -> list:
        with tqdm(total=len(rows), disable=disable_tqdm, desc="jaxllm scoring") as bar:
            return score(self.params, self.config, rows, batch_size=self.batch_size,
                         progress=bar.update)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log p(continuation | context), greedy) per request; the context is
        cut from the left to fit, as lm_eval's `hf` model cuts it."""
        rows = []
        for _, context, continuation in requests:
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append(Scored(tokens, len(continuation)))
        return [(s.logprob, s.greedy) for s in self._score(rows, disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm_eval's disjoint rolling
        windows (one token of overlap, end-of-text before the first)."""
        rows, owner = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, predicted in map(make_disjoint_window, windows):
                rows.append(Scored(context + predicted, len(predicted)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(rows, disable_tqdm)):
            totals[i] += s.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `temperature` > 0) continuations, each cut at
        the first of its `until` strings; requests with the same settings are
        batched, longest prompt first."""
        import jax

        from jaxllm.generate import generate

        groups = defaultdict(list)
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) \
                if kwargs.pop("do_sample", True) else 0.0
            groups[(max_new, temperature)].append((i, context, until))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="jaxllm generating")
        for (max_new, temperature), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                keep = self.max_length - max_new  # room for the new tokens
                prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-max(1, keep):]
                           for _, c, _ in chunk]
                result = generate(self.params, self.config, prompts, max_new,
                                  temperature=temperature,
                                  rng=jax.random.key(0) if temperature > 0 else None,
                                  eos_id=self.eot_token_id)
                for r, (i, _, until) in enumerate(chunk):
                    new = [int(t) for t in result.tokens[r, :result.lengths[r]]]
                    text = self.tok_decode(new[:-1] if new and new[-1] == self.eot_token_id
                                           else new)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]
