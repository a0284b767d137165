"""The fused Pallas relative-attention kernel (interpret mode on CPU) against the XLA path."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax import attention, kernels
from aa_flax.kernels import augmented_attention, relative_attention


def random_inputs(seed, batch=2, heads=2, height=3, width=5, key_depth=4, value_depth=3,
                  dtype=np.float32):
  rng = np.random.default_rng(seed)
  shape = (batch, heads, height, width)
  arrays = (rng.normal(size=shape + (key_depth,)), rng.normal(size=shape + (key_depth,)),
            rng.normal(size=shape + (value_depth,)),
            rng.normal(size=(2 * height - 1, key_depth)),
            rng.normal(size=(2 * width - 1, key_depth)))
  return tuple(jnp.asarray(a, dtype) for a in arrays)


def weighted_sum(fn, relative=True):
  """Scalar loss whose cotangent differs per output element (catches transposed grads)."""
  def loss(q, k, v, rel_h=None, rel_w=None):
    out = fn(q, k, v, rel_h, rel_w) if relative else fn(q, k, v)
    weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out.astype(jnp.float32) * weights)
  return loss


# (H, W): H != W; W = 17 pads the row tile to 32 (not a multiple of the tile); W = 1 is the
# degenerate single-column map (H > W). Each case compiles three interpreted kernels, so the
# list is kept short.
SHAPES = [(3, 5), (2, 17), (3, 1)]


@pytest.mark.parametrize("height,width", SHAPES)
def test_forward_and_gradients_match_xla(height, width):
  args = random_inputs(height * 10 + width, height=height, width=width)
  np.testing.assert_allclose(relative_attention.multihead_attention_2d(*args),
                             attention.multihead_attention_2d(*args), atol=2e-5, rtol=2e-5)
  argnums = (0, 1, 2, 3, 4)
  got = jax.grad(weighted_sum(relative_attention.multihead_attention_2d), argnums)(*args)
  want = jax.grad(weighted_sum(attention.multihead_attention_2d), argnums)(*args)
  for name, g, w in zip(("q", "k", "v", "rel_h", "rel_w"), got, want):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)


def test_plain_attention_without_tables():
  q, k, v, _, _ = random_inputs(7, height=4, width=3, key_depth=20, value_depth=18)
  np.testing.assert_allclose(relative_attention.multihead_attention_2d(q, k, v),
                             attention.multihead_attention_2d(q, k, v), atol=2e-5)
  got = jax.grad(weighted_sum(relative_attention.multihead_attention_2d, False), (0, 1, 2))(
      q, k, v)
  want = jax.grad(weighted_sum(attention.multihead_attention_2d, False), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_bfloat16_forward_and_gradients_within_bf16_rounding():
  args = random_inputs(3, height=3, width=4, dtype=jnp.bfloat16)
  got = relative_attention.multihead_attention_2d(*args)
  assert got.dtype == jnp.bfloat16
  want = attention.multihead_attention_2d(*args)
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=3e-2)
  # Gradients against the float32 truth, relative to each gradient's largest entry.
  truth = jax.grad(weighted_sum(attention.multihead_attention_2d), (0, 1, 2, 3, 4))(
      *(a.astype(jnp.float32) for a in args))
  grads = jax.grad(weighted_sum(relative_attention.multihead_attention_2d), (0, 1, 2, 3, 4))(
      *args)
  for name, g, t in zip(("q", "k", "v", "rel_h", "rel_w"), grads, truth):
    assert g.dtype == jnp.bfloat16, name
    error = np.max(np.abs(np.asarray(g, np.float32) - t)) / np.max(np.abs(t))
    assert error < 2e-2, (name, error)


def test_return_weights_and_jit():
  args = random_inputs(4, height=2, width=3)
  fused = jax.jit(lambda *a: relative_attention.multihead_attention_2d(
      *a, relative_method="skew", return_weights=True))
  out, weights = fused(*args)
  want_out, want_weights = attention.multihead_attention_2d(*args, return_weights=True)
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  np.testing.assert_allclose(weights, want_weights, atol=1e-6)


def test_gradient_never_materialises_quadratic_arrays():
  """No array in the differentiated program is as large as the [B, N, HW, HW] logits."""
  batch, heads, height, width = 1, 2, 16, 16
  args = random_inputs(5, batch=batch, heads=heads, height=height, width=width)
  quadratic = batch * heads * (height * width) ** 2
  loss = weighted_sum(relative_attention.multihead_attention_2d)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2, 3, 4)))(*args).jaxpr

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
      if eqn.primitive.name == "pallas_call":  # its body works on [Wp, Wp] tiles
        continue
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
            yield from sizes(getattr(sub, "jaxpr", sub))

  assert max(sizes(jaxpr)) <= quadratic / 8
  # The XLA path does hold them, so the check can see them.
  xla_jaxpr = jax.make_jaxpr(jax.value_and_grad(
      weighted_sum(attention.multihead_attention_2d), (0, 1, 2, 3, 4)))(*args).jaxpr
  assert max(sizes(xla_jaxpr)) >= quadratic


def test_attention_fn_dispatch():
  assert kernels.attention_fn("xla") is attention.multihead_attention_2d
  assert kernels.attention_fn("pallas") is relative_attention.multihead_attention_2d
  assert kernels.attention_fn("cudnn") is augmented_attention.multihead_attention_2d
  args = random_inputs(6, height=2, width=3)
  xla, fused = kernels.attention_fn("xla", True), kernels.attention_fn("pallas", True)
  np.testing.assert_allclose(fused(*args), xla(*args), atol=2e-5)
  got = jax.grad(weighted_sum(fused), (0, 4))(*args)
  want = jax.grad(weighted_sum(xla), (0, 4))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="'triton' is not one of"):
    kernels.attention_fn("triton")


def test_clear_errors(monkeypatch):
  q, k, v, rel_h, rel_w = random_inputs(8, height=3, width=5)
  fused = relative_attention.multihead_attention_2d
  with pytest.raises(ValueError, match="'diagonal' is not one of"):
    fused(q, k, v, rel_h, rel_w, relative_method="diagonal")
  with pytest.raises(ValueError, match="both rel_h and rel_w"):
    fused(q, k, v, rel_h, None)
  with pytest.raises(ValueError, match=r"rel_h \(5, 4\) and rel_w \(9, 4\)"):
    fused(q, k, v, rel_w, rel_h)
  with pytest.raises(ValueError, match="q, k, v must be"):
    fused(q, k[:, :, :2], v, rel_h, rel_w)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(NotImplementedError, match="attention_impl='xla'"):
    relative_attention.resolve_interpret(None)
  assert relative_attention.resolve_interpret(True) is True


@pytest.mark.parametrize("dtype,height,width", [(jnp.bfloat16, 7, 7), (jnp.float32, 5, 17)])
def test_lowers_to_triton_for_gpu(dtype, height, width):
  """Cross-lowering for CUDA (no GPU needed) runs the Pallas Triton lowering of all kernels."""
  args = random_inputs(9, batch=1, height=height, width=width, key_depth=20, value_depth=3,
                       dtype=dtype)
  fused = lambda *a: relative_attention.multihead_attention_2d(*a, interpret=False)  # noqa: E731
  train = jax.jit(jax.grad(weighted_sum(fused), (0, 1, 2, 3, 4)))
  hlo = train.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("forward", "dq", "dkdv"):
    assert f'name = "relative_attention_2d_{name}"' in hlo


def test_augmented_depth_attention_matches_xla(height=3, width=5):
  """q'·k' over [q, A_w, A_h] / [k, e_x2, e_y2] reproduces content + relative logits."""
  args = random_inputs(10 + height, height=height, width=width)
  def aug(*a):
    return augmented_attention.multihead_attention_2d(*a, implementation="xla")
  np.testing.assert_allclose(aug(*args), attention.multihead_attention_2d(*args), atol=2e-5)
  got = jax.grad(weighted_sum(aug), (0, 1, 2, 3, 4))(*args)
  want = jax.grad(weighted_sum(attention.multihead_attention_2d), (0, 1, 2, 3, 4))(*args)
  for name, g, w in zip(("q", "k", "v", "rel_h", "rel_w"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)
  q_aug, k_aug = augmented_attention.augment(*args[:2], *args[3:])
  assert q_aug.shape == k_aug.shape == args[0].shape[:4] + (4 + width + height,)


def test_augmented_falls_back_to_xla_where_cudnn_cannot_run():
  args = random_inputs(11, height=2, width=3)
  assert not augmented_attention.cudnn_applies(jnp.float32, 30)  # CPU here
  np.testing.assert_array_equal(kernels.attention_fn("cudnn")(*args),
                                attention.multihead_attention_2d(*args))
  with pytest.raises(ValueError, match="'flash' is not one of"):
    augmented_attention.multihead_attention_2d(*args, implementation="flash")


def test_aaconv_with_pallas_matches_xla():
  """The ``attention_impl`` hook of AAConv: same outputs and parameter gradients."""
  from aa_flax.layers import AAConv  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
  settings = dict(features=16, key_ratio=0.5, value_ratio=0.5, num_heads=2,
                  min_key_depth_per_head=4)
  xla = AAConv(**settings, attention_impl="xla")
  fused = AAConv(**settings, attention_impl="pallas")
  params = xla.init(jax.random.key(1), x)["params"]

  def loss(layer):
    return lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))

  want_loss, want = jax.value_and_grad(loss(xla))(params)
  got_loss, got = jax.value_and_grad(loss(fused))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
