"""lm_eval's own command line with jaxllm registered as its model "jaxllm".

    python -m jaxllm.eval.lm_eval_cli --model jaxllm --model_args hf=path/to/gpt2 \
        --tasks hellaswag --batch_size 16 --output_path results/

lm_eval 0.4 fills its model registry only from its own modules: it reads no
entry points and has no option to import a plugin, so `lm_eval --model jaxllm`
cannot find jaxllm without patching lm_eval. This module imports
`jaxllm.eval.harness` (which registers the model) and hands every argument to
lm_eval's `cli_evaluate` unchanged, so each lm_eval option works as it does
for `lm_eval` itself (`run`, `ls` and `validate` too).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm_eval's command line on `argv` (default: this process's
    arguments) with the "jaxllm" model registered."""
    import jaxllm.eval.harness  # noqa: F401 - registers lm_eval's "jaxllm" model
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
