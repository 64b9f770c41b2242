"""`jaxllm classify`: labels for texts from a classification run.

    jaxllm classify --run-dir runs/classify --text "You won a prize! Call now"
    jaxllm classify --run-dir runs/classify --file messages.txt    # one text per line
    cat messages.txt | jaxllm classify --run-dir runs/classify --file -

Each text gives one line: the label, its probability, and the text (tab
separated); `--json` prints every class's probability as JSON lines instead.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, metavar="DIR",
                        help="a run of jaxllm finetune classify")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="a text to classify (repeatable)")
    parser.add_argument("--file", metavar="PATH",
                        help="texts, one per line ('-' reads standard input)")
    parser.add_argument("--tokenizer-dir", metavar="DIR",
                        help="folder with gpt2.tiktoken (or encoder.json + vocab.bpe)")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines with every class's probability")


def run(args) -> int:
    texts = list(args.text)
    try:
        if args.file == "-":
            texts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
        elif args.file is not None:
            with open(args.file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError("no texts: give --text TEXT or --file PATH (or --file - for stdin)")
        from jaxllm.finetune.loop import classify_texts

        results = classify_texts(args.run_dir, texts, tokenizer_dir=args.tokenizer_dir)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"jaxllm classify: error: {err}", file=sys.stderr)
        return 2
    for text, r in zip(texts, results):
        if args.json:
            print(json.dumps({"text": text, **r}))
        else:
            print(f"{r['label']}\t{r['probability']:.4f}\t{text}")
    return 0
