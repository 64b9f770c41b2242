"""Tensors in JAX and torch: same values and shapes; int32 vs int64; immutability; no view."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm.basics.tensors import (
    DIFFERENCES,
    EXAMPLES,
    compare,
    default_int_dtypes,
    item_assignment,
    run_examples,
    view_vs_reshape,
)
from jaxllm.parity import assert_passed, basics as parity_basics


@pytest.fixture(scope="module")
def rows():
    return {row["name"]: row for row in compare()}


def test_every_example_gives_the_same_values_and_shape(rows):
    assert list(rows) == [e.name for e in EXAMPLES]
    for name, row in rows.items():
        assert row["same_values"], name
        assert row["same_shape"], name
    (values,) = assert_passed(parity_basics.tensors())  # what `jaxllm parity` reports
    assert values.tolerance == 0 and values.quantity == f"values of all {len(EXAMPLES)} examples"


def test_ranks_and_shapes(rows):
    assert rows["0-D from a Python int"]["jax"]["shape"] == []
    assert rows["1-D from a list"]["jax"]["shape"] == [3]
    assert rows["2-D from nested lists"]["jax"]["shape"] == [2, 2]
    assert rows["3-D from nested lists"]["jax"]["shape"] == [2, 2, 2]
    assert rows["shape"]["jax"]["values"] == rows["shape"]["torch"]["values"] == [2, 3]
    assert rows["reshape to 3 x 2"]["jax"]["shape"] == [3, 2]
    assert rows["transpose"]["jax"]["values"] == [[1, 4], [2, 5], [3, 6]]
    assert rows["matrix product m @ m.T"]["jax"]["values"] == [[14, 32], [32, 77]]


def test_python_ints_are_int32_in_jax_and_int64_in_torch(rows):
    int_rows = [n for n in rows if rows[n]["torch"]["dtype"] == "int64"]
    assert "1-D from a list" in int_rows and "matrix product m @ m.T" in int_rows
    for name in int_rows:
        assert rows[name]["jax"]["dtype"] == "int32", name
        assert not rows[name]["same_dtype"]
    assert "int32" in DIFFERENCES["int dtype"] and "int64" in DIFFERENCES["int dtype"]


def test_floats_are_float32_in_both(rows):
    for name in ("0-D from a Python float", "1-D floats", "cast to float32"):
        assert rows[name]["jax"]["dtype"] == rows[name]["torch"]["dtype"] == "float32"
        assert rows[name]["same_dtype"]


def test_the_int32_default_comes_from_64_bit_mode_being_off():
    assert default_int_dtypes() == {"jax": "int32", "jax (x64 enabled)": "int64", "torch": "int64"}
    assert not jax.config.jax_enable_x64  # the context manager restored the flag


def test_jax_arrays_are_immutable_torch_tensors_are_not():
    x = jnp.array([5, 6, 7])
    with pytest.raises(TypeError, match="immutable"):
        x[0] = 1
    result = item_assignment()
    assert result["jax_error"].startswith("TypeError") and "at[idx].set" in result["jax_error"]
    assert result["jax_at_set"] == result["torch_after_assignment"] == [1, 6, 7]
    assert result["jax_original"] == [5, 6, 7]


def test_jax_has_no_view_and_no_to():
    m = jnp.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(NotImplementedError):
        m.view(3, 2)
    assert not hasattr(m, "to")
    result = view_vs_reshape()
    assert result["torch_base_after_view_write"][0][0] == 100  # the view shares memory
    assert result["jax_base_after"][0][0] == 1  # nothing can write into the base
    assert result["jax_reshaped_updated"][0][0] == 100
    assert result["jax_view_error"].startswith("NotImplementedError")


def test_results_are_the_libraries_own_types():
    results = run_examples()
    jax_value, torch_value = results["matrix product m @ m.T"]
    assert isinstance(jax_value, jax.Array) and isinstance(torch_value, torch.Tensor)
    np.testing.assert_array_equal(np.asarray(jax_value), torch_value.numpy())
