"""2D relative attention as plain attention over an augmented depth, run by cuDNN on GPU.

The relative logits of a query i = (y, x) against a key j = (y2, x2) depend on the key only
through its column x2 and its row y2:

    S_W[i, j] = A_w[i, x2],  A_w[i, x2] = q_i · r^W[x2 - x + W - 1]   ([B, N, HW, W])
    S_H[i, j] = A_h[i, y2],  A_h[i, y2] = q_i · r^H[y2 - y + H - 1]   ([B, N, HW, H])

(``A_h``, ``A_w`` are exactly ``attention.relative_logits_2d_parts``). With one-hot key
codes ``e_x2`` (length W) and ``e_y2`` (length H),

    q'_i = [q_i, A_w[i, :], A_h[i, :]],   k'_j = [k_j, e_x2, e_y2]
    =>  q'_i · k'_j = q_i · k_j + S_W[i, j] + S_H[i, j],

so relative attention is plain (unscaled) attention with depth ``d + W + H``, which any
flash-attention kernel can run without materialising ``[B, N, HW, HW]`` (this module:
cuDNN; :mod:`aa_flax.kernels.tpu_attention`: the Pallas TPU kernel). Extra memory is
``A_h``, ``A_w`` and the codes: ``O(B·N·HW·(H + W))``, against ``O(B·N·(HW)²)`` for the logits.
Gradients flow through ``A_h``/``A_w`` to q and the tables by ordinary autodiff.

Backends: ``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` (GPU; bf16/fp16;
head dim a multiple of 8 up to 128, or 256 on Hopper and later) or ``"xla"`` (any backend,
materialises the logits; used to test the construction on CPU). ``implementation=None``
picks cuDNN where it applies and otherwise falls back to
:func:`aa_flax.attention.multihead_attention_2d`.
Precision note: ``A_h``/``A_w`` are computed in float32 and then rounded to the input dtype
to enter the fused matmul (the XLA path adds them in float32).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from aa_flax import attention
from aa_flax.kernels.notices import say_once

BACKENDS = ("gpu", "cpu")  # cuDNN on GPU where it applies, else (and on CPU) the XLA path
IMPLEMENTATIONS = (None, "cudnn", "xla")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def augment(q: jax.Array, k: jax.Array, rel_h: jax.Array, rel_w: jax.Array,
            relative_method: attention.RelativeMethod = "gather"):
  """Augmented queries and keys, ``[B, N, H, W, d + W + H]`` each, in q's dtype.

  ``q'·k'`` equals the content logit plus both relative logits for every (query, key).
  """
  batch, heads, height, width, _ = q.shape
  logits_h, logits_w = attention.relative_logits_2d_parts(
      q, rel_h, rel_w, relative_method, precision_type=jnp.float32)
  q_aug = jnp.concatenate([q, logits_w.astype(q.dtype), logits_h.astype(q.dtype)], axis=-1)
  codes_x = jnp.broadcast_to(jnp.eye(width, dtype=k.dtype)[None, :, :], (height, width, width))
  codes_y = jnp.broadcast_to(jnp.eye(height, dtype=k.dtype)[:, None, :],
                             (height, width, height))
  codes = jnp.concatenate([codes_x, codes_y], axis=-1)  # [H, W, W + H]: key (y2, x2)
  k_aug = jnp.concatenate(
      [k, jnp.broadcast_to(codes, (batch, heads) + codes.shape)], axis=-1)
  return q_aug, k_aug


def cudnn_unsupported(dtype, depth: int) -> Optional[str]:
  """Why cuDNN flash attention cannot run ``dtype`` inputs of per-head ``depth`` here, or
  ``None`` when it can."""
  backend = jax.default_backend()
  if backend != "gpu":
    return f"backend {backend!r} has no cuDNN"
  if jnp.dtype(dtype) not in map(jnp.dtype, _CUDNN_DTYPES):
    return f"cuDNN runs bfloat16/float16, not {jnp.dtype(dtype).name}"
  device = jax.local_devices()[0]
  capability = tuple(int(c) for c in getattr(device, "compute_capability", "0.0").split("."))
  limit = 256 if capability >= (9, 0) else 128
  if _round_up(depth, 8) > limit:
    return f"head depth {_round_up(depth, 8)} is over cuDNN's {limit} on this GPU"
  return None


def cudnn_applies(dtype, depth: int) -> bool:
  """Whether cuDNN flash attention can run ``dtype`` inputs of per-head ``depth`` here."""
  return cudnn_unsupported(dtype, depth) is None


def multihead_attention_2d(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: Optional[jax.Array] = None,
    rel_w: Optional[jax.Array] = None,
    *,
    relative_method: attention.RelativeMethod = "gather",
    implementation: Optional[str] = None,
) -> jax.Array:
  """Drop-in for :func:`aa_flax.attention.multihead_attention_2d` via fused attention.

  Args:
    q: ``[B, N, H, W, d_k]`` (already scaled); k: ``[B, N, H, W, d_k]``;
      v: ``[B, N, H, W, d_v]``.
    rel_h, rel_w: ``[2H - 1, d_k]`` and ``[2W - 1, d_k]``, or both None.
    relative_method: how ``A_h``/``A_w`` are formed (``"gather"`` or ``"skew"``).
    implementation: ``None`` (cuDNN where :func:`cudnn_applies`, else the XLA path of
      :mod:`aa_flax.attention`), ``"cudnn"`` (error where cuDNN cannot run it) or ``"xla"``.

  Returns:
    ``out`` ``[B, N, H, W, d_v]`` in v's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  attention.check_inputs(q, k, v, rel_h, rel_w, relative_method)
  batch, heads, height, width, key_depth = q.shape
  value_depth = v.shape[-1]
  relative = rel_h is not None
  depth = key_depth + (height + width if relative else 0)
  if implementation is None:
    reason = cudnn_unsupported(q.dtype, max(depth, value_depth))
    if reason is not None:
      say_once(f"attention_impl='cudnn' runs the XLA path (float32 logits and softmax, "
               f"[B, N, HW, HW] in memory) instead of cuDNN: {reason}.")
      return attention.multihead_attention_2d(q, k, v, rel_h, rel_w,
                                              relative_method=relative_method)
    implementation = "cudnn"

  q_aug, k_aug = augment(q, k, rel_h, rel_w, relative_method) if relative else (q, k)
  # One head dim for q, k and v, padded to a multiple of 8 (cuDNN); zeros change nothing.
  padded = _round_up(max(depth, value_depth), 8)
  length = height * width

  def to_btnd(t):  # [B, N, H, W, d] -> [B, HW, N, padded]
    t = jnp.pad(t, [(0, 0)] * 4 + [(0, padded - t.shape[-1])])
    return jnp.transpose(t.reshape(batch, heads, length, padded), (0, 2, 1, 3))

  out = jax.nn.dot_product_attention(to_btnd(q_aug), to_btnd(k_aug), to_btnd(v), scale=1.0,
                                     implementation=implementation)
  out = jnp.transpose(out[..., :value_depth], (0, 2, 1, 3))
  return out.reshape(batch, heads, height, width, value_depth).astype(v.dtype)
