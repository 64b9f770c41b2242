"""The README's code examples run as written."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from jaxllm import init_params

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python block after the heading `section`."""
    text = README.read_text().split(section, 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_functional_api_example_runs():
    namespace: dict = {}
    exec(compile(python_block("## The functional API"), "README.md", "exec"), namespace)
    config, loss = namespace["config"], float(namespace["loss"])
    assert abs(loss - math.log(config.vocab_size)) < 0.1  # near uniform at initialisation
    assert namespace["logits"].shape == (4, 32, config.vocab_size)
    before = init_params(config, jax.random.key(0))
    after = namespace["params"]
    assert not np.allclose(before["blocks"][0]["ffn"]["fc"]["kernel"],
                           after["blocks"][0]["ffn"]["fc"]["kernel"])
