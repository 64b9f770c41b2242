"""`jaxllm eval`: the sliding-window perplexity of held-out text, and
lm-evaluation-harness tasks.

    jaxllm eval perplexity --run-dir runs/pretrain --data held_out.txt
    jaxllm eval perplexity --hf path/to/gpt2 --data texts/ --stride 512 --out results/ppl
    jaxllm eval harness --hf path/to/gpt2 --tasks hellaswag,arc_easy

The text (a UTF-8 file, or a folder's *.txt files joined by end-of-text) is
tokenized with the model's tokenizer and scored by `jaxllm.eval.perplexity`,
the method of Hugging Face's perplexity guide. Prints the perplexity and the
number of tokens scored and writes them to eval.json (in --out, by default the
run folder, or the current folder for --hf).

`harness` runs lm_eval's tasks (or those of YAML files in --include-path) on
the model registered as lm_eval's "jaxllm" (`jaxllm.eval.harness`), prints
lm_eval's table and writes the results to eval.json the same way. It needs the
eval extra: pip install "jaxllm[eval]".
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
                                help="perplexity: the sliding-window perplexity of held-out text; "
                                     "harness: lm-evaluation-harness tasks (jaxllm eval WHAT "
                                     "--help)")
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
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    harness = sub.add_parser("harness", formatter_class=HelpFormatter,
                             help="lm-evaluation-harness tasks (pip install \"jaxllm[eval]\")")
    source = harness.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", metavar="DIR", help="a jaxllm run (its latest checkpoint)")
    hf_source.add_hf_argument(source)
    add_fallback_argument(harness)
    harness.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    harness.add_argument("--include-path", metavar="DIR", default=None,
                         help="a folder of task YAML files besides lm_eval's own")
    harness.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt")
    harness.add_argument("--limit", type=float, default=None,
                         help="documents per task (below 1: a fraction of them)")
    harness.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    harness.add_argument("--max-gen-toks", type=int, default=256,
                         help="tokens generated at most where a task does not say")
    harness.add_argument("--out", default=None, metavar="DIR",
                         help="where eval.json goes (default: the run folder, else .)")
    add_tokenizer_arguments(harness, default="the run's own, or the --hf folder's")


def _write(args: argparse.Namespace, record: dict) -> str:
    """eval.json in --out (default: the run folder, else the current one); its path."""
    out = args.out or args.run_dir or "."
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "eval.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    return path


def _harness(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from jaxllm.eval.harness import JaxLLM
    except ImportError as err:
        print(f"jaxllm eval harness: error: {err.name} is not installed; "
              f"pip install \"jaxllm[eval]\"", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    tasks = [t for t in args.tasks.split(",") if t]
    manager = None
    if args.include_path:  # lm_eval's own index (~15,000 tasks, seconds) read only if needed
        manager = TaskManager(include_path=args.include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'} "
                         f"(`lm_eval ls tasks` lists them; --include-path adds a folder of "
                         f"task YAML files)")
    model = JaxLLM(run_dir=args.run_dir, hf=args.hf, batch_size=args.batch_size,
                   max_gen_toks=args.max_gen_toks, tokenizer=args.tokenizer,
                   tokenizer_dir=args.tokenizer_dir, no_fallback=args.no_fallback)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=manager)
    path = _write(args, {"task": "harness", "tasks": tasks, "model": args.run_dir or args.hf,
                         "results": results["results"], "n-samples": results.get("n-samples"),
                         "num_fewshot": args.num_fewshot, "limit": args.limit})
    print(lm_eval.utils.make_table(results))
    print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.what == "harness":
            return _harness(args)
        from jaxllm.cli.generate import load_model
        from jaxllm.data.corpus import read_documents, tokenize_documents
        from jaxllm.eval.perplexity import sliding_window_perplexity

        params, config, tokenizer, _ = load_model(args, "evaluate")
        ids = tokenize_documents(read_documents(args.data), tokenizer)
        result = sliding_window_perplexity(params, config, ids, stride=args.stride,
                                           batch_size=args.batch_size)
        record = {"task": "perplexity", "data": os.path.abspath(args.data),
                  "model": args.run_dir or args.hf, "stride": args.stride or config.context_length,
                  "context_length": config.context_length, "tokens": result.tokens,
                  "windows": result.windows, "loss": result.loss,
                  "perplexity": result.perplexity}
        path = _write(args, record)
        print(f"perplexity {result.perplexity:.4f} (loss {result.loss:.5f}) over "
              f"{result.tokens} tokens in {result.windows} windows; {path}")
        return 0
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"jaxllm eval {args.what}: error: {err}", file=sys.stderr)
        return 2
