"""`jaxllm generate`: text from Hugging Face weights (GPT-2, Llama 3, Qwen3) or a training run.

    jaxllm generate --hf path/to/gpt2 --prompt "Every effort moves you"
    jaxllm generate --run-dir runs/small --prompt "ROMEO:" --temperature 0.8 --top-k 40

`--hf` takes what every command's `--hf` takes (`jaxllm.cli.hf_source`): a
GPT-2, Llama 3 or Qwen3 folder (`config.json` and `model.safetensors`, its
shards or `pytorch_model.bin`), a weights file in one, or a hub name; the
architecture is the folder's `config.json`'s (`jaxllm.load_hf`).

The tokenizer is the run's own, found where the run found it, or the
`--hf` folder's own (its `tokenizer.json`, or GPT-2's `vocab.json` +
`merges.txt`), else GPT-2's from `$JAXLLM_GPT2_DIR` or a `shared/data` folder
above the checkout (`jaxllm.tokenizer.get_tokenizer`). Generation stops at any
of the tokenizer's end-of-text or end-of-turn ids.

Tokens are printed as they are produced; a token that ends inside a UTF-8
character waits for the bytes that complete it.
"""

from __future__ import annotations

import argparse
import codecs
import sys

from jaxllm.cli import (add_cpu_recipe_argument, add_fallback_argument, add_tokenizer_arguments,
                        hf_source, utf8_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    hf_source.add_hf_argument(source)
    source.add_argument("--run-dir", metavar="DIR", help="a jaxllm training run (checkpoint)")
    add_fallback_argument(parser)
    parser.add_argument("--prompt", default="", type=utf8_text,
                        help="text to continue (empty: start from the end-of-text token)")
    parser.add_argument("--max-new-tokens", type=int, default=50,
                        help="tokens to generate (fewer when end-of-text comes first)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy decoding; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k most likely (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample within the nucleus of probability p (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    add_tokenizer_arguments(parser, default="the --hf folder's own (its tokenizer.json, or "
                                    "GPT-2's); --run-dir takes the run's own (another is "
                                    "refused)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep going after the end-of-text (or end-of-turn) tokens")
    parser.add_argument("--no-slide", action="store_true",
                        help="refuse to run past the context length instead of sliding")
    parser.add_argument("--no-stream", action="store_true",
                        help="print the text once at the end instead of token by token")
    add_cpu_recipe_argument(parser)


def load_model(args, verb: str = "generate"):
    """(params, config, tokenizer, the run's metadata or {}) from --hf or
    --run-dir, the tokenizer checked against the model; `generate` and `chat`
    share it (`verb`: what the command does, for the messages)."""
    from jaxllm.tokenizer import check_vocab, get_tokenizer, recorded_places

    if args.hf is not None:
        model = hf_source.load(args.hf)
        params, config, default_tokenizer, meta = model.params, model.config, None, {}
        places = [(model.path, f"--hf {args.hf}")]  # the folder's own tokenizer files
    else:
        from jaxllm.cli.pretrain import check_run_tokenizer

        params, config, default_tokenizer, meta = load_language_model(
            args.run_dir, fallback=not args.no_fallback)
        # the run's own tokenizer, or a clear refusal
        check_run_tokenizer(args.run_dir, default_tokenizer, args.tokenizer, verb)
        places = recorded_places(meta, args.run_dir)  # where the run found its files
    tokenizer = get_tokenizer(args.tokenizer or default_tokenizer, args.tokenizer_dir,
                              places=places, vocab_size=config.vocab_size)
    check_vocab(config.vocab_size, tokenizer)
    if getattr(args, "cpu_recipe", False):
        config = inference_recipe(config)
    return params, config, tokenizer, meta


def inference_recipe(config):
    """`config` with the CPU recipe's dense-layer and LayerNorm kernels where
    they apply (`jaxllm.kernels.recipe.cpu_recipe`): MKL's products need
    float32, the row-wise norm LayerNorm. The same numbers as the defaults
    to float32 rounding (the parity tests of the recipe)."""
    from jaxllm.kernels.recipe import cpu_recipe

    recipe = cpu_recipe()
    changes = {}
    if recipe.get("matmul_impl", "xla") != "xla" and config.compute_dtype == "float32":
        changes["matmul_impl"] = recipe["matmul_impl"]
    if recipe.get("norm_impl", "xla") != "xla" and config.norm == "layernorm" \
            and config.compute_dtype == "float32":
        changes["norm_impl"] = recipe["norm_impl"]
    return config.replace(**changes)


def load_language_model(run_dir, *, fallback: bool = True):
    """(params, config, tokenizer name, metadata) of a run that still has its LM
    head: a classifier's head gives class scores, not next tokens, so text
    from it would be noise."""
    from jaxllm.config import GPTConfig
    from jaxllm.train.checkpoint import load_params_and_meta

    params, meta = load_params_and_meta(run_dir, fallback=fallback)
    if meta.get("kind") == "classify":
        raise ValueError(f"--run-dir {run_dir} is a classifier (its LM head was replaced by a "
                         f"class head) and writes no text; label texts with "
                         f"`jaxllm classify --run-dir {run_dir}`")
    return params, GPTConfig.from_dict(meta["model"]), meta["tokenizer"], meta


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes one token stands for."""
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes([token])
    return tokenizer.decode([token]).encode("utf-8") if token >= 256 else bytes([token])


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxllm generate: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import jax

    from jaxllm.generate import generate_stream

    params, config, tokenizer, _ = load_model(args)
    prompt = tokenizer.encode_prompt(args.prompt)
    eos_id = None if args.ignore_eos else tokenizer.eot_id
    stops = set() if args.ignore_eos else set(tokenizer.stop_ids)
    stream = generate_stream(
        params, config, prompt, args.max_new_tokens, rng=jax.random.PRNGKey(args.seed),
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id,
        allow_slide=not args.no_slide, chunk_size=64 if args.no_stream else 1)

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stopped = False
    for tokens, _ in stream:
        for token in tokens[0].tolist():
            if token in stops:
                stopped = True
                break
            out.write(text.decode(token_bytes(tokenizer, token)))
        out.flush()
        if stopped:  # an end-of-turn id the decoder does not stop on itself
            break
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    return 0
