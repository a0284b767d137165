"""2D relative attention on TPU: jax's Pallas TPU flash attention over the augmented depth.

Relative attention is plain attention over queries ``[q, A_w, A_h]`` and keys
``[k, e_x2, e_y2]`` (see :mod:`aa_flax.kernels.augmented_attention`), so the stock Pallas TPU
flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``: online softmax,
custom VJP with its own dq and dk/dv kernels) runs it without materialising the
``[B, N, HW, HW]`` logits. This module only lays the problem out for that kernel:

* the sequence ``HW`` is padded to a multiple of :data:`BLOCK` (the kernel's key blocks must be
  multiples of 128 on TPU); padded positions get segment id 0 and real ones 1, so real queries
  never attend to padding (padded queries attend to padded keys only and are sliced off);
* q', k' and v are zero-padded to one head depth, a multiple of 128 (the kernel needs equal
  q/k/v depths; 128 is the TPU lane width, which TPU memory layouts pad to anyway);
* ``sm_scale=1``: q is already scaled and the relative logits must not be.

Memory that grows with the map: ``O(B·N·HW_p·D_p)`` with ``HW_p`` the padded length and
``D_p = round_up(max(d_k + H + W, d_v), 128)``.

On a mesh of several devices the kernel call runs per device on its batch shard
(:mod:`aa_flax.kernels.per_device`).

Backends: compiled on TPU. On CPU the kernels run in Pallas TPU interpret mode (which
simulates TPU memory on the host): exact and slow, meant for tests. Other backends raise.
Precision: as on the cuDNN path, ``A_h``/``A_w`` are computed in float32 and rounded to the
input dtype to enter the kernel's matmul; the kernel's softmax runs in float32.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

from aa_flax import attention
from aa_flax.kernels import augmented_attention
from aa_flax.kernels.notices import say_once
from aa_flax.kernels.per_device import per_batch_shard

BACKENDS = ("tpu", "cpu")  # compiled on TPU; TPU interpret mode on CPU
BLOCK = 128  # sequence block of every forward and backward kernel
LANES = 128  # head depths are padded to a multiple of this

_BLOCK_SIZES = tpu_flash.BlockSizes(
    block_q=BLOCK, block_k_major=BLOCK, block_k=BLOCK, block_b=1,
    block_q_major_dkv=BLOCK, block_k_major_dkv=BLOCK, block_k_dkv=BLOCK, block_q_dkv=BLOCK,
    block_k_major_dq=BLOCK, block_k_dq=BLOCK, block_q_dq=BLOCK)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """``None``: compiled on TPU, TPU interpret mode on CPU; other backends raise."""
  if interpret is not None:
    return bool(interpret)
  backend = jax.default_backend()
  if backend not in BACKENDS:
    raise NotImplementedError(
        f"the Pallas TPU flash-attention path runs on {BACKENDS} (CPU: interpret mode), not "
        f"on backend {backend!r}")
  if backend != "tpu":
    say_once(f"attention_impl='pallas_tpu' on backend {backend!r} runs the Pallas TPU kernels "
             "in TPU interpret mode (TPU memory simulated on the host, many times slower than "
             "the XLA path; for tests): the compiled kernels need a TPU. Use 'xla' or 'auto' "
             "here.")
  return backend != "tpu"


def _interpreted(fn):
  """``fn`` with every Pallas call it traces, forward and backward, in TPU interpret mode.

  The backward of the stock kernel is traced when JAX transposes, which happens outside any
  ``with`` block around the forward; a custom VJP re-enters interpret mode there.
  """
  @jax.custom_vjp
  def call(*args):
    with pltpu.force_tpu_interpret_mode():
      return fn(*args)

  def forward(*args):
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(fn, *args)

  def backward(vjp_fn, cotangent):
    with pltpu.force_tpu_interpret_mode():
      return vjp_fn(cotangent)

  call.defvjp(forward, backward)
  return call


def _flash(q, k, v, length: int):
  """Flash attention of ``[B, N, L_p, D_p]`` operands; positions >= ``length`` are padding."""
  batch, _, padded_length, _ = q.shape
  segments = jnp.broadcast_to((jnp.arange(padded_length) < length).astype(jnp.int32),
                              (batch, padded_length))
  return tpu_flash.flash_attention(q, k, v, segment_ids=tpu_flash.SegmentIds(segments, segments),
                                   sm_scale=1.0, block_sizes=_BLOCK_SIZES)


def multihead_attention_2d(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: Optional[jax.Array] = None,
    rel_w: Optional[jax.Array] = None,
    *,
    relative_method: attention.RelativeMethod = "gather",
    interpret: Optional[bool] = None,
) -> jax.Array:
  """Drop-in for :func:`aa_flax.attention.multihead_attention_2d` on the Pallas TPU kernel.

  Args:
    q: ``[B, N, H, W, d_k]`` (already scaled); k: ``[B, N, H, W, d_k]``;
      v: ``[B, N, H, W, d_v]``.
    rel_h, rel_w: ``[2H - 1, d_k]`` and ``[2W - 1, d_k]``, or both None.
    relative_method: how ``A_h``/``A_w`` are formed (``"gather"`` or ``"skew"``).
    interpret: ``None`` (see :func:`resolve_interpret`), or True/False to force it.

  Returns:
    ``out`` ``[B, N, H, W, d_v]`` in v's dtype.
  """
  attention.check_inputs(q, k, v, rel_h, rel_w, relative_method)
  batch, heads, height, width, _ = q.shape
  value_depth = v.shape[-1]
  relative = rel_h is not None
  q_aug, k_aug = (augmented_attention.augment(q, k, rel_h, rel_w, relative_method) if relative
                  else (q, k))
  length = height * width
  padded_length = _round_up(length, BLOCK)
  depth = _round_up(max(q_aug.shape[-1], value_depth), LANES)

  def to_bnld(t):  # [B, N, H, W, d] -> [B, N, L_p, D_p] in q's dtype
    t = t.reshape(batch, heads, length, t.shape[-1]).astype(q.dtype)
    return jnp.pad(t, [(0, 0), (0, 0), (0, padded_length - length), (0, depth - t.shape[-1])])

  flash = functools.partial(_flash, length=length)
  if resolve_interpret(interpret):
    flash = _interpreted(flash)
  out = per_batch_shard(flash, (to_bnld(q_aug), to_bnld(k_aug), to_bnld(v)))
  out = out[:, :, :length, :value_depth].reshape(batch, heads, height, width, value_depth)
  return out.astype(v.dtype)
