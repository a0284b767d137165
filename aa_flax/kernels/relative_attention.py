"""Fused 2D relative self-attention: a flash-attention-style Pallas (Triton) kernel.

Computes exactly what :func:`aa_flax.attention.multihead_attention_2d` computes,
``softmax(Q Kᵀ + S_H + S_W) V`` per head, without materialising the ``[B, N, HW, HW]``
logits.

The relative logits depend on a key only through its column x2 and its row y2:

    S_W[i, (y2, x2)] = A_w[i, x2],   S_H[i, (y2, x2)] = A_h[i, y2]

with ``A_w [B, N, HW, W]`` and ``A_h [B, N, HW, H]`` the per-axis logits of
:func:`aa_flax.attention.relative_logits_2d_parts` (float32). XLA forms them once (a small
einsum against the tables); the kernels only add them to logit tiles, so no table is read
inside the kernels. The backward kernels return their gradients ``dA_w``/``dA_h`` (``dS``
summed over key rows / key columns), and XLA's autodiff of the einsum turns those into the
table gradients and q's relative share, so table gradients need no per-program partials.

Tiling
------
Keys are laid out by image row, each row padded to ``Wp = max(16, next_pow2(W))`` columns, so
one key tile is one image row and its ``A_w`` term is the same ``[M, Wp]`` tile for every row.
Queries are the flat ``HW`` positions in blocks of ``M = 64`` (fewer, down to 16, for maps
smaller than that), so every matmul has at least 64 rows wherever the map has 64 positions:

* forward and dq kernels: one program per query block, a loop over the H key rows; ``A_w``
  is loaded once per program as ``[M, Wp]``, ``A_h`` one ``[M]`` column per key row;
* dk/dv kernel: one program per ``R`` key rows (``R·Wp >= 64`` where H allows), a loop over
  query blocks; the ``A_w``/``A_h`` tiles are broadcast over the program's ``R`` rows.

``A_w``/``A_h`` and their gradients are stored key-axis-major (``[B, N, Wp, L]``,
``[B, N, H_p, L]``), so every load and store above is a contiguous row of length M.

Backward (``jax.custom_vjp``): the forward saves its output and the per-query log-sum-exp; the
backward recomputes ``A_w``/``A_h`` with XLA and the probabilities blockwise in two kernels
(dq, dA_w, dA_h over query blocks; dk, dv over key rows), as in FlashAttention-2. No atomics.

Padding: key columns to ``Wp``, key rows to a multiple of ``R``, the query sequence to a
multiple of ``M``, depths to ``max(16, next_pow2(d))`` (Triton's ``dot`` needs power-of-two
tiles of at least 16); padded keys are masked out of the softmax, padded queries and depths
are sliced off.

Memory that grows with the map: q, k, v, the output and the log-sum-exp are kept from forward
to backward; transiently each pass holds their padded copies and ``A_w``/``A_h`` (float32), and
the backward also ``dA_w``/``dA_h`` (input dtype): ``O(B·N·HW·(d + Wp + H))``.

On a mesh of several devices the kernels (and their custom VJP) run per device on its batch
shard (:mod:`aa_flax.kernels.per_device`).

Backends: on GPU the kernels are compiled with the Pallas Triton lowering. On CPU there is no
compiled Pallas backend, so ``interpret=None`` (the default) runs Pallas interpret mode there:
exact, but slow, meant for tests and memory accounting. Other backends raise
``NotImplementedError`` unless ``interpret=True`` is passed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aa_flax import attention
from aa_flax.kernels.notices import say_once
from aa_flax.kernels.per_device import per_batch_shard

BACKENDS = ("gpu", "cpu")  # compiled on GPU; Pallas interpret mode on CPU
# Finite stand-in for -inf: keeps exp() at exactly 0 without inf - inf = nan.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_TILE = 16  # smallest dimension Triton's dot accepts
_BLOCK = 64  # rows of every matmul where the map is large enough


def _tile(n: int) -> int:
  """Power-of-two tile size >= max(n, 16)."""
  return max(_MIN_TILE, pl.next_power_of_2(n))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """Decides whether to run the kernels in Pallas interpret mode.

  ``None`` means: compiled on GPU, interpret mode on CPU. Any other backend raises.
  """
  if interpret is not None:
    return bool(interpret)
  backend = jax.default_backend()
  if backend not in BACKENDS:
    raise NotImplementedError(
        f"the fused relative-attention kernel is written for the Pallas Triton (GPU) lowering; "
        f"backend {backend!r} cannot compile it (pass interpret=True to emulate it)")
  if backend != "gpu":
    say_once(f"attention_impl='pallas' on backend {backend!r} runs the Pallas kernels in "
             "interpret mode (emulated op by op, many times slower than the XLA path; for "
             "tests): the compiled Triton kernels need a GPU. Use 'xla' or 'auto' here.")
  return backend != "gpu"


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Padded sizes of one problem (all static)."""
  height: int  # H
  width: int  # W
  key_columns: int  # Wp: key columns per image row, padded
  key_rows: int  # H_p: key rows, padded to a multiple of rows_per_block
  rows_per_block: int  # R: key rows per dk/dv program
  query_block: int  # M: queries per forward/dq program and per dk/dv loop step
  queries: int  # L: HW padded to a multiple of M
  key_depth: int  # padded d_k
  value_depth: int  # padded d_v

  @classmethod
  def of(cls, q_shape, v_shape) -> "_Layout":
    _, _, height, width, key_depth = q_shape
    key_columns = _tile(width)
    rows = max(1, min(_BLOCK // key_columns, pl.next_power_of_2(height)))
    query_block = min(_BLOCK, _tile(height * width))
    return cls(height, width, key_columns, _round_up(height, rows), rows, query_block,
               _round_up(height * width, query_block), _tile(key_depth), _tile(v_shape[-1]))

  @property
  def key_block(self) -> int:
    return self.rows_per_block * self.key_columns

  def pad_queries(self, t: jax.Array, depth: Optional[int] = None) -> jax.Array:
    """``[B, N, H, W, d]`` -> ``[B, N, L, depth]``; ``[B, N, H, W]`` -> ``[B, N, L]``."""
    batch, heads = t.shape[:2]
    flat = t.reshape(batch, heads, self.height * self.width, *t.shape[4:])
    pad = [(0, 0), (0, 0), (0, self.queries - flat.shape[2])]
    if depth is not None:
      pad.append((0, depth - t.shape[-1]))
    return jnp.pad(flat, pad)

  def unpad_queries(self, t: jax.Array, depth: int) -> jax.Array:
    batch, heads = t.shape[:2]
    return t[:, :, :self.height * self.width, :depth].reshape(
        batch, heads, self.height, self.width, depth)

  def pad_keys(self, t: jax.Array, depth: int) -> jax.Array:
    """``[B, N, H, W, d]`` -> ``[B, N, H_p * Wp, depth]`` (image rows of Wp columns)."""
    batch, heads = t.shape[:2]
    t = jnp.pad(t, [(0, 0), (0, 0), (0, self.key_rows - self.height),
                    (0, self.key_columns - self.width), (0, depth - t.shape[-1])])
    return t.reshape(batch, heads, self.key_rows * self.key_columns, depth)

  def unpad_keys(self, t: jax.Array, depth: int) -> jax.Array:
    batch, heads = t.shape[:2]
    t = t.reshape(batch, heads, self.key_rows, self.key_columns, t.shape[-1])
    return t[:, :, :self.height, :self.width, :depth]


def _relative_biases(q, rel_h, rel_w, relative_method: str, layout: _Layout):
  """Key-axis-major per-axis logits, float32: ``A_wᵀ [B, N, Wp, L]``, ``A_hᵀ [B, N, H_p, L]``.

  ``A_wᵀ[b, n, x2, i] = q_i · r^W[x2 - x_i + W - 1]``, ``A_hᵀ[b, n, y2, i] = q_i ·
  r^H[y2 - y_i + H - 1]``; padded entries are zero (the kernels mask or drop them).
  """
  logits_h, logits_w = attention.relative_logits_2d_parts(
      q, rel_h, rel_w, relative_method, precision_type=jnp.float32)

  def key_axis_major(logits, rows):  # [B, N, H, W, K] -> [B, N, rows, L]
    padded = layout.pad_queries(logits, rows)  # [B, N, L, rows]
    return jnp.swapaxes(padded, 2, 3)

  return (key_axis_major(logits_w, layout.key_columns),
          key_axis_major(logits_h, layout.key_rows))


# --------------------------------------------------------------------------- kernels


def _key_columns_valid(layout: _Layout) -> jax.Array:
  """``[1, Wp]``: True for real (unpadded) key columns."""
  return jnp.arange(layout.key_columns, dtype=jnp.int32)[None, :] < layout.width


def _row_logits(q, k, key_row, bias_w, ah_ref, layout: _Layout, relative: bool):
  """Masked float32 ``[M, Wp]`` logits of a query block against key row ``key_row``."""
  s = plgpu.dot(q, k, trans_b=True)
  if relative:
    s = s + bias_w + ah_ref[key_row, :][:, None]
  return jnp.where(_key_columns_valid(layout), s, _MASK_VALUE)


def _split_refs(refs, relative: bool, outputs: int):
  """``(aw_ref, ah_ref, outputs...)``: the bias refs are None without relative tables."""
  if relative:
    return refs[0], refs[1], refs[2:]
  assert len(refs) == outputs
  return None, None, refs


def _key_row(ref, key_row, layout: _Layout):
  return ref[pl.ds(key_row * layout.key_columns, layout.key_columns), :]


def _forward_kernel(q_ref, k_ref, v_ref, *refs, layout: _Layout, relative: bool):
  """One query block: q_ref [M, Dk]; k_ref [H_p·Wp, Dk]; v_ref [H_p·Wp, Dv];
  aw_ref [Wp, M]; ah_ref [H_p, M]; o_ref [M, Dv]; lse_ref [M]."""
  aw_ref, ah_ref, (o_ref, lse_ref) = _split_refs(refs, relative, 2)
  q = q_ref[...]
  rows, depth = q.shape[0], v_ref.shape[-1]
  bias_w = aw_ref[...].T if relative else None  # [M, Wp], loaded once

  def over_key_rows(key_row, carry):
    acc, m_prev, l_prev = carry
    v = _key_row(v_ref, key_row, layout)
    s = _row_logits(q, _key_row(k_ref, key_row, layout), key_row, bias_w, ah_ref, layout,
                    relative)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((rows, depth), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, layout.height, over_key_rows, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, layout: _Layout,
               relative: bool):
  """One query block: dq_ref [M, Dk]; with relative tables also daw_ref [Wp, M] (dS summed
  over key rows) and dah_ref [H_p, M] (row y2: dS summed over key row y2's columns; rows
  past H are left unwritten)."""
  aw_ref, ah_ref, (dq_ref, *bias_grad_refs) = _split_refs(refs, relative, 1)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  bias_w = aw_ref[...].T if relative else None

  def over_key_rows(key_row, carry):
    dq, ds_w = carry
    k, v = _key_row(k_ref, key_row, layout), _key_row(v_ref, key_row, layout)
    s = _row_logits(q, k, key_row, bias_w, ah_ref, layout, relative)
    p = jnp.exp(s - lse[:, None])
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
    dq = dq + plgpu.dot(ds.astype(k.dtype), k)
    if relative:
      dah_ref = bias_grad_refs[1]
      dah_ref[key_row, :] = jnp.sum(ds, axis=1).astype(dah_ref.dtype)
      ds_w = ds_w + ds
    return dq, ds_w

  init = (jnp.zeros(q.shape, jnp.float32),
          jnp.zeros((q.shape[0], layout.key_columns), jnp.float32))
  dq, ds_w = lax.fori_loop(0, layout.height, over_key_rows, init)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if relative:
    daw_ref = bias_grad_refs[0]
    daw_ref[...] = ds_w.T.astype(daw_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, layout: _Layout,
                 relative: bool):
  """R key rows: k_ref [R·Wp, Dk]; v_ref [R·Wp, Dv]; q_ref/do_ref [L, D]; lse_ref/delta_ref
  [L]; aw_ref [Wp, L]; ah_ref [H_p, L]; dk_ref [R·Wp, Dk]; dv_ref [R·Wp, Dv]. Works on the
  transposed problem (keys as rows) so every matmul has R·Wp rows."""
  aw_ref, ah_ref, (dk_ref, dv_ref) = _split_refs(refs, relative, 2)
  k, v = k_ref[...], v_ref[...]
  rows_per_block, columns = layout.rows_per_block, layout.key_columns
  first_row = pl.program_id(2) * rows_per_block
  block = layout.query_block
  key_index = jnp.arange(layout.key_block, dtype=jnp.int32)[:, None]  # [R·Wp, 1]
  key_valid = ((key_index % columns < layout.width)
               & (first_row + key_index // columns < layout.height))

  def over_query_blocks(index, carry):
    dk, dv = carry
    queries = pl.ds(index * block, block)
    q, do = q_ref[queries, :], do_ref[queries, :]
    s = plgpu.dot(k, q, trans_b=True)  # [R·Wp, M]: logits transposed
    if relative:
      bias_w = aw_ref[:, queries]  # [Wp, M], the same for each of the R key rows
      bias_h = ah_ref[pl.ds(first_row, rows_per_block), queries]  # [R, M]
      bias = bias_w[None, :, :] + bias_h[:, None, :]  # [R, Wp, M]
      s = s + bias.reshape(layout.key_block, block)
    s = jnp.where(key_valid, s, _MASK_VALUE)
    p = jnp.exp(s - lse_ref[queries][None, :])
    dv = dv + plgpu.dot(p.astype(do.dtype), do)
    ds = p * (plgpu.dot(v, do, trans_b=True) - delta_ref[queries][None, :])
    dk = dk + plgpu.dot(ds.astype(q.dtype), q)
    return dk, dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, layout.queries // block, over_query_blocks, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas calls


def _specs(layout: _Layout):
  """BlockSpec factories over the grid (batch, head, block)."""
  def blocked(rows, *tail):  # block `i` of `rows` along axis 2 of [B, N, X, ...]
    return pl.BlockSpec((None, None, rows, *tail), lambda b, n, i: (b, n, i) + (0,) * len(tail))

  def whole(*shape):  # all of one (batch, head)
    return pl.BlockSpec((None, None, *shape), lambda b, n, i: (b, n) + (0,) * len(shape))

  def bias_block(rows):  # [B, N, rows, L] -> [rows, M] of query block i
    return pl.BlockSpec((None, None, rows, layout.query_block), lambda b, n, i: (b, n, 0, i))

  return blocked, whole, bias_block


def _compiler_params():
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _forward_call(qp, kp, vp, biases, layout: _Layout, interpret: bool):
  batch, heads = qp.shape[:2]
  blocked, whole, bias_block = _specs(layout)
  keys = layout.key_rows * layout.key_columns
  relative = biases is not None
  in_specs = [blocked(layout.query_block, layout.key_depth), whole(keys, layout.key_depth),
              whole(keys, layout.value_depth)]
  if relative:
    in_specs += [bias_block(layout.key_columns), bias_block(layout.key_rows)]
  return pl.pallas_call(
      functools.partial(_forward_kernel, layout=layout, relative=relative),
      grid=(batch, heads, layout.queries // layout.query_block),
      in_specs=in_specs,
      out_specs=[blocked(layout.query_block, layout.value_depth), blocked(layout.query_block)],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, layout.queries, layout.value_depth),
                                      vp.dtype),
                 jax.ShapeDtypeStruct((batch, heads, layout.queries), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="relative_attention_2d_forward",
  )(qp, kp, vp, *(biases or ()))


def _backward_calls(qp, kp, vp, dop, lse, delta, biases, layout: _Layout, interpret: bool):
  batch, heads = qp.shape[:2]
  blocked, whole, bias_block = _specs(layout)
  keys = layout.key_rows * layout.key_columns
  relative = biases is not None
  static = dict(layout=layout, relative=relative)
  query_block = layout.query_block

  bias_specs = [bias_block(layout.key_columns), bias_block(layout.key_rows)] if relative else []
  out_specs = [blocked(query_block, layout.key_depth)]
  out_shape = [jax.ShapeDtypeStruct(qp.shape, qp.dtype)]
  if relative:  # dA_wᵀ, dA_hᵀ in the layout of the biases, input dtype
    out_specs += bias_specs
    out_shape += [jax.ShapeDtypeStruct(b.shape, qp.dtype) for b in biases]
  dq, *bias_grads = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(batch, heads, layout.queries // query_block),
      in_specs=[blocked(query_block, layout.key_depth), whole(keys, layout.key_depth),
                whole(keys, layout.value_depth), blocked(query_block, layout.value_depth),
                blocked(query_block), blocked(query_block), *bias_specs],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="relative_attention_2d_dq",
  )(qp, kp, vp, dop, lse, delta, *(biases or ()))

  key_block = layout.key_block
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **static),
      grid=(batch, heads, layout.key_rows // layout.rows_per_block),
      in_specs=[whole(layout.queries, layout.key_depth), blocked(key_block, layout.key_depth),
                blocked(key_block, layout.value_depth),
                whole(layout.queries, layout.value_depth), whole(layout.queries),
                whole(layout.queries),
                *([whole(layout.key_columns, layout.queries),
                   whole(layout.key_rows, layout.queries)] if relative else [])],
      out_specs=[blocked(key_block, layout.key_depth), blocked(key_block, layout.value_depth)],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype),
                 jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="relative_attention_2d_dkdv",
  )(qp, kp, vp, dop, lse, delta, *(biases or ()))
  return dq, dk, dv, bias_grads


# --------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(q, k, v, tables, relative_method: str, interpret: bool):
  return _fused_forward(q, k, v, tables, relative_method, interpret)[0]


def _fused_forward(q, k, v, tables, relative_method, interpret):
  layout = _Layout.of(q.shape, v.shape)
  biases = None if tables is None else _relative_biases(q, *tables, relative_method, layout)
  op, lse = _forward_call(layout.pad_queries(q, layout.key_depth),
                          layout.pad_keys(k, layout.key_depth),
                          layout.pad_keys(v, layout.value_depth), biases, layout, interpret)
  out = layout.unpad_queries(op, v.shape[-1])
  return out, (q, k, v, tables, out, lse)


def _fused_bwd(relative_method, interpret, residuals, d_out):
  q, k, v, tables, out, lse = residuals
  layout = _Layout.of(q.shape, v.shape)
  # delta_i = sum_j P_ij dP_ij = dO_i · O_i, the softmax-backward row correction.
  delta = layout.pad_queries(
      jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1))
  biases, biases_vjp = None, None
  if tables is not None:  # recomputed rather than kept from the forward
    biases, biases_vjp = jax.vjp(
        lambda q_, t: _relative_biases(q_, *t, relative_method, layout), q, tables)
  dqp, dkp, dvp, bias_grads = _backward_calls(
      layout.pad_queries(q, layout.key_depth), layout.pad_keys(k, layout.key_depth),
      layout.pad_keys(v, layout.value_depth), layout.pad_queries(d_out, layout.value_depth),
      lse, delta, biases, layout, interpret)
  dq = layout.unpad_queries(dqp, q.shape[-1])
  d_tables = None
  if tables is not None:
    dq_relative, d_tables = biases_vjp(tuple(g.astype(jnp.float32) for g in bias_grads))
    dq = (dq.astype(jnp.float32) + dq_relative.astype(jnp.float32)).astype(q.dtype)
  return (dq, layout.unpad_keys(dkp, k.shape[-1]), layout.unpad_keys(dvp, v.shape[-1]),
          d_tables)


_fused.defvjp(_fused_forward, _fused_bwd)


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
  """Fused drop-in for :func:`aa_flax.attention.multihead_attention_2d`.

  Same arguments, shapes and results (softmax in float32, matmuls in the input dtype with
  float32 accumulation; q already scaled by ``d_k^h ** -0.5``).

  Args:
    q: ``[B, N, H, W, d_k]``; k: ``[B, N, H, W, d_k]``; v: ``[B, N, H, W, d_v]``.
    rel_h, rel_w: ``[2H - 1, d_k]`` and ``[2W - 1, d_k]``, or both None (plain attention).
    relative_method: how XLA forms ``A_h``/``A_w`` (``"gather"`` or ``"skew"``).
    interpret: ``None`` picks compiled Triton on GPU and Pallas interpret mode on CPU (see
      :func:`resolve_interpret`); True/False force it.

  Returns:
    ``out`` ``[B, N, H, W, d_v]`` in v's dtype.
  """
  attention.check_inputs(q, k, v, rel_h, rel_w, relative_method)
  tables = None if rel_h is None else (rel_h, rel_w)
  interpret = resolve_interpret(interpret)

  def fused(q, k, v, tables):
    return _fused(q, k, v, tables, relative_method, interpret)

  return per_batch_shard(fused, (q, k, v), (tables,))
