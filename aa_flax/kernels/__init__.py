"""Optional fused kernels behind the signature of :func:`aa_flax.attention.multihead_attention_2d`.

``attention_fn(impl, remat)`` is the single place that maps the ``attention_impl`` option to a
function; layers call the function it returns exactly as they would call the XLA path.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from aa_flax import attention
from aa_flax.kernels import augmented_attention, relative_attention

ATTENTION_IMPLS = attention.ATTENTION_IMPLS

__all__ = ["ATTENTION_IMPLS", "attention_fn", "augmented_attention", "relative_attention"]


def attention_fn(impl: str = "xla", remat: bool = False) -> Callable:
  """Returns the 2D multi-head attention function for ``attention_impl``.

  Args:
    impl: ``"xla"`` (:func:`aa_flax.attention.multihead_attention_2d`, materialises the
      ``[B, N, HW, HW]`` logits) or ``"pallas"`` (the fused kernel of
      :mod:`aa_flax.kernels.relative_attention`: compiled on GPU, Pallas interpret mode on CPU,
      an error on other backends) or ``"cudnn"`` (relative attention rewritten as plain
      attention over an augmented depth and run by cuDNN flash attention, see
      :mod:`aa_flax.kernels.augmented_attention`; where cuDNN cannot run it — CPU, float32,
      too deep — it falls back to ``"xla"``).
    remat: wrap the function in ``jax.checkpoint``, so the backward pass recomputes the
      attention instead of keeping its intermediates (for ``"xla"`` that drops the saved
      ``[B, N, HW, HW]`` logits and weights between forward and backward).

  Returns:
    ``f(q, k, v, rel_h=None, rel_w=None, *, relative_method="gather", return_weights=False)``
    with the shapes of :func:`aa_flax.attention.multihead_attention_2d`.
  """
  if impl == "xla":
    fn = attention.multihead_attention_2d
  elif impl == "pallas":
    fn = relative_attention.multihead_attention_2d
  elif impl == "cudnn":
    fn = augmented_attention.multihead_attention_2d
  else:
    raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
  if not remat:
    return fn

  def rematerialised(q, k, v, rel_h=None, rel_w=None, *, relative_method="gather",
                     return_weights=False):
    body = functools.partial(fn, relative_method=relative_method,
                             return_weights=return_weights)
    return jax.checkpoint(body)(q, k, v, rel_h, rel_w)

  return rematerialised
