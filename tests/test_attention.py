"""Relative logits and 2D multi-head attention against brute-force references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax import attention
from naive_reference import brute_force_relative_logits, naive_attention


pytestmark = pytest.mark.usefixtures("fast_compiles")


relative_logits_2d = jax.jit(attention.relative_logits_2d, static_argnums=3)
multihead_attention_2d = jax.jit(attention.multihead_attention_2d,
                                 static_argnames=("relative_method", "return_weights"))

def random_inputs(seed, batch=2, heads=3, height=4, width=7, key_depth=5, value_depth=6):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, heads, height, width, key_depth)).astype(np.float32)
  k = rng.normal(size=(batch, heads, height, width, key_depth)).astype(np.float32)
  v = rng.normal(size=(batch, heads, height, width, value_depth)).astype(np.float32)
  rel_h = rng.normal(size=(2 * height - 1, key_depth)).astype(np.float32)
  rel_w = rng.normal(size=(2 * width - 1, key_depth)).astype(np.float32)
  return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("method", attention.RELATIVE_METHODS)
@pytest.mark.parametrize("height,width", [(4, 7), (6, 3), (1, 5), (5, 1), (3, 3)])
def test_relative_logits_match_brute_force(method, height, width):
  q, _, _, rel_h, rel_w = random_inputs(0, height=height, width=width)
  got = relative_logits_2d(q, rel_h, rel_w, method)
  assert got.shape == (2, 3, height * width, height * width)
  np.testing.assert_allclose(got, brute_force_relative_logits(q, rel_h, rel_w), atol=1e-4)


def test_skew_and_gather_agree_and_offsets_are_key_minus_query():
  q, _, _, rel_h, rel_w = random_inputs(1, height=5, width=3)
  skew = relative_logits_2d(q, rel_h, rel_w, "skew")
  gather = relative_logits_2d(q, rel_h, rel_w, "gather")
  np.testing.assert_allclose(skew, gather, atol=1e-5)
  # A table that is zero except at offset +1 along x: only key x2 = x + 1 gets a logit.
  rel_w = np.zeros_like(rel_w)
  rel_w[3 - 1 + 1] = 1.0
  logits = np.asarray(relative_logits_2d(q, np.zeros_like(rel_h), rel_w, "gather"))
  qsum = q.sum(-1)
  query, key = 1 * 3 + 0, 2 * 3 + 1  # (y=1, x=0) -> (y2=2, x2=1)
  np.testing.assert_allclose(logits[:, :, query, key], qsum[:, :, 1, 0], rtol=1e-5)
  assert np.all(logits[:, :, query, 2 * 3 + 0] == 0)


def test_rel_to_abs_definition():
  x = np.random.default_rng(2).normal(size=(2, 4, 7)).astype(np.float32)
  out = np.asarray(attention.rel_to_abs(x))
  for i in range(4):
    for j in range(4):
      assert out[:, i, j].tolist() == x[:, i, j - i + 3].tolist()
  with pytest.raises(ValueError, match="2L-1"):
    attention.rel_to_abs(np.zeros((4, 6)))


def test_relative_logits_reject_wrong_table_shapes():
  q, _, _, rel_h, rel_w = random_inputs(3, height=4, width=7)
  with pytest.raises(ValueError, match=r"rel_h \[2H-1, d\]"):
    attention.relative_logits_2d(q, rel_w, rel_h)
  with pytest.raises(ValueError, match="not one of"):
    attention.relative_logits_2d(q, rel_h, rel_w, "tiled")


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("method", attention.RELATIVE_METHODS)
def test_multihead_attention_matches_naive(relative, method):
  q, k, v, rel_h, rel_w = random_inputs(4)
  if not relative:
    rel_h = rel_w = None
  out, weights = multihead_attention_2d(q, k, v, rel_h, rel_w, relative_method=method,
                                        return_weights=True)
  ref_out, ref_weights = naive_attention(q, k, v, rel_h, rel_w)
  assert out.shape == (2, 3, 4, 7, 6) and weights.shape == (2, 3, 28, 28)
  assert weights.dtype == jnp.float32
  np.testing.assert_allclose(weights, ref_weights, atol=1e-5)
  np.testing.assert_allclose(out, ref_out, atol=1e-4)


def test_bfloat16_inputs_keep_float32_softmax():
  q, k, v, rel_h, rel_w = random_inputs(5)
  cast = lambda *ts: [jnp.asarray(t, jnp.bfloat16) for t in ts]
  out, weights = multihead_attention_2d(*cast(q, k, v, rel_h, rel_w), return_weights=True)
  assert out.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  ref_out, _ = naive_attention(q, k, v, rel_h, rel_w)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=0.1)


def test_sine_encoding_and_coord_channels():
  enc = np.asarray(jax.jit(attention.sine_position_encoding_2d, static_argnums=(0, 1, 2))(
      3, 5, 10))
  assert enc.shape == (3, 5, 10)
  # Channels 0..3 encode y only, 4..7 encode x only, 8..9 are zero padding.
  np.testing.assert_allclose(enc[:, 0, :4], enc[:, 4, :4])
  np.testing.assert_allclose(enc[0, :, 4:8], enc[2, :, 4:8])
  assert np.all(enc[..., 8:] == 0)
  np.testing.assert_allclose(enc[1, 2, [0, 2]], [np.sin(1.0), np.cos(1.0)], rtol=1e-6)
  coords = np.asarray(jax.jit(attention.coord_channels, static_argnums=(0, 1, 2))(2, 3, 5))
  assert coords.shape == (2, 3, 5, 3)
  np.testing.assert_allclose(coords[0, 0, :, 0], np.linspace(-1, 1, 5), atol=1e-6)
  np.testing.assert_allclose(coords[0, :, 0, 1], np.linspace(-1, 1, 3), atol=1e-6)
  np.testing.assert_allclose(coords[..., 2], np.hypot(coords[..., 0], coords[..., 1]), atol=1e-6)


def _attention_loss(relative, method):
  def loss(q, k, v, rel_h, rel_w):
    out = attention.multihead_attention_2d(q, k, v, rel_h if relative else None,
                                           rel_w if relative else None, relative_method=method)
    return jnp.sum(out ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


@pytest.mark.parametrize("method", attention.RELATIVE_METHODS)
def test_relative_attention_training_memory_close_to_plain(method):
  """Forward + backward temp memory at 28x28, batch 8, N_h=8: no (HW)²·d tensor, no copies."""
  batch, heads, size, key_depth, value_depth = 8, 8, 28, 20, 4
  shapes = [(batch, heads, size, size, key_depth)] * 2 + [
      (batch, heads, size, size, value_depth), (2 * size - 1, key_depth),
      (2 * size - 1, key_depth)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

  def temp_bytes(relative):
    compiled = _attention_loss(relative, method).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain, relative = temp_bytes(False), temp_bytes(True)
  logits_bytes = batch * heads * (size * size) ** 2 * 4
  assert plain >= logits_bytes  # sanity: the measurement sees the logits
  assert relative <= 1.3 * plain, (relative, plain)


def _big_ops(fn, shapes, dtype):
  """(primitive, out dtype) of every jaxpr equation whose output is a [B, N, HW, HW] array."""
  args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  batch, heads, height, width, _ = shapes[0]
  big = (batch, heads, height * width, height * width)
  jaxpr = jax.make_jaxpr(fn)(*args)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for out in eqn.outvars:
        if tuple(out.aval.shape) == big:
          yield eqn.primitive.name, out.aval.dtype
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          yield from walk(getattr(inner, "jaxpr", inner))

  return list(walk(jaxpr.jaxpr))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_normalised_after_the_value_product(dtype):
  """The [B, N, HW, HW] weights are never divided (the [B, N, HW, d_v] output is), and on CPU,
  whose XLA has no bf16 matmul, they are not rounded to bf16 for the value product."""
  shapes = [(2, 4, 6, 5, 8)] * 2 + [(2, 4, 6, 5, 2), (11, 8), (9, 8)]

  def loss(q, k, v, rel_h, rel_w):
    return jnp.sum(attention.multihead_attention_2d(q, k, v, rel_h, rel_w).astype(jnp.float32))

  ops = _big_ops(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), shapes, dtype)
  assert ops, "the program should hold [B, N, HW, HW] logits"
  assert not [op for op in ops if op[0] == "div"], ops
  if jax.default_backend() == "cpu":
    assert not [op for op in ops if op[1] == jnp.bfloat16], ops
