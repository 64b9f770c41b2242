"""`jaxllm eval perplexity`: the sliding-window perplexity of held-out text.

    jaxllm eval perplexity --run-dir runs/pretrain --data held_out.txt
    jaxllm eval perplexity --hf path/to/gpt2 --data texts/ --stride 512 --out results/ppl

The text (a UTF-8 file, or a folder's *.txt files joined by end-of-text) is
tokenized with the model's tokenizer and scored by `jaxllm.eval.perplexity`,
the method of Hugging Face's perplexity guide. Prints the perplexity and the
number of tokens scored and writes them to eval.json (in --out, by default the
run folder, or the current folder for --hf).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxllm.cli import add_fallback_argument, add_tokenizer_arguments, hf_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxllm.cli import HelpFormatter

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True,
                                help="perplexity: the sliding-window perplexity of held-out text "
                                     "(jaxllm eval perplexity --help)")
    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of held-out text",
                         formatter_class=HelpFormatter)
    source = ppl.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", metavar="DIR", help="a jaxllm run (its latest checkpoint)")
    hf_source.add_hf_argument(source)
    add_fallback_argument(ppl)
    ppl.add_argument("--data", required=True, metavar="FILE_OR_FOLDER",
                     help="UTF-8 text: a file, or a folder of *.txt files")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens between window starts (default: the context length)")
    ppl.add_argument("--out", default=None, metavar="DIR",
                     help="where eval.json goes (default: the run folder, else .)")
    add_tokenizer_arguments(ppl, default="the run's own, or the --hf folder's")
    ppl.add_argument("--n-heads", type=int, default=None,
                     help="attention heads, for a safetensors file without config.json")


def run(args: argparse.Namespace) -> int:
    try:
        from jaxllm.cli.generate import load_model
        from jaxllm.data.corpus import read_documents, tokenize_documents
        from jaxllm.eval.perplexity import sliding_window_perplexity

        params, config, tokenizer, _ = load_model(args, "evaluate")
        ids = tokenize_documents(read_documents(args.data), tokenizer)
        result = sliding_window_perplexity(params, config, ids, stride=args.stride)
        record = {"task": "perplexity", "data": os.path.abspath(args.data),
                  "model": args.run_dir or args.hf, "stride": args.stride or config.context_length,
                  "context_length": config.context_length, "tokens": result.tokens,
                  "windows": result.windows, "loss": result.loss,
                  "perplexity": result.perplexity}
        out = args.out or args.run_dir or "."
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "eval.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"perplexity {result.perplexity:.4f} (loss {result.loss:.5f}) over "
              f"{result.tokens} tokens in {result.windows} windows; {path}")
        return 0
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"jaxllm eval: error: {err}", file=sys.stderr)
        return 2
