"""AAConv: naive reference, layout, shapes, gradients, precision, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax.layers import AAConv, SqueezeExcite, attention_depths
from naive_reference import naive_aaconv


pytestmark = pytest.mark.usefixtures("fast_compiles")


@functools.cache
def jitted(layer, method="apply", **kwargs):
  """``layer.init`` or ``layer.apply`` jitted once per (layer, method, kwargs)."""
  return jax.jit(functools.partial(getattr(layer, method), **kwargs))


def init_apply(layer, x, seed=0):
  variables = jitted(layer, "init")(jax.random.key(seed), x)
  return variables, jitted(layer)(variables, x)


def abstract_init_apply(layer, x):
  """(variables, output) as shapes and dtypes: traced, neither compiled nor computed."""
  y, variables = jax.eval_shape(lambda x: layer.init_with_output(jax.random.key(0), x), x)
  return variables, y


def random_images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_aaconv_matches_naive_reference_and_channel_layout():
  x = random_images((2, 3, 5, 6))
  layer = AAConv(features=16, key_depth=8, value_depth=4, num_heads=2,
                 min_key_depth_per_head=0)
  variables, y = init_apply(layer, x)
  params = variables["params"]
  # Random (non-zero) relative tables and biases, so every term is exercised.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype), params)
  y = jitted(layer)({"params": params}, x)
  ref = naive_aaconv(np.asarray(x), params, key_depth=8, value_depth=4, num_heads=2)
  assert y.shape == (2, 3, 5, 16)
  np.testing.assert_allclose(y, ref, atol=2e-4, rtol=2e-4)
  # Conv branch first (12 channels), attention last (4 channels).
  conv_only = np.asarray(jax.lax.conv_general_dilated(
      x, params["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  np.testing.assert_allclose(y[..., :12], conv_only, atol=1e-4)


def test_fully_attentional_layer_has_no_conv_branch_and_matches_reference():
  x = random_images((2, 4, 3, 5), seed=2)
  layer = AAConv(features=8, key_ratio=1.0, value_ratio=1.0, num_heads=4,
                 min_key_depth_per_head=0)
  variables, y = init_apply(layer, x)
  assert "conv" not in variables["params"]
  ref = naive_aaconv(np.asarray(x), variables["params"], key_depth=8, value_depth=8,
                     num_heads=4)
  np.testing.assert_allclose(y, ref, atol=2e-4, rtol=2e-4)


def test_no_position_encoding_is_permutation_equivariant():
  """Without positions, permuting pixels permutes the output (softmax axis, reshapes)."""
  x = random_images((2, 3, 4, 6), seed=3)
  layer = AAConv(features=8, kernel_size=1, key_ratio=1.0, value_ratio=1.0, num_heads=2,
                 min_key_depth_per_head=0, position_encoding="none")
  variables, y = init_apply(layer, x)
  perm = np.random.default_rng(0).permutation(12)
  permute = lambda t: t.reshape(2, 12, -1)[:, perm].reshape(t.shape[:3] + (-1,))
  np.testing.assert_allclose(jitted(layer)(variables, permute(x)), permute(y), atol=1e-5)
  # With relative logits the same permutation changes the result.
  rel = AAConv(features=8, kernel_size=1, key_ratio=1.0, value_ratio=1.0, num_heads=2,
               min_key_depth_per_head=0)
  rel_vars, rel_y = init_apply(rel, x)
  assert not np.allclose(jitted(rel)(rel_vars, permute(x)), permute(rel_y), atol=1e-3)


@pytest.mark.parametrize("kwargs,out_hw,table_hw", [
    (dict(), (6, 10), (6, 10)),
    (dict(strides=2), (3, 5), (3, 5)),
    (dict(strides=2, kernel_size=1), (3, 5), (3, 5)),
    (dict(attention_pool=2), (6, 10), (3, 5)),
    (dict(strides=2, attention_pool=2), (3, 5), (2, 3)),
    (dict(key_ratio=1.0, value_ratio=1.0), (6, 10), (6, 10)),
    (dict(key_ratio=1.0, value_ratio=1.0, strides=2, attention_pool=2), (3, 5), (2, 3)),
])
def test_output_and_table_shapes(kwargs, out_hw, table_hw):
  x = random_images((2, 6, 10, 12))
  layer = AAConv(features=32, num_heads=4, min_key_depth_per_head=4, **kwargs)
  variables, y = abstract_init_apply(layer, x)
  assert y.shape == (2, *out_hw, 32)
  depth = layer.depths.key_per_head
  assert variables["params"]["rel_height"].shape == (2 * table_hw[0] - 1, depth)
  assert variables["params"]["rel_width"].shape == (2 * table_hw[1] - 1, depth)


@pytest.mark.parametrize("encoding", ["none", "sine", "coordconv", "relative"])
def test_position_encodings_run_and_only_relative_has_tables(encoding):
  x = random_images((2, 5, 7, 8))
  layer = AAConv(features=16, num_heads=2, min_key_depth_per_head=4,
                 position_encoding=encoding)
  variables, y = init_apply(layer, x)
  assert y.shape == (2, 5, 7, 16) and np.all(np.isfinite(y))
  assert ("rel_height" in variables["params"]) == (encoding == "relative")
  expected_in = 8 + 3 if encoding == "coordconv" else 8
  assert variables["params"]["qkv"]["kernel"].shape[2] == expected_in


def test_attention_weights_are_sown():
  x = random_images((2, 3, 5, 8))
  layer = AAConv(features=16, num_heads=2, min_key_depth_per_head=4)
  variables = jitted(layer, "init")(jax.random.key(0), x)
  _, state = jitted(layer, mutable=("intermediates",))(variables, x)
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, 2, 15, 15) and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(strides=2, attention_pool=2),
                                    dict(relative_method="skew"), dict(remat=True)])
def test_gradients_reach_every_parameter(kwargs):
  x = random_images((2, 6, 7, 8))
  layer = AAConv(features=16, num_heads=2, min_key_depth_per_head=4, **kwargs)
  params = jitted(layer, "init")(jax.random.key(0), x)["params"]
  target = random_images((2, 3, 4, 16) if kwargs.get("strides") else (2, 6, 7, 16), seed=5)
  grads = jax.jit(jax.grad(lambda p: jnp.sum((layer.apply({"params": p}, x) - target) ** 2)))(
      params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.abs(np.asarray(g)).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def test_bfloat16_forward_close_to_float32():
  x = random_images((2, 6, 7, 16))
  f32 = AAConv(features=32, num_heads=4, min_key_depth_per_head=4)
  bf16 = AAConv(features=32, num_heads=4, min_key_depth_per_head=4, dtype=jnp.bfloat16)
  variables, y32 = init_apply(f32, x)
  y16 = jitted(bf16)(variables, x)
  assert y16.dtype == jnp.bfloat16
  assert jax.tree.leaves(abstract_init_apply(bf16, x)[0])[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.08, rtol=0.05)


def test_depth_rounding_rules():
  # ResNet-50 stage widths with κ=0.2, υ=0.1, N_h=8: d_k hits the 20-per-head floor,
  # d_v rounds to the nearest multiple of 8.
  assert [(d.key, d.value) for d in (attention_depths(f, 0.2, 0.1, 8) for f in (128, 256, 512))
          ] == [(160, 16), (160, 24), (160, 48)]
  assert attention_depths(512, 0.5, 0.5, 8) == attention_depths(512, 0.5, 0.5, 8, 20, 256, 256)
  no_floor = attention_depths(240, 0.1, 0.05, 4, min_key_depth_per_head=0)
  assert (no_floor.key, no_floor.value) == (24, 12)
  assert attention_depths(10, 0.01, 0.01, 4, 0).key == 4  # at least one per head
  full = attention_depths(64, 1.0, 1.0, 8, min_key_depth_per_head=0)
  assert (full.key, full.value, full.key_per_head, full.value_per_head) == (64, 64, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_ratio=0.0), "key_ratio"),
    (dict(key_ratio=-1.0), "key_ratio"),
    (dict(value_ratio=0.0), "value_ratio"),
    (dict(value_ratio=1.5), "value_ratio"),
    (dict(num_heads=0), "num_heads"),
    (dict(key_depth=30), "multiple of num_heads=8"),
    (dict(value_depth=12), "multiple of num_heads=8"),
    (dict(value_depth=64), "exceeds features"),
    (dict(features=0), "features"),
    (dict(strides=0), "strides"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(position_encoding="learned"), "position_encoding"),
    (dict(attention_pool=0), "attention_pool"),
    (dict(relative_method="tile"), "relative_method"),
    (dict(attention_impl="cuda"), "attention_impl"),
])
def test_invalid_settings_raise_value_error(kwargs, match):
  settings = dict(features=32, num_heads=8, min_key_depth_per_head=2)
  settings.update(kwargs)
  with pytest.raises(ValueError, match=match):
    AAConv(**settings).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


def test_wrong_spatial_size_for_tables_is_a_clear_error():
  layer = AAConv(features=16, num_heads=2, min_key_depth_per_head=4)
  variables = abstract_init_apply(layer, jnp.zeros((1, 6, 8, 8)))[0]
  with pytest.raises(ValueError, match=r"table of shape \(9, 4\).*hold \(15, 4\)"):
    jax.eval_shape(layer.apply, variables, jnp.zeros((1, 6, 5, 8)))
  with pytest.raises(ValueError, match="B, H, W, C"):
    jax.eval_shape(layer.apply, variables, jnp.zeros((6, 8, 8)))


def test_squeeze_excite_gates_channels():
  x = random_images((2, 3, 4, 16))
  se = SqueezeExcite(hidden_features=4)
  variables, y = init_apply(se, x)
  gate = np.asarray(y) / np.asarray(x)
  assert y.shape == x.shape
  np.testing.assert_allclose(gate, gate[:, :1, :1, :] * np.ones_like(gate), rtol=1e-4)
  assert np.all((gate > 0) & (gate < 1))
