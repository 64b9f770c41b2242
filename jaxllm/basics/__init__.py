"""The basics, each next to its PyTorch twin: tensors, automatic differentiation, backpropagation.

* `jaxllm.basics.tensors`: creating and reshaping arrays; where JAX differs from torch.
* `jaxllm.basics.autodiff`: one neuron's gradients four ways (jax.grad, by hand,
  finite differences, torch autograd).
* `jaxllm.basics.backprop`: a two-layer network trained with SGD, as pure functions,
  as a Flax NNX module, and in torch.

PyTorch is imported only inside the functions that build the torch twins.
"""

from jaxllm.basics import autodiff, backprop, tensors

__all__ = ["autodiff", "backprop", "tensors"]
