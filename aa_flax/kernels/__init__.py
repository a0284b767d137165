"""Attention implementations behind one signature, and the registry that picks one.

:data:`IMPLEMENTATIONS` is the single table of implementations: adding one means adding an
entry here (its function takes ``(q, k, v, rel_h, rel_w, *, relative_method)`` with the shapes
of :func:`aa_flax.attention.multihead_attention_2d` and applies
:func:`aa_flax.attention.check_inputs`). ``attention_fn(impl, remat)`` maps the
``attention_impl`` option to a function that layers call exactly as they would call the XLA
path; ``"auto"`` picks the implementation listed for the current backend in :data:`AUTO`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
from jax import lax

from aa_flax import attention
from aa_flax.kernels import augmented_attention, relative_attention, tpu_attention


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One attention implementation.

  ``fn(q, k, v, rel_h=None, rel_w=None, *, relative_method) -> out``; ``backends``: the
  ``jax.default_backend()`` names it runs on (None: every backend); ``description``: one line
  for error messages and docs.
  """
  fn: Callable
  backends: Optional[tuple[str, ...]]
  description: str


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(
        attention.multihead_attention_2d, None,
        "XLA; materialises the [B, N, HW, HW] logits"),
    "pallas": Implementation(
        relative_attention.multihead_attention_2d, relative_attention.BACKENDS,
        "fused Pallas Triton kernel (GPU; interpret mode on CPU)"),
    "cudnn": Implementation(
        augmented_attention.multihead_attention_2d, augmented_attention.BACKENDS,
        "cuDNN flash attention over the augmented depth (GPU, bf16/fp16; else the XLA path)"),
    "pallas_tpu": Implementation(
        tpu_attention.multihead_attention_2d, tpu_attention.BACKENDS,
        "Pallas TPU flash attention over the augmented depth (TPU; interpret mode on CPU)"),
}
# What "auto" runs per backend; any backend not listed runs "xla". The GPU choice is not
# backed by a GPU measurement yet: cuDNN's kernel is vendor-tuned, the fused kernel is not.
AUTO = {"tpu": "pallas_tpu", "gpu": "cudnn"}
ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)

__all__ = ["ATTENTION_IMPLS", "AUTO", "IMPLEMENTATIONS", "Implementation", "attention_fn",
           "augmented_attention", "available_impls", "check_impl", "relative_attention",
           "resolve_impl", "tpu_attention"]


def check_impl(impl: str) -> None:
  """Raises ``ValueError`` unless ``impl`` is a known ``attention_impl`` (any backend)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")


def available_impls(backend: Optional[str] = None) -> tuple[str, ...]:
  """The ``attention_impl`` values that run on ``backend`` (default: the current one)."""
  backend = backend or jax.default_backend()
  return ("auto",) + tuple(name for name, impl in IMPLEMENTATIONS.items()
                           if impl.backends is None or backend in impl.backends)


def resolve_impl(impl: str, backend: Optional[str] = None) -> str:
  """The implementation ``impl`` runs on ``backend`` ("auto" resolved), or a ``ValueError``
  naming the implementations that run there."""
  check_impl(impl)
  backend = backend or jax.default_backend()
  name = AUTO.get(backend, "xla") if impl == "auto" else impl
  if name not in available_impls(backend):
    raise ValueError(f"attention_impl {impl!r} does not run on backend {backend!r}; there "
                     f"use one of {available_impls(backend)}")
  return name


def _with_weights(fn: Callable) -> Callable:
  """Adds ``return_weights``: the weights are recomputed by the XLA path without gradient
  (XLA removes them again when the caller drops them, e.g. an unstored ``sow``)."""
  def attend(q, k, v, rel_h=None, rel_w=None, *, relative_method="gather",
             return_weights=False):
    out = fn(q, k, v, rel_h, rel_w, relative_method=relative_method)
    if not return_weights:
      return out
    stopped = [None if t is None else lax.stop_gradient(t) for t in (q, k, v, rel_h, rel_w)]
    _, weights = attention.multihead_attention_2d(*stopped, relative_method=relative_method,
                                                  return_weights=True)
    return out, weights

  return attend


def attention_fn(impl: str = "xla", remat: bool = False) -> Callable:
  """Returns the 2D multi-head attention function for ``attention_impl`` on this backend.

  Args:
    impl: a key of :data:`IMPLEMENTATIONS` or ``"auto"`` (see :data:`AUTO`). An
      implementation that does not run on the current backend raises ``ValueError`` naming
      those that do.
    remat: wrap the function in ``jax.checkpoint``, so the backward pass recomputes the
      attention instead of keeping its intermediates (for ``"xla"`` that drops the saved
      ``[B, N, HW, HW]`` logits and weights between forward and backward).

  Returns:
    ``f(q, k, v, rel_h=None, rel_w=None, *, relative_method="gather", return_weights=False)``
    with the shapes of :func:`aa_flax.attention.multihead_attention_2d`; with
    ``return_weights`` it also returns the float32 ``[B, N, HW, HW]`` weights.
  """
  name = resolve_impl(impl)
  fn = IMPLEMENTATIONS[name].fn
  if name != "xla":  # the XLA path returns its own weights
    fn = _with_weights(fn)
  if not remat:
    return fn

  def rematerialised(q, k, v, rel_h=None, rel_w=None, *, relative_method="gather",
                     return_weights=False):
    body = functools.partial(fn, relative_method=relative_method,
                             return_weights=return_weights)
    return jax.checkpoint(body)(q, k, v, rel_h, rel_w)

  return rematerialised
