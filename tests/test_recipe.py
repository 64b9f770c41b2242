"""jaxllm.kernels.recipe: the CPU recipe chosen per machine, and `pretrain --cpu-recipe`."""

import argparse
import platform

import pytest

from jaxllm.cli import pretrain
from jaxllm.config import GPTConfig
from jaxllm.kernels.recipe import cpu_recipe, cpu_vendor
from jaxllm.train import TrainConfig

KERNELS = {"attn_impl": "mkl", "norm_impl": "rowwise", "loss_impl": "rowwise"}


def test_intel_gets_mkl_products_and_micro_batches():
    assert cpu_recipe("GenuineIntel", "x86_64", native_kernels=True) == {
        "grad_accum": 2, "matmul_impl": "mkl", **KERNELS}


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "HygonGenuine", ""])
def test_other_x86_vendors_get_xla_products_on_whole_batches(vendor):
    # MKL takes a generic path off Intel CPUs; XLA's dots run there at about twice its rate.
    assert cpu_recipe(vendor, "x86_64", native_kernels=True) == {
        "grad_accum": 1, "matmul_impl": "xla", **KERNELS}


@pytest.mark.parametrize("machine, native", [("aarch64", False), ("x86_64", False)])
def test_without_native_kernels_the_recipe_is_the_defaults(machine, native):
    assert cpu_recipe("GenuineIntel", machine, native_kernels=native) == {"grad_accum": 1}


def test_recipe_for_this_machine_is_valid_settings():
    recipe = cpu_recipe()
    model = {k: v for k, v in recipe.items() if k != "grad_accum"}
    GPTConfig(**model)  # validates every field
    TrainConfig(batch_size=8, grad_accum=recipe["grad_accum"])
    if platform.machine() == "x86_64":  # `make install` brings MKL, so the kernels are used
        assert model["attn_impl"] == "mkl"
        assert model["matmul_impl"] == ("mkl" if cpu_vendor() == "GenuineIntel" else "xla")


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64"),
                    reason="/proc/cpuinfo names an x86 vendor on Linux x86-64 only")
def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = cpu_vendor()
    assert len(vendor) == 12, vendor  # x86's CPUID vendor strings are 12 characters


def _parse(*argv):
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_pretrain_cpu_recipe_flag_applies_the_recipe_and_set_wins():
    recipe = cpu_recipe()
    model, tc, _, _ = pretrain.build_configs(_parse("--cpu-recipe"))
    assert tc.grad_accum == recipe["grad_accum"]
    for key, value in recipe.items():
        if key != "grad_accum":
            assert getattr(model, key) == value
    model, tc, _, _ = pretrain.build_configs(_parse("--cpu-recipe", "--set", "grad_accum=1",
                                                    "--set", "attn_impl=reference"))
    assert tc.grad_accum == 1 and model.attn_impl == "reference"
    plain, _, _, _ = pretrain.build_configs(_parse())
    assert plain.attn_impl == GPTConfig().attn_impl


@pytest.mark.skipif(platform.machine() != "x86_64", reason="Intel MKL is x86-64 only")
def test_native_kernels_are_unavailable_without_mkl_or_a_compiler(monkeypatch, tmp_path):
    from jaxllm.kernels import mkl

    assert mkl.available()  # `make install` brings MKL, and the machine has g++
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not mkl.available()
    assert cpu_recipe("AuthenticAMD") == {"grad_accum": 1}
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("JAXLLM_MKL_LIB_DIR", str(tmp_path))  # holds no MKL libraries
    assert not mkl.available()
