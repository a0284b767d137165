"""Attention implementations behind one signature, and the registry that picks one.

:data:`IMPLEMENTATIONS` is the single table of implementations: adding one means adding an
entry here (its function takes ``(q, k, v, rel_h, rel_w, *, relative_method)`` with the shapes
of :func:`aa_flax.attention.multihead_attention_2d` and applies
:func:`aa_flax.attention.check_inputs`). ``attention_fn(impl, remat)`` maps the
``attention_impl`` option to a function that layers call exactly as they would call the XLA
path; ``"auto"`` picks per layer with :func:`auto_impl` (backend, attention length, depth,
dtype): the XLA path below :data:`CROSSOVER_LENGTH`, the backend's fused path from it on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
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
ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)

__all__ = ["ATTENTION_IMPLS", "CROSSOVER_LENGTH", "IMPLEMENTATIONS", "Implementation",
           "attention_fn", "augmented_attention", "auto_impl", "available_impls", "check_impl",
           "crossover_length", "fused_bytes", "relative_attention", "resolve_impl",
           "tpu_attention", "xla_bytes"]

# ---------------------------------------------------------------- what "auto" picks per layer
# A byte model per (example, head), forward + backward, derived in docs/PERFORMANCE.md. It is
# arithmetic, not a measurement: re-measure the crossover on the first accelerator
# (benchmarks.bench_attention --suite sizes) and correct these constants.
XLA_LOGIT_PASSES = 12  # reads + writes of float32 [L, L] tensors (logits, weights, gradients)
FUSED_OPERAND_PASSES = 6  # operands re-read per query block: fwd k, v; dq k, v; dk/dv q, dO
LAYOUT_PASSES = 12  # writes + reads of the padded [L_p, D_p] operands and gradients around
#                     the kernels (augmenting, padding, transposing)
REFERENCE_DEPTH = 128  # the crossover is taken at this per-head depth (one TPU lane tile, the
#                        largest depth cuDNN runs on every GPU): the worst case for the fused path


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a backend's fused path pads: query rows per kernel block, the multiple the sequence
  is padded to, the multiple the head depth is padded to."""
  query_block: int
  length_multiple: int
  depth_multiple: int


FUSED_PATHS = {"tpu": "pallas_tpu", "gpu": "cudnn"}  # "auto" above the crossover
# TPU: tpu_attention pads the sequence and the depth to 128 (blocks of 128). GPU: cuDNN pads the
# depth to 8 and needs no sequence padding; its kernels take queries in blocks of 64 or more.
FUSED_TILING = {"tpu": Tiling(tpu_attention.BLOCK, tpu_attention.BLOCK, tpu_attention.LANES),
                "gpu": Tiling(64, 1, 8)}


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def xla_bytes(length: int) -> int:
  """Estimated HBM bytes of the XLA path per (example, head), forward + backward: the float32
  ``[L, L]`` logits and what is derived from them, :data:`XLA_LOGIT_PASSES` times."""
  return XLA_LOGIT_PASSES * 4 * length * length


def fused_bytes(backend: str, length: int, depth: int, itemsize: int = 2) -> int:
  """Estimated HBM bytes of ``backend``'s fused path per (example, head), forward + backward.

  ``depth``: the per-head depth the kernel sees (``max(d_k + H + W, d_v)`` with relative
  logits). Operands are ``[L_p, D_p]`` (padded per :data:`FUSED_TILING`) of ``itemsize``
  bytes, re-read once per query block (:data:`FUSED_OPERAND_PASSES`) plus
  :data:`LAYOUT_PASSES` passes outside the kernels.
  """
  tiling = FUSED_TILING[backend]
  padded_length = _round_up(length, tiling.length_multiple)
  padded_depth = _round_up(depth, tiling.depth_multiple)
  passes = FUSED_OPERAND_PASSES * math.ceil(length / tiling.query_block) + LAYOUT_PASSES
  return passes * padded_length * padded_depth * itemsize


