"""`jaxllm chat`: talk to an instruction-tuned run in the terminal.

    jaxllm chat --run-dir runs/instruct
    jaxllm chat --run-dir runs/instruct --prompt "Name three primary colors."   # one answer
    jaxllm chat --hf gpt2-medium-instruct/        # Hugging Face weights
    jaxllm chat --hf path/to/model-instruct       # its tokenizer and chat template

Each line typed is an instruction; it is wrapped in the run's prompt format
(the style it was fine-tuned with, or `--style`), and the response is printed
token by token as the KV-cached decoder produces it, until an end-of-text or
end-of-turn token (the tokenizer's `stop_ids`: `<|eot_id|>`, `<|im_end|>`, ...)
or `--max-new-tokens`. A `--hf` folder with a chat template (its
tokenizer_config.json's `chat_template`) has each line rendered in it as a
user turn (`--style template`). Each turn is answered on its own, without the earlier
ones (the model was trained on single turns). An empty line, "/quit" or end
of input ends the session.
"""

from __future__ import annotations

import argparse
import codecs
import sys

from jaxllm.cli import (add_cpu_recipe_argument, add_fallback_argument, add_tokenizer_arguments,
                        hf_source, utf8_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", metavar="DIR",
                        help="a jaxllm run (instruction fine-tuned, preferably)")
    hf_source.add_hf_argument(source)
    add_fallback_argument(parser)
    parser.add_argument("--prompt", default=None, type=utf8_text,
                        help="answer this one instruction and exit (no prompt loop)")
    parser.add_argument("--style", choices=("alpaca", "chat", "template"), default=None,
                        help="prompt format; template: the tokenizer's chat template (default: "
                             "the run's own; for --hf the folder's template, else alpaca)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="the longest answer, in tokens (it ends sooner at end-of-text)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy decoding; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k most likely tokens, with --temperature > 0 "
                             "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    add_tokenizer_arguments(parser, default="the run's own, or the --hf folder's")
    add_cpu_recipe_argument(parser)


def answer(params, config, tokenizer, instruction: str, style: str, args, out) -> str:
    """Stream the response to `instruction` to `out`; return it."""
    import jax

    from jaxllm.cli.generate import token_bytes
    from jaxllm.finetune.instruct import format_prompt
    from jaxllm.generate import generate_stream

    if style == "template":
        ids = tokenizer.encode_chat([{"role": "user", "content": instruction}])
    else:
        ids = tokenizer.encode(format_prompt({"instruction": instruction, "input": ""}, style))
    stream = generate_stream(params, config, ids, args.max_new_tokens,
                             rng=jax.random.PRNGKey(args.seed), temperature=args.temperature,
                             top_k=args.top_k, eos_id=tokenizer.eot_id, chunk_size=1)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, stopped = [], False
    for tokens, _ in stream:
        for token in tokens[0].tolist():
            if token in tokenizer.stop_ids:
                stopped = True
                break
            piece = decoder.decode(token_bytes(tokenizer, token))
            pieces.append(piece)
            out.write(piece)
        out.flush()
        if stopped:  # an end-of-turn id the decoder does not stop on itself
            break
    tail = decoder.decode(b"", final=True)
    out.write(tail + "\n")
    out.flush()
    return "".join(pieces) + tail


def prompt_style(meta: dict, tokenizer) -> str:
    """The run's own format (as `instruct_run.prompt_style_of` reads it), else
    the tokenizer's chat template (a Hugging Face folder's), else alpaca."""
    style = (meta.get("instruct") or meta.get("dpo") or {}).get("style")
    if style:
        return style
    return "template" if getattr(tokenizer, "chat_template", None) else "alpaca"


def run(args: argparse.Namespace) -> int:
    try:
        from jaxllm.cli.generate import load_model

        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        params, config, tokenizer, meta = load_model(args, "chat")
        style = args.style or prompt_style(meta, tokenizer)
        if style == "template" and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"--style template: the {tokenizer.name} tokenizer has no chat "
                             f"template (a Hugging Face folder's tokenizer_config.json "
                             f"carries one)")
        if args.prompt is not None:
            answer(params, config, tokenizer, args.prompt, style, args, sys.stdout)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"{args.run_dir or args.hf} ({style} prompts). An empty line or /quit ends.",
                  file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            if not line.strip() or line.strip() == "/quit":
                break
            answer(params, config, tokenizer, line.strip(), style, args, sys.stdout)
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxllm chat: error: {err}", file=sys.stderr)
        return 2
