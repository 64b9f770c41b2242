"""`jaxllm generate`: text from Hugging Face GPT-2 weights or a training run.

    jaxllm generate --hf path/to/gpt2 --tokenizer-dir shared/data --prompt "Every effort moves you"
    jaxllm generate --run-dir runs/small --prompt "ROMEO:" --temperature 0.8 --top-k 40

`--hf` takes a `model.safetensors` file or a directory holding it. The
architecture comes from the Hugging Face `config.json` beside it (n_embd,
n_layer, n_head, vocab_size, n_positions, n_inner, layer_norm_epsilon,
tie_word_embeddings); without one it is read off the tensor shapes, with
`--n-heads` (default: emb_dim / 64, as in every GPT-2 size). GPT-2's query,
key and value projections have biases, so `qkv_bias=True`.

Tokens are printed as they are produced; a token that ends inside a UTF-8
character waits for the bytes that complete it.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys

from jaxllm.cli import add_fallback_argument

ARCH_KEYS = {"n_embd": "emb_dim", "n_layer": "n_layers", "n_head": "n_heads",
             "vocab_size": "vocab_size", "n_positions": "context_length"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="PATH",
                        help="Hugging Face GPT-2 weights: model.safetensors or its directory")
    source.add_argument("--run-dir", metavar="DIR", help="a jaxllm training run (checkpoint)")
    add_fallback_argument(parser)
    parser.add_argument("--prompt", default="",
                        help="text to continue (empty: start from the end-of-text token)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy decoding (the default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample within the nucleus of probability p")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--tokenizer", choices=("byte", "gpt2"), default=None,
                        help="default: gpt2 for --hf; --run-dir takes the run's own tokenizer "
                             "(another is refused)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder with gpt2.tiktoken (or encoder.json + vocab.bpe)")
    parser.add_argument("--n-heads", type=int, default=None,
                        help="attention heads, for a safetensors file without config.json")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep going after the end-of-text token")
    parser.add_argument("--no-slide", action="store_true",
                        help="refuse to run past the context length instead of sliding")
    parser.add_argument("--no-stream", action="store_true",
                        help="print the text once at the end instead of token by token")


def hf_config(path: str, n_heads: int | None = None):
    """A `GPTConfig` for Hugging Face GPT-2 weights at `path` (file or directory)."""
    from jaxllm.config import GPTConfig
    from jaxllm.hf import load_state_dict

    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_file = os.path.join(directory, "config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            hf = json.load(f)
        missing = sorted(set(ARCH_KEYS) - set(hf))
        if missing:
            raise ValueError(f"{config_file} lacks GPT-2 key(s) {missing}")
        kwargs = {ours: hf[theirs] for theirs, ours in ARCH_KEYS.items()}
        if n_heads is not None:
            kwargs["n_heads"] = n_heads
        kwargs["ffn_dim"] = hf.get("n_inner")
        kwargs["ln_eps"] = hf.get("layer_norm_epsilon", 1e-5)
        kwargs["tie_embeddings"] = hf.get("tie_word_embeddings", True)
    else:  # read the architecture off the tensor shapes
        sd = load_state_dict(path)
        for key in ("transformer.wte.weight", "transformer.wpe.weight"):
            if key not in sd:
                raise ValueError(f"{path} has no {key}; is it GPT-2 in Hugging Face format?")
        vocab, emb = sd["transformer.wte.weight"].shape
        layers = {k.split(".")[2] for k in sd if k.startswith("transformer.h.")}
        head = sd.get("lm_head.weight")
        tied = head is None or bool((head == sd["transformer.wte.weight"]).all())
        kwargs = dict(vocab_size=int(vocab), emb_dim=int(emb), n_layers=len(layers),
                      context_length=int(sd["transformer.wpe.weight"].shape[0]),
                      n_heads=n_heads if n_heads is not None else max(1, int(emb) // 64),
                      ffn_dim=int(sd["transformer.h.0.mlp.c_fc.weight"].shape[1]),
                      tie_embeddings=tied)
    return GPTConfig(qkv_bias=True, drop_rate=0.0, **kwargs)


def load_model(args):
    """(params, config, default tokenizer name) from --hf or --run-dir."""
    if args.hf is not None:
        from jaxllm.hf import from_hf_state_dict

        if not os.path.exists(args.hf):
            raise FileNotFoundError(f"--hf {args.hf}: no such file or directory")
        config = hf_config(args.hf, args.n_heads)
        return from_hf_state_dict(args.hf, config), config, "gpt2"
    return load_language_model(args.run_dir, fallback=not args.no_fallback)[:3]


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
    from jaxllm.tokenizer import get_tokenizer

    params, config, default_tokenizer = load_model(args)
    if args.run_dir is not None:  # the run's own tokenizer, or a clear refusal
        from jaxllm.cli.pretrain import check_run_tokenizer

        check_run_tokenizer(args.run_dir, default_tokenizer, args.tokenizer, "generate")
    tokenizer = get_tokenizer(args.tokenizer or default_tokenizer, args.tokenizer_dir)
    if config.vocab_size > tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({config.vocab_size}) is larger than the "
                         f"{tokenizer.name} tokenizer's ({tokenizer.vocab_size})")
    if config.vocab_size < tokenizer.vocab_size:  # its ids would index past the embedding
        raise ValueError(f"the model's vocabulary ({config.vocab_size} ids) cannot hold the "
                         f"{tokenizer.name} tokenizer's ids (0 to {tokenizer.vocab_size - 1}); "
                         f"give the --tokenizer the model was trained with")
    prompt = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eot_id]
    eos_id = None if args.ignore_eos else tokenizer.eot_id
    stream = generate_stream(
        params, config, prompt, args.max_new_tokens, rng=jax.random.PRNGKey(args.seed),
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id,
        allow_slide=not args.no_slide, chunk_size=64 if args.no_stream else 1)

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tokens, _ in stream:
        for token in tokens[0].tolist():
            if token == eos_id:
                break
            out.write(text.decode(token_bytes(tokenizer, token)))
        out.flush()
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    return 0