@functools.lru_cache(maxsize=None)
def crossover_length(backend: str, depth: int = REFERENCE_DEPTH, itemsize: int = 2,
                     longest: int = 128 * 128) -> int:
  """The shortest attention length ``L`` from which the fused path's estimated bytes are at
  most the XLA path's for every length up to ``longest`` (the model above)."""
  crossover = longest + 1
  for length in range(longest, 0, -1):
    if fused_bytes(backend, length, depth, itemsize) > xla_bytes(length):
      break
    crossover = length
  return crossover


# "auto" runs the fused path from this attention length L = H*W on (bfloat16 at
# REFERENCE_DEPTH); below it, the XLA path. Derived, not measured: see above.
CROSSOVER_LENGTH = {backend: crossover_length(backend) for backend in FUSED_TILING}
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def auto_impl(backend: str, length: int, depth: int, dtype) -> str:
  """What ``attention_impl="auto"`` runs for one layer (a pure function; no device needed).

  Args:
    backend: ``jax.default_backend()`` name ("tpu", "gpu", "cpu", ...).
    length: the layer's attention length ``L = H * W``.
    depth: the per-head depth the fused kernels see, ``max(d_k^h + H + W, d_v^h)`` with
      relative logits, ``max(d_k^h, d_v^h)`` without.
    dtype: the attention inputs' dtype.

  Returns:
    ``"xla"`` below the backend's :data:`CROSSOVER_LENGTH` (and on backends without a fused
    path); from it on ``"pallas_tpu"`` on TPU, and on GPU ``"cudnn"`` where cuDNN runs the
    dtype and depth on every GPU (bfloat16/float16, depth padded to 8 at most 128), else the
    fused Triton kernel ``"pallas"``.
  """
  if backend not in CROSSOVER_LENGTH or length < CROSSOVER_LENGTH[backend]:
    return "xla"
  if backend == "gpu" and (jnp.dtype(dtype) not in _HALF_DTYPES
                           or _round_up(depth, 8) > REFERENCE_DEPTH):
    return "pallas"
  return FUSED_PATHS[backend]


def check_impl(impl: str) -> None:
  """Raises ``ValueError`` unless ``impl`` is a known ``attention_impl`` (any backend)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")


def available_impls(backend: Optional[str] = None) -> tuple[str, ...]:
  """The ``attention_impl`` values that run on ``backend`` (default: the current one)."""
  backend = backend or jax.default_backend()
  return ("auto",) + tuple(name for name, impl in IMPLEMENTATIONS.items()
                           if impl.backends is None or backend in impl.backends)


def resolve_impl(impl: str, backend: Optional[str] = None, *, length: Optional[int] = None,
                 depth: int = REFERENCE_DEPTH, dtype=jnp.bfloat16) -> str:
  """The implementation ``impl`` runs on ``backend``, or a ``ValueError`` naming the
  implementations that run there. ``"auto"`` is resolved by :func:`auto_impl` for a layer of
  attention ``length``, ``depth`` and ``dtype`` (``length=None``: a layer long enough for the
  fused path)."""
  check_impl(impl)
  backend = backend or jax.default_backend()
  if impl == "auto":
    length = max(CROSSOVER_LENGTH.values()) if length is None else length
    name = auto_impl(backend, length, depth, dtype)
  else:
    name = impl
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


def attention_fn(impl: str = "xla", remat: bool = False, **layer) -> Callable:
  """Returns the 2D multi-head attention function for ``attention_impl`` on this backend.

  Args:
    impl: a key of :data:`IMPLEMENTATIONS` or ``"auto"`` (see :func:`auto_impl`). An
      implementation that does not run on the current backend raises ``ValueError`` naming
      those that do.
    remat: wrap the function in ``jax.checkpoint``, so the backward pass recomputes the
      attention instead of keeping its intermediates (for ``"xla"`` that drops the saved
      ``[B, N, HW, HW]`` logits and weights between forward and backward).
    **layer: ``length``, ``depth``, ``dtype`` of the layer, for ``"auto"`` (see
      :func:`resolve_impl`).

  Returns:
    ``f(q, k, v, rel_h=None, rel_w=None, *, relative_method="gather", return_weights=False)``
    with the shapes of :func:`aa_flax.attention.multihead_attention_2d`; with
    ``return_weights`` it also returns the float32 ``[B, N, HW, HW]`` weights.
  """
  name = resolve_impl(impl, **layer)
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
