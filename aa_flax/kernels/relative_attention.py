"""Fused 2D relative self-attention: a flash-attention-style Pallas kernel.

Computes exactly what :func:`aa_flax.attention.multihead_attention_2d` computes,
``softmax(Q Kᵀ + S_H + S_W) V`` per head, without ever materialising the
``[B, N, HW, HW]`` logits. The relative logits are formed inside the kernel from q and the two
relative tables, so the memory that scales with the feature map is ``O(B·N·HW·d)``.

Tiling (why it is cheap to fuse the relative term)
--------------------------------------------------
One program owns one *image row* of queries (``W`` queries padded to a power of two ``Wp``)
and loops over key rows. With that tiling the two relative terms split cleanly:

* the height term ``q_(y,x) · r^H[y2 - y + H - 1]`` is one table row per (query row, key row)
  pair: a dynamic one-row load and a ``[Wp, d]`` row-wise product per step;
* the width term ``q_(y,x) · r^W[x2 - x + W - 1]`` does not depend on the key row, so the
  forward and the dq pass build this ``[Wp, Wp]`` block once per program (a loop over the
  ``d`` depth channels, each a gathered load from the small ``r^W`` table) and reuse it for all
  ``H`` key rows. The dk/dv pass iterates over query rows and rebuilds it each step; that
  recompute (``d · Wp²`` multiply-adds) is the kernel's price for not storing the
  ``[B, N, HW, W]`` per-axis logits.

Backward (``jax.custom_vjp``): the forward saves the output and the per-query log-sum-exp
(``[B, N, H, Wp]``); the backward recomputes probabilities blockwise in two kernels (dq plus
table gradients over query rows; dk, dv over key rows), as in FlashAttention-2. Table
gradients are written per (batch, head, query row) as float32 partials (``[H, d]`` by key row
for the height table, ``[2W - 1, d]`` by offset for the width table), deterministic (no
atomics), and summed by XLA. They are ``O(B·N·H·(H + 2W)·d)``, linear in HW for a fixed aspect
ratio, and the largest transient of the backward pass.

Padding: the width is padded to ``Wp = max(16, next_pow2(W))`` and depths to
``max(16, next_pow2(d))`` (Triton needs power-of-two tiles of at least 16 for ``dot``); padded
keys are masked out of the softmax, padded queries are sliced off, padded depth is zero.

Backends: on GPU the kernel is compiled with the Pallas Triton lowering. On CPU there is no
compiled Pallas backend, so ``interpret=None`` (the default) falls back to Pallas interpret
mode there: exact, but slow, meant for tests and memory accounting. Other backends (TPU)
raise ``NotImplementedError`` unless ``interpret=True`` is passed.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aa_flax import attention

# Finite stand-in for -inf: keeps exp() at exactly 0 without inf - inf = nan.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_TILE = 16  # smallest dimension Triton's dot accepts


def _tile(n: int) -> int:
  """Power-of-two tile size >= max(n, 16)."""
  return max(_MIN_TILE, pl.next_power_of_2(n))


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """Decides whether to run the kernel in Pallas interpret mode.

  ``None`` means: compiled on GPU, interpret mode on CPU. Any other backend raises, naming
  the ``attention_impl="xla"`` alternative.
  """
  if interpret is not None:
    return bool(interpret)
  backend = jax.default_backend()
  if backend == "gpu":
    return False
  if backend == "cpu":
    return True
  raise NotImplementedError(
      f"the fused relative-attention kernel is written for the Pallas Triton (GPU) lowering; "
      f"backend {backend!r} cannot compile it. Use attention_impl='xla', or pass "
      f"interpret=True to emulate it.")


# --------------------------------------------------------------------------- kernel helpers


def _width_logits(q_column, rw_ref, *, wp: int, width: int, key_depth: int) -> jax.Array:
  """``[Wp, Wp]`` block ``out[x, x2] = q[x] · r^W[x2 - x + W - 1]`` for one query row.

  ``q_column(c)`` loads channel c of the query row as ``[Wp]`` (a single-indexer ref load,
  which is what the Triton lowering supports); rw_ref is the ``[2W - 1, Dk]`` width table.
  Entries with ``x >= W`` or ``x2 >= W`` are meaningless (callers mask or slice them off);
  the table index is clamped so every gathered load stays in bounds.
  """
  xq, xk = _positions(wp)
  index = jnp.clip(xk - xq + (width - 1), 0, 2 * width - 2)  # [Wp, Wp]

  def add_channel(c, acc):
    table = rw_ref[index, c].astype(jnp.float32)  # gathered [Wp, Wp]
    return acc + q_column(c).astype(jnp.float32)[:, None] * table

  return lax.fori_loop(0, key_depth, add_channel, jnp.zeros((wp, wp), jnp.float32))


def _positions(wp: int) -> tuple[jax.Array, jax.Array]:
  """Query x ``[Wp, 1]`` and key x2 ``[1, Wp]`` index grids."""
  positions = jnp.arange(wp, dtype=jnp.int32)
  return positions[:, None], positions[None, :]


def _height_logits(q: jax.Array, rh_ref, offset) -> jax.Array:
  """``[Wp]`` vector ``q[x] · r^H[offset]`` (offset = y2 - y + H - 1, a traced scalar)."""
  row = rh_ref[pl.ds(offset, 1), :].astype(jnp.float32)  # [1, Dk]
  return jnp.sum(q.astype(jnp.float32) * row, axis=1)


def _logits(q, k, w_logits, rh_ref, offset, key_valid, relative: bool):
  """Masked ``[Wp, Wp]`` logits of one query row against one key row (float32)."""
  s = plgpu.dot(q, k, trans_b=True)
  if relative:
    s = s + w_logits + _height_logits(q, rh_ref, offset)[:, None]
  return jnp.where(key_valid, s, _MASK_VALUE)


def _key_valid(wp: int, width: int) -> jax.Array:
  """``[1, Wp]``: True for real (unpadded) key columns."""
  return _positions(wp)[1] < width


# --------------------------------------------------------------------------- forward kernel


def _forward_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, o_ref, lse_ref, *,
                    height: int, width: int, key_depth: int, relative: bool):
  """One query row: q_ref [Wp, Dk]; k_ref [H, Wp, Dk]; v_ref [H, Wp, Dv];
  o_ref [Wp, Dv]; lse_ref [Wp]."""
  y = pl.program_id(2)
  q = q_ref[...]
  wp, dv = q.shape[0], v_ref.shape[-1]
  key_valid = _key_valid(wp, width)
  w_logits = (_width_logits(lambda c: q_ref[:, c], rw_ref, wp=wp, width=width,
                            key_depth=key_depth) if relative else None)

  def over_key_rows(y2, carry):
    acc, m_prev, l_prev = carry
    v = v_ref[y2]
    s = _logits(q, k_ref[y2], w_logits, rh_ref, y2 - y + height - 1, key_valid, relative)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((wp, dv), jnp.float32), jnp.full((wp,), -jnp.inf, jnp.float32),
          jnp.zeros((wp,), jnp.float32))
  acc, m, l = lax.fori_loop(0, height, over_key_rows, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


# --------------------------------------------------------------------------- backward kernels


def _dq_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *table_grad_refs, height: int, width: int, key_depth: int,
               relative: bool):
  """One query row y: dq_ref [Wp, Dk]. With relative tables, ``table_grad_refs`` are
  drh_ref [H, Dk], whose row y2 receives this query row's gradient of table row
  ``y2 - y + H - 1``, and drw_ref [2W - 1, Dk], whose row m receives its gradient of width
  table row m. Every row is written, so no initialisation is needed."""
  y = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  wp = q.shape[0]
  key_valid = _key_valid(wp, width)
  w_logits = None
  if relative:
    w_logits = _width_logits(lambda c: q_ref[:, c], rw_ref, wp=wp, width=width,
                             key_depth=key_depth)
    drh_ref, drw_ref = table_grad_refs
  q32 = q.astype(jnp.float32)

  def over_key_rows(y2, carry):
    dq, ds_width = carry
    k, v = k_ref[y2], v_ref[y2]
    offset = y2 - y + height - 1
    s = _logits(q, k, w_logits, rh_ref, offset, key_valid, relative)
    p = jnp.exp(s - lse[:, None])
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
    dq = dq + plgpu.dot(ds.astype(k.dtype), k)
    if relative:
      # Height term: every key of this key row shares table row `offset`.
      ds_row = jnp.sum(ds, axis=1)  # [Wp]
      dq = dq + ds_row[:, None] * rh_ref[pl.ds(offset, 1), :].astype(jnp.float32)
      drh_ref[pl.ds(y2, 1), :] = jnp.sum(ds_row[:, None] * q32, axis=0)[None, :]
      # Width term: depends on (x, x2) only, so sum dS over key rows first.
      ds_width = ds_width + ds
    return dq, ds_width

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((wp, wp), jnp.float32))
  dq, ds_width = lax.fori_loop(0, height, over_key_rows, init)

  if relative:
    xq, xk = _positions(wp)
    offsets = xk - xq + (width - 1)  # [Wp, Wp]

    def over_width_offsets(m, dq):
      # g[x] = dS summed over the (single) key column x2 = x + m - (W - 1).
      g = jnp.sum(jnp.where(offsets == m, ds_width, 0.0), axis=1)  # [Wp]
      drw_ref[pl.ds(m, 1), :] = jnp.sum(g[:, None] * q32, axis=0)[None, :]
      return dq + g[:, None] * rw_ref[pl.ds(m, 1), :].astype(jnp.float32)

    dq = lax.fori_loop(0, 2 * width - 1, over_width_offsets, dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, height: int, width: int, key_depth: int,
                 relative: bool):
  """One key row y2: q_ref/do_ref [H, Wp, D]; lse_ref/delta_ref [H, Wp]; k_ref [Wp, Dk];
  v_ref [Wp, Dv]; dk_ref [Wp, Dk]; dv_ref [Wp, Dv]."""
  y2 = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  wp = k.shape[0]
  key_valid = _key_valid(wp, width)

  def over_query_rows(y, carry):
    dk, dv = carry
    q, do = q_ref[y], do_ref[y]
    w_logits = (_width_logits(lambda c: q_ref[y, :, c], rw_ref, wp=wp, width=width,
                              key_depth=key_depth) if relative else None)
    s = _logits(q, k, w_logits, rh_ref, y2 - y + height - 1, key_valid, relative)
    p = jnp.exp(s - lse_ref[y][:, None])
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[y][:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, height, over_query_rows, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas calls


def _specs(height: int):
  """BlockSpec factories over the grid (batch, head, row)."""
  def row(*tail):  # one image row of a [B, N, H, ...] array
    return pl.BlockSpec((None, None, None, *tail), lambda b, n, r: (b, n, r) + (0,) * len(tail))

  def whole(*tail):  # every row of one (batch, head)
    return pl.BlockSpec((None, None, height, *tail),
                        lambda b, n, r: (b, n, 0) + (0,) * len(tail))

  def table(rows, depth):
    return pl.BlockSpec((rows, depth), lambda b, n, r: (0, 0))

  return row, whole, table


def _compiler_params():
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _forward_call(qp, kp, vp, rhp, rwp, *, height, width, key_depth, relative, interpret):
  batch, heads, _, wp, dkp = qp.shape
  dvp = vp.shape[-1]
  row, whole, table = _specs(height)
  kernel = functools.partial(_forward_kernel, height=height, width=width,
                             key_depth=key_depth, relative=relative)
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, height),
      in_specs=[row(wp, dkp), whole(wp, dkp), whole(wp, dvp),
                table(*rhp.shape), table(*rwp.shape)],
      out_specs=[row(wp, dvp), row(wp)],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, height, wp, dvp), vp.dtype),
                 jax.ShapeDtypeStruct((batch, heads, height, wp), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="relative_attention_2d_forward",
  )(qp, kp, vp, rhp, rwp)


def _backward_calls(qp, kp, vp, rhp, rwp, do, lse, delta, *, height, width, key_depth,
                    relative, interpret):
  batch, heads, _, wp, dkp = qp.shape
  dvp = vp.shape[-1]
  row, whole, table = _specs(height)
  static = dict(height=height, width=width, key_depth=key_depth, relative=relative)
  tables = [table(*rhp.shape), table(*rwp.shape)]
  out_specs, out_shape = [row(wp, dkp)], [jax.ShapeDtypeStruct(qp.shape, qp.dtype)]
  if relative:  # per-(batch, head, query row) table-gradient partials, float32
    for rows in (height, 2 * width - 1):
      out_specs.append(row(rows, dkp))
      out_shape.append(jax.ShapeDtypeStruct((batch, heads, height, rows, dkp), jnp.float32))
  dq, *table_partials = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(batch, heads, height),
      in_specs=[row(wp, dkp), whole(wp, dkp), whole(wp, dvp), *tables,
                row(wp, dvp), row(wp), row(wp)],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="relative_attention_2d_dq",
  )(qp, kp, vp, rhp, rwp, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **static),
      grid=(batch, heads, height),
      in_specs=[whole(wp, dkp), row(wp, dkp), row(wp, dvp), *tables,
                whole(wp, dvp), whole(wp), whole(wp)],
      out_specs=[row(wp, dkp), row(wp, dvp)],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype),
                 jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="relative_attention_2d_dkdv",
  )(qp, kp, vp, rhp, rwp, do, lse, delta)
  return dq, dk, dv, table_partials


# --------------------------------------------------------------------------- custom VJP


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(q, k, v, rel_h, rel_w, relative: bool, interpret: bool):
  return _fused_forward(q, k, v, rel_h, rel_w, relative, interpret)[0]


def _fused_forward(q, k, v, rel_h, rel_w, relative, interpret):
  batch, heads, height, width, key_depth = q.shape
  wp, dkp, dvp = _tile(width), _tile(key_depth), _tile(v.shape[-1])
  qp = _pad_to(_pad_to(q, 3, wp), 4, dkp)
  kp = _pad_to(_pad_to(k, 3, wp), 4, dkp)
  vp = _pad_to(_pad_to(v, 3, wp), 4, dvp)
  rhp, rwp = _pad_to(rel_h, 1, dkp), _pad_to(rel_w, 1, dkp)
  op, lse = _forward_call(qp, kp, vp, rhp, rwp, height=height, width=width,
                          key_depth=key_depth, relative=relative, interpret=interpret)
  out = op[:, :, :, :width, :v.shape[-1]]
  return out, (qp, kp, vp, rhp, rwp, op, lse, q.shape, v.shape)


def _fused_fwd(q, k, v, rel_h, rel_w, relative, interpret):
  return _fused_forward(q, k, v, rel_h, rel_w, relative, interpret)


def _fused_bwd(relative, interpret, residuals, d_out):
  qp, kp, vp, rhp, rwp, op, lse, q_shape, v_shape = residuals
  _, _, height, width, key_depth = q_shape
  dop = _pad_to(_pad_to(d_out, 3, vp.shape[3]), 4, vp.shape[4])
  # delta_i = sum_j P_ij dP_ij = dO_i · O_i, the softmax-backward row correction.
  delta = jnp.sum(dop.astype(jnp.float32) * op.astype(jnp.float32), axis=-1)
  dq, dk, dv, table_partials = _backward_calls(
      qp, kp, vp, rhp, rwp, dop, lse, delta, height=height, width=width,
      key_depth=key_depth, relative=relative, interpret=interpret)
  unpad = lambda t, depth: t[:, :, :, :width, :depth]  # noqa: E731
  d_rel_h = d_rel_w = None
  if relative:
    drh, drw = table_partials
    # drh[b, n, y, y2] belongs to table row y2 - y + H - 1: sum the batch and heads, then
    # scatter-add the [H, H] (query row, key row) grid onto the 2H - 1 offsets.
    drh = jnp.zeros((2 * height - 1, drh.shape[-1]), jnp.float32).at[
        attention.relative_index(height)].add(jnp.sum(drh, axis=(0, 1)))
    d_rel_h = drh[:, :key_depth].astype(rhp.dtype)
    d_rel_w = jnp.sum(drw, axis=(0, 1, 2))[:, :key_depth].astype(rwp.dtype)
  return (unpad(dq, key_depth), unpad(dk, key_depth), unpad(dv, v_shape[-1]),
          d_rel_h, d_rel_w)


_fused.defvjp(_fused_fwd, _fused_bwd)


def multihead_attention_2d(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: Optional[jax.Array] = None,
    rel_w: Optional[jax.Array] = None,
    *,
    relative_method: attention.RelativeMethod = "gather",
    return_weights: bool = False,
    interpret: Optional[bool] = None,
):
  """Fused drop-in for :func:`aa_flax.attention.multihead_attention_2d`.

  Same arguments, shapes and results (softmax in float32, matmuls in the input dtype with
  float32 accumulation; q already scaled by ``d_k^h ** -0.5``).

  Args:
    q: ``[B, N, H, W, d_k]``; k: ``[B, N, H, W, d_k]``; v: ``[B, N, H, W, d_v]``.
    rel_h, rel_w: ``[2H - 1, d_k]`` and ``[2W - 1, d_k]``, or both None (plain attention).
    relative_method: validated for signature compatibility; the kernel forms the relative
      logits directly, so the two methods give the same computation.
    return_weights: also return the ``[B, N, HW, HW]`` float32 weights. They cannot come
      out of the fused kernel; they are recomputed by the XLA path (without gradient), which
      XLA removes again when the caller drops them (e.g. an unstored ``sow``). Requesting
      them and using them costs the O((HW)²) memory the kernel avoids.
    interpret: ``None`` picks compiled Triton on GPU and Pallas interpret mode on CPU (see
      :func:`resolve_interpret`); True/False force it.

  Returns:
    ``out`` ``[B, N, H, W, d_v]`` in v's dtype, and with ``return_weights`` the weights.
  """
  if relative_method not in attention.RELATIVE_METHODS:
    raise ValueError(f"relative method {relative_method!r} is not one of "
                     f"{attention.RELATIVE_METHODS}")
  if (rel_h is None) != (rel_w is None):
    raise ValueError("pass both rel_h and rel_w, or neither")
  if q.ndim != 5 or k.shape != q.shape or v.ndim != 5 or v.shape[:4] != q.shape[:4]:
    raise ValueError(f"q, k, v must be [B, N, H, W, d] with matching B, N, H, W (and q, k "
                     f"equal); got q {q.shape}, k {k.shape}, v {v.shape}")
  _, _, height, width, key_depth = q.shape
  relative = rel_h is not None
  if relative:
    if rel_h.shape != (2 * height - 1, key_depth) or rel_w.shape != (2 * width - 1, key_depth):
      raise ValueError(
          f"relative tables must be rel_h {(2 * height - 1, key_depth)} and rel_w "
          f"{(2 * width - 1, key_depth)} for q of shape {q.shape}; got rel_h {rel_h.shape}, "
          f"rel_w {rel_w.shape}")
  else:
    # Never read by the kernel (relative=False); 1-row placeholders keep one code path.
    rel_h = jnp.zeros((1, key_depth), q.dtype)
    rel_w = jnp.zeros((1, key_depth), q.dtype)
  out = _fused(q, k, v, rel_h, rel_w, relative, resolve_interpret(interpret))
  if not return_weights:
    return out
  _, weights = attention.multihead_attention_2d(
      *(lax.stop_gradient(t) for t in (q, k, v)),
      *((lax.stop_gradient(rel_h), lax.stop_gradient(rel_w)) if relative else (None, None)),
      relative_method=relative_method, return_weights=True)
  return out, weights
