"""`jaxllm serve`: an OpenAI-compatible server for a run or Hugging Face weights.

    jaxllm serve --run-dir runs/instruct                 # http://127.0.0.1:8000/v1
    jaxllm serve --hf path/to/gpt2 --port 8080 --slots 16
    jaxllm serve --run-dir runs/lora --host 0.0.0.0 --api-key "$KEY"

Any client of the OpenAI API can then call `/v1/completions` and
`/v1/chat/completions` (the model's name is `--model-name`, by default the
run's or folder's name; `GET /v1/models` lists it). Chat messages are put in
the run's prompt format, or the `--hf` folder's chat template. Concurrent
requests share the decoding steps over `--slots` KV-cache slots (continuous
batching: `jaxllm.serve.scheduler`). The model loads as `jaxllm generate`
loads it (a LoRA run's adapters unmerged), with the same tokenizer search.
Needs the serve extra: pip install "jaxllm[serve]".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jaxllm.cli import (add_cpu_recipe_argument, add_fallback_argument, add_tokenizer_arguments,
                        hf_source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", metavar="DIR", help="a jaxllm run (its latest checkpoint)")
    hf_source.add_hf_argument(source)
    add_fallback_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument("--slots", type=int, default=8,
                        help="requests decoded together (KV-cache slots); more wait their turn")
    parser.add_argument("--model-name", default=None,
                        help="the model's name in the API (default: the run's or folder's name)")
    parser.add_argument("--style", choices=("alpaca", "chat", "template"), default=None,
                        help="how chat messages become a prompt (default: the run's own format; "
                             "for --hf the folder's chat template, else alpaca)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="compile on the first requests instead of before listening")
    add_tokenizer_arguments(parser, default="the run's own, or the --hf folder's")
    add_cpu_recipe_argument(parser)


def build(args: argparse.Namespace):
    """(the FastAPI app, the served model) for the parsed arguments; the
    scheduler's thread is started."""
    from jaxllm.cli.chat import prompt_style
    from jaxllm.cli.generate import load_model, token_bytes
    from jaxllm.serve.app import ServedModel, create_app, start_scheduler
    from jaxllm.serve.engine import SlotEngine
    from jaxllm.serve.scheduler import Scheduler

    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    params, config, tokenizer, meta = load_model(args, "serve")
    style = args.style or prompt_style(meta, tokenizer)
    if style == "template" and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--style template: the {tokenizer.name} tokenizer has no chat template")
    engine = SlotEngine(params, config, args.slots)
    if not args.no_warmup:
        engine.warm_up()
    scheduler = Scheduler(engine, lambda t: token_bytes(tokenizer, t), tokenizer.stop_ids)
    name = args.model_name or os.path.basename(os.path.normpath(args.run_dir or args.hf))
    served = ServedModel(name, scheduler, tokenizer, style, created=int(time.time()))
    start_scheduler(scheduler)
    return create_app(served, api_key=args.api_key), served


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        print(f"jaxllm serve: error: {err.name} is not installed; pip install \"jaxllm[serve]\"",
              file=sys.stderr)
        return 2
    try:
        app, served = build(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxllm serve: error: {err}", file=sys.stderr)
        return 2
    print(f"jaxllm serve: {served.name} on http://{args.host}:{args.port}/v1 "
          f"({args.slots} slots, {served.style} prompts for chat)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        served.scheduler.close()
    return 0
