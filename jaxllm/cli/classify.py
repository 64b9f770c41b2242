"""`jaxllm classify`: labels for texts from a classification run.

    jaxllm classify --run-dir runs/classify --text "You won a prize! Call now"
    jaxllm classify --run-dir runs/classify --file messages.txt    # one text per line
    cat messages.txt | jaxllm classify --run-dir runs/classify --file -

Each text gives one line: the label, its probability, and the text (tab
separated); `--json` prints every class's probability as JSON lines instead,
and whether the text was cut (`truncated`). A text longer than the rows the
classifier was trained on (at most its context) is labelled on its first
tokens, with a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxllm.cli import add_fallback_argument, utf8_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, metavar="DIR",
                        help="a run of jaxllm finetune classify")
    add_fallback_argument(parser)
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        type=utf8_text,
                        help="a text to classify (repeatable)")
    parser.add_argument("--file", metavar="PATH",
                        help="texts, one per line ('-' reads standard input)")
    parser.add_argument("--tokenizer-dir", metavar="DIR",
                        help="folder with gpt2.tiktoken (or encoder.json + vocab.bpe)")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines with every class's probability")


def read_texts(path: str) -> list[str]:
    """The non-empty lines of `path` ('-': standard input). Read as bytes and
    decoded here, so that bad input is named by file and line rather than by
    the codec's byte offsets."""
    if path == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:  # already text (a test's StringIO): nothing to decode
            return [line.rstrip("\n") for line in sys.stdin if line.strip()]
        raw, name = stdin.read(), "standard input"
    else:
        if os.path.isdir(path):
            raise ValueError(f"--file {path} is a folder, not a file of texts")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ValueError(f"--file {path}: no such file") from None
        except OSError as err:
            raise ValueError(f"--file {path} cannot be read: {err.strerror}") from None
        name = f"--file {path}"
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{name} line {number} is not valid UTF-8 (byte {err.start} of "
                             f"the line is {line[err.start:err.start + 1]!r})") from None
        text = text.removeprefix("\ufeff") if number == 1 else text  # a byte-order mark
        if text.strip():
            texts.append(text)
    return texts


def run(args) -> int:
    texts = list(args.text)
    try:
        if args.file is not None:
            texts += read_texts(args.file)
        if not texts:
            raise ValueError("no texts: give --text TEXT or --file PATH (or --file - for stdin)")
        from jaxllm.finetune.classify_run import classify_texts, load_classifier

        classifier = load_classifier(args.run_dir, fallback=not args.no_fallback)
        results = classify_texts(args.run_dir, texts, tokenizer_dir=args.tokenizer_dir,
                                 classifier=classifier)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"jaxllm classify: error: {err}", file=sys.stderr)
        return 2
    width = min(classifier["meta"]["max_length"], classifier["config"].context_length)
    for number, (text, r) in enumerate(zip(texts, results), 1):
        if r["truncated"]:
            print(f"warning: text {number} ({text[:40]!r}...) is longer than the {width} tokens "
                  f"the classifier reads (its training rows' width); it was labelled on its "
                  f"first {width} tokens only", file=sys.stderr)
    for text, r in zip(texts, results):
        if args.json:
            print(json.dumps({"text": text, **r}))
        else:
            print(f"{r['label']}\t{r['probability']:.4f}\t{text}")
    return 0
