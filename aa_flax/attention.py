"""Pure functions for 2D multi-head self-attention with relative position logits.

Notation: B batch, N heads (N_h), H x W spatial size, d per-head depth. Feature maps are
flattened row-major, so position (y, x) is index ``y * W + x``.

Relative logits: for query (y, x) and key (y2, x2) the logit gains
``q . r^W[x2 - x + W - 1] + q . r^H[y2 - y + H - 1]`` (key minus query). Row ``m`` of a
relative table of length ``2L - 1`` therefore holds offset ``m - (L - 1)``.

Two equivalent ways of turning "logits against every offset" into "logits against every key"
are provided, both public and tested against a brute-force loop:

* ``skew``: the paper's ``rel_to_abs`` pad/reshape trick on ``[.., L, 2L - 1]`` logits.
* ``gather``: gather the table into ``[L, L, d]`` with the index ``j - i + L - 1`` and
  contract with q directly. The gathered table is parameter-sized, so no activation-sized
  tensor is gathered; its gradient is a scatter-add into the small table.

Neither form tiles over the other spatial axis: the per-axis logits ``[B, N, H, W, H]`` and
``[B, N, H, W, W]`` are broadcast against each other, which XLA fuses into the single
``[B, N, HW, HW]`` logits tensor that attention needs anyway.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from jax import lax

RelativeMethod = Literal["gather", "skew"]
RELATIVE_METHODS = ("gather", "skew")
POSITION_ENCODINGS = ("none", "relative", "sine", "coordconv")


def _check_method(method: str) -> None:
  if method not in RELATIVE_METHODS:
    raise ValueError(f"relative method {method!r} is not one of {RELATIVE_METHODS}")


def _check_tables(q_shape, rel_h, rel_w) -> None:
  _, _, height, width, depth = q_shape
  if rel_h.shape != (2 * height - 1, depth) or rel_w.shape != (2 * width - 1, depth):
    raise ValueError(
        f"relative tables must be rel_h [2H-1, d] = {(2 * height - 1, depth)} and rel_w "
        f"[2W-1, d] = {(2 * width - 1, depth)} for q of shape {q_shape}; got rel_h "
        f"{rel_h.shape}, rel_w {rel_w.shape}")


def check_inputs(q, k, v, rel_h=None, rel_w=None, relative_method: str = "gather") -> None:
  """The input check every attention implementation applies (one-line ``ValueError``).

  q, k ``[B, N, H, W, d_k]`` (equal shapes), v ``[B, N, H, W, d_v]``; rel_h ``[2H - 1, d_k]``
  and rel_w ``[2W - 1, d_k]``, or both None; ``relative_method`` one of ``RELATIVE_METHODS``.
  """
  _check_method(relative_method)
  if (rel_h is None) != (rel_w is None):
    raise ValueError("pass both rel_h and rel_w, or neither")
  if q.ndim != 5 or k.shape != q.shape or v.ndim != 5 or v.shape[:4] != q.shape[:4]:
    raise ValueError(f"q, k, v must be [B, N, H, W, d] with matching B, N, H, W (and q, k "
                     f"equal); got q {q.shape}, k {k.shape}, v {v.shape}")
  if rel_h is not None:
    _check_tables(q.shape, rel_h, rel_w)


def rel_to_abs(x: jax.Array) -> jax.Array:
  """Converts relative-offset logits to absolute-key logits (the paper's skew trick).

  Args:
    x: ``[..., L, 2L - 1]``; ``x[..., i, m]`` is the logit of query ``i`` at offset
      ``m - (L - 1)``.

  Returns:
    ``[..., L, L]`` with ``out[..., i, j] = x[..., i, j - i + L - 1]``.
  """
  *lead, length, width = x.shape
  if width != 2 * length - 1:
    raise ValueError(f"rel_to_abs needs [..., L, 2L-1], got last dims {(length, width)}")
  pad = [(0, 0)] * len(lead)
  # [.., L, 2L-1] -> [.., L, 2L]: one zero column, so each row shifts by one more.
  x = jnp.pad(x, pad + [(0, 0), (0, 1)])
  # Flatten rows, pad L-1 zeros so the flat length is (L+1)(2L-1), and re-cut into rows of
  # 2L-1: row r then starts r positions later in its original row, which is the skew.
  flat = x.reshape(*lead, length * 2 * length)
  flat = jnp.pad(flat, pad + [(0, length - 1)])
  skewed = flat.reshape(*lead, length + 1, 2 * length - 1)
  return skewed[..., :length, length - 1:]


def relative_index(length: int) -> jax.Array:
  """``[L, L]`` int table with ``idx[i, j] = j - i + L - 1`` (row of the relative table)."""
  positions = jnp.arange(length)
  return positions[None, :] - positions[:, None] + length - 1


def _relative_logits_width(q, rel_w, method, precision_type):
  """q ``[B, N, H, W, d]``, rel_w ``[2W-1, d]`` -> ``[B, N, H, W(query x), W(key x)]``."""
  width = q.shape[3]
  if method == "skew":
    rel = jnp.einsum("bnhwd,md->bnhwm", q, rel_w, preferred_element_type=precision_type)
    return rel_to_abs(rel)
  table = rel_w[relative_index(width)]  # [W(query x), W(key x), d]
  return jnp.einsum("bnhxd,xkd->bnhxk", q, table, preferred_element_type=precision_type)


def relative_logits_2d_parts(
    q: jax.Array,
    rel_h: jax.Array,
    rel_w: jax.Array,
    method: RelativeMethod = "gather",
    precision_type=None,
) -> tuple[jax.Array, jax.Array]:
  """Per-axis relative logits, before broadcasting them to ``[B, N, HW, HW]``.

  Args:
    q: ``[B, N, H, W, d]`` queries (already scaled).
    rel_h: ``[2H - 1, d]`` height table; rel_w: ``[2W - 1, d]`` width table.
    method: ``"gather"`` or ``"skew"``.
    precision_type: dtype of the einsum results (e.g. ``jnp.float32`` for bf16 inputs).

  Returns:
    ``(logits_h, logits_w)``: ``logits_h[b, n, y, x, y2] = q[b,n,y,x] . rel_h[y2 - y + H - 1]``
    with shape ``[B, N, H, W, H]``, and ``logits_w[b, n, y, x, x2] =
    q[b,n,y,x] . rel_w[x2 - x + W - 1]`` with shape ``[B, N, H, W, W]``.
  """
  _check_method(method)
  if q.ndim != 5:
    raise ValueError(f"q must be [B, N_h, H, W, d], got shape {q.shape}")
  _check_tables(q.shape, rel_h, rel_w)
  logits_w = _relative_logits_width(q, rel_w, method, precision_type)
  # The height axis is the width computation with H and W swapped.
  q_t = jnp.swapaxes(q, 2, 3)  # [B, N, W, H, d]
  logits_h = _relative_logits_width(q_t, rel_h, method, precision_type)  # [B, N, W, H, H]
  return jnp.swapaxes(logits_h, 2, 3), logits_w


def relative_logits_2d(
    q: jax.Array,
    rel_h: jax.Array,
    rel_w: jax.Array,
    method: RelativeMethod = "gather",
) -> jax.Array:
  """2D relative logits of every query against every key.

  Args:
    q: ``[B, N_h, H, W, d]``.
    rel_h: ``[2H - 1, d]``; rel_w: ``[2W - 1, d]``.
    method: ``"gather"`` (default) or ``"skew"`` (the paper's rel_to_abs); equal results.

  Returns:
    ``[B, N_h, H*W, H*W]`` with ``out[b, n, y*W + x, y2*W + x2] =
    q[b,n,y,x] . rel_w[x2 - x + W - 1] + q[b,n,y,x] . rel_h[y2 - y + H - 1]``.
  """
  logits_h, logits_w = relative_logits_2d_parts(q, rel_h, rel_w, method)
  batch, heads, height, width, _ = q.shape
  logits = logits_h[..., :, None] + logits_w[..., None, :]  # [B, N, H, W, H, W]
  return logits.reshape(batch, heads, height * width, height * width)


def multihead_attention_2d(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: Optional[jax.Array] = None,
    rel_w: Optional[jax.Array] = None,
    *,
    relative_method: RelativeMethod = "gather",
    return_weights: bool = False,
):
  """Multi-head self-attention over 2D positions with optional relative logits.

  The softmax is computed in float32 whatever the input dtype and normalised after the
  product with v; the matmuls run in the input dtype with float32 accumulation (on CPU the
  value product runs in float32). q must already be scaled by ``d_k^h ** -0.5``.

  Args:
    q: ``[B, N, H, W, d_k]``; k: ``[B, N, H, W, d_k]``; v: ``[B, N, H, W, d_v]``.
    rel_h, rel_w: ``[2H - 1, d_k]`` and ``[2W - 1, d_k]``, or both None.
    relative_method: ``"gather"`` or ``"skew"``.
    return_weights: also return the attention weights.

  Returns:
    ``out`` of shape ``[B, N, H, W, d_v]`` in v's dtype, and with ``return_weights`` the
    float32 weights ``[B, N, H*W, H*W]`` (rows: queries, columns: keys, row-major).
  """
  check_inputs(q, k, v, rel_h, rel_w, relative_method)
  batch, heads, height, width, key_depth = q.shape
  length = height * width
  logits = jnp.einsum(
      "bnqd,bnkd->bnqk",
      q.reshape(batch, heads, length, key_depth),
      k.reshape(batch, heads, length, key_depth),
      preferred_element_type=jnp.float32)
  if rel_h is not None:
    logits_h, logits_w = relative_logits_2d_parts(
        q, rel_h, rel_w, relative_method, precision_type=jnp.float32)
    logits = (logits.reshape(batch, heads, height, width, height, width)
              + logits_h[..., :, None] + logits_w[..., None, :])
    logits = logits.reshape(batch, heads, length, length)
  # Softmax normalised after the value product: out = (exp(l - max) V) / sum exp(l - max).
  # Dividing the [B, N, HW, d_v] product instead of the [B, N, HW, HW] weights saves a pass
  # (forward and backward) over the largest tensor; the shift by the row max (a constant of
  # the softmax) keeps exp <= 1 and the sum >= 1.
  row_max = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits - row_max)
  denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)  # [B, N, HW, 1]
  # XLA:CPU has no bf16 matmul and would convert bf16 weights back to float32: two more
  # passes over [B, N, HW, HW]. Elsewhere the product runs in v's dtype (e.g. bf16 units).
  product_dtype = jnp.float32 if jax.default_backend() == "cpu" else v.dtype
  out = jnp.einsum(
      "bnqk,bnkd->bnqd", unnormalised.astype(product_dtype),
      v.reshape(batch, heads, length, -1).astype(product_dtype),
      preferred_element_type=jnp.float32)
  out = (out / denominator).astype(v.dtype).reshape(batch, heads, height, width, v.shape[-1])
  if return_weights:
    return out, unnormalised / denominator
  return out


def sine_position_encoding_2d(height: int, width: int, channels: int,
                              dtype=jnp.float32) -> jax.Array:
  """2D sinusoidal position encoding (Image Transformer style), ``[H, W, channels]``.

  The first half of the channels encodes the row y, the second half the column x; each half
  is ``[sin(p * f_0), ..., sin(p * f_{m-1}), cos(p * f_0), ...]`` with geometric frequencies
  ``f_i = 10000 ** (-i / m)``. Channels left over when ``channels`` is not a multiple of 4
  are zero.
  """
  if channels < 1 or height < 1 or width < 1:
    raise ValueError(f"sine encoding needs positive sizes, got H={height}, W={width}, "
                     f"channels={channels}")
  num_freq = channels // 4
  if num_freq == 0:
    return jnp.zeros((height, width, channels), dtype)
  freqs = 10000.0 ** (-jnp.arange(num_freq) / num_freq)

  def encode(positions):  # [L] -> [L, 2 * num_freq]
    angles = positions[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  enc_y = jnp.broadcast_to(encode(jnp.arange(height, dtype=jnp.float32))[:, None, :],
                           (height, width, 2 * num_freq))
  enc_x = jnp.broadcast_to(encode(jnp.arange(width, dtype=jnp.float32))[None, :, :],
                           (height, width, 2 * num_freq))
  enc = jnp.concatenate([enc_y, enc_x], axis=-1)
  enc = jnp.pad(enc, [(0, 0), (0, 0), (0, channels - 4 * num_freq)])
  return enc.astype(dtype)


def coord_channels(batch: int, height: int, width: int, dtype=jnp.float32) -> jax.Array:
  """CoordConv channels ``[B, H, W, 3]``: x and y scaled to [-1, 1], and r = sqrt(x² + y²)."""
  ys = jnp.linspace(-1.0, 1.0, height) if height > 1 else jnp.zeros((1,))
  xs = jnp.linspace(-1.0, 1.0, width) if width > 1 else jnp.zeros((1,))
  yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
  rr = jnp.sqrt(xx ** 2 + yy ** 2)
  coords = jnp.stack([xx, yy, rr], axis=-1).astype(dtype)
  return jnp.broadcast_to(coords[None], (batch, height, width, 3))


def relative_table_stddev(key_depth_per_head: int) -> float:
  """Init stddev of the relative tables, ``d_k^h ** -0.5``.

  The reference implementation passes ``d_k^h ** -0.5`` as the first positional argument of
  TensorFlow's ``random_normal_initializer``, which is the *mean*; the intended reading
  (and ours) is mean 0, stddev ``d_k^h ** -0.5``.
  """
  return 1.0 / math.sqrt(key_depth_per_head)
