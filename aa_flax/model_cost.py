"""Parameter and FLOP counts of a model, without running it.

* ``count_params``: shapes from ``jax.eval_shape`` of ``model.init`` (nothing is compiled).
* ``count_flops``: FLOPs of the inference forward pass for one image, multiply and add
  counted as 2, in one of two conventions:

  - ``"xla"``: XLA's cost analysis of the lowered forward pass. XLA counts a convolution's
    true multiply-adds, skipping taps that fall on SAME padding, so it is ~3% below the usual
    convention for ResNets at 224 px.
  - ``"dense"``: the usual convention of papers (and of this paper's GFlops): every conv
    output costs ``k_h k_w C_in / groups`` multiply-adds, padding included; every matmul
    (dense layers, attention's QKᵀ and AV, relative logits) ``M N K``. Counted from the jaxpr,
    so attention is included exactly; element-wise ops, pooling and normalisation are not.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

FLOP_CONVENTIONS = ("dense", "xla")


def _abstract_variables(model: nn.Module, image_shape: Sequence[int]):
  images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images)
  return variables, images


def num_elements(tree) -> int:
  """Total number of elements of the arrays (or shape structs) in ``tree``."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def count_params(model: nn.Module, image_shape: Sequence[int]) -> int:
  """Number of trainable parameters. ``image_shape`` is ``[B, H, W, C]`` (sizes the tables)."""
  variables, _ = _abstract_variables(model, image_shape)
  return num_elements(variables["params"])


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def _dense_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      macs_per_output = math.prod(rhs) // rhs[out_dim]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * macs_per_output
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contracted = math.prod(lhs[d] for d in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
    for sub in _sub_jaxprs(eqn):
      total += _dense_flops(sub)
  return total


def count_flops(model: nn.Module, image_shape: Sequence[int], convention: str = "dense") -> float:
  """FLOPs of ``model.apply(variables, images, train=False)`` for images of ``image_shape``.

  Divide by the batch size in ``image_shape`` for per-image FLOPs.
  """
  if convention not in FLOP_CONVENTIONS:
    raise ValueError(f"convention {convention!r} is not one of {FLOP_CONVENTIONS}")
  variables, images = _abstract_variables(model, image_shape)
  forward = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  if convention == "dense":
    return float(_dense_flops(jax.make_jaxpr(forward)(variables, images).jaxpr))
  return float(jax.jit(forward).lower(variables, images).cost_analysis()["flops"])
