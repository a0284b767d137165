"""Variables moved to another input size: table resampling, every model family, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax import resolution
from aa_flax.errors import VariableMismatchError
from aa_flax.layers import AAConv
from aa_flax.models import create_model, list_models, model_spec
from aa_flax.models.block_attention import GatherExcite


pytestmark = pytest.mark.usefixtures("fast_compiles")


def naive_resample(table, length, method):
  """Row by row: new offset r' reads old offset r' (extend) or r' * L / L' (interpolate)."""
  old = (table.shape[0] + 1) // 2
  rows = []
  for offset in range(-(length - 1), length):
    source = offset * old / length if method == "interpolate" else offset
    source = min(max(source, -(old - 1)), old - 1) + old - 1
    low = int(np.floor(source))
    high = min(low + 1, 2 * old - 2)
    rows.append(table[low] * (1 - (source - low)) + table[high] * (source - low))
  return np.stack(rows)


@pytest.mark.parametrize("method", resolution.RESAMPLE_METHODS)
@pytest.mark.parametrize("old,new", [(4, 7), (7, 4), (5, 10), (3, 1), (1, 4), (6, 5)])
def test_resample_table_matches_naive_reference(method, old, new):
  table = np.random.default_rng(old * 10 + new).normal(size=(2 * old - 1, 3)).astype(np.float32)
  resampled = resolution.resample_table(jnp.asarray(table), new, method)
  assert resampled.shape == (2 * new - 1, 3) and resampled.dtype == jnp.float32
  np.testing.assert_allclose(resampled, naive_resample(table, new, method), atol=1e-6)


def test_resample_table_keeps_old_offsets_and_dtype():
  table = jnp.asarray(np.random.default_rng(0).normal(size=(9, 4)), jnp.bfloat16)  # L = 5
  assert resolution.resample_table(table, 5, "interpolate") is table
  extended = resolution.resample_table(table, 8, "extend")  # offsets -7..7
  assert extended.dtype == jnp.bfloat16
  np.testing.assert_array_equal(extended[3:12], table)  # offsets -4..4 unchanged
  np.testing.assert_array_equal(extended[:3], jnp.broadcast_to(table[0], (3, 4)))
  np.testing.assert_array_equal(extended[12:], jnp.broadcast_to(table[-1], (3, 4)))
  # Doubling the length: offset 2r reads old offset r exactly.
  doubled = resolution.resample_table(table.astype(jnp.float32), 10, "interpolate")
  np.testing.assert_array_equal(doubled[1::2], table.astype(jnp.float32))
  # Grow then shrink back is the identity for both methods.
  for method in resolution.RESAMPLE_METHODS:
    back = resolution.resample_table(resolution.resample_table(
        table.astype(jnp.float32), 10, method), 5, method)
    np.testing.assert_array_equal(back, table.astype(jnp.float32))


def _families():
  """One registered model per model class, set of registered settings and block attention."""
  chosen = {}
  for name in sorted(list_models(), key=lambda n: (len(n), n)):
    cls, kwargs = model_spec(name)
    family = (cls.__name__, frozenset(k for k, v in kwargs.items() if v is not None),
              kwargs.get("block_attention"))
    chosen.setdefault(family, name)
  return sorted(chosen.values())


@pytest.mark.parametrize("name", _families())
def test_every_family_converts_to_a_non_square_size(name):
  """64x64 -> 80x40 (taller, narrower): the result has the shapes the model has at 80x40,
  and only size-dependent variables (relative tables, GE-θ gather kernels) changed."""
  model = create_model(name, num_classes=10)
  source, _ = resolution.abstract_variables(model, (1, 64, 64, 3))
  target, _ = resolution.abstract_variables(model, (2, 80, 40, 3))
  converted = jax.eval_shape(
      lambda v: resolution.convert_variables(model, v, (2, 80, 40, 3)), source)
  assert jax.tree.map(lambda a: a.shape, converted) == jax.tree.map(lambda a: a.shape, target)
  changed = {path for (path, old), (_, new) in zip(resolution.leaves_by_path(source),
                                                   resolution.leaves_by_path(converted))
             if old.shape != new.shape}
  tables = set(resolution.table_lengths(source))
  relative = getattr(model, "attention", None) is not None and \
      model.attention.position_encoding == "relative"
  gathers = {p for p in changed if p.endswith("/kernel") and "/ge_theta" in p}
  assert changed <= tables | gathers  # (some MnasNet maps are 2 wide at both sizes)
  assert bool(tables) == bool(changed & tables) == relative
  assert bool(gathers) == (getattr(model, "block_attention", None) in ("ge_theta",
                                                                       "ge_theta_plus"))


def test_pooled_and_strided_table_lengths():
  """AA-ResNet-50 at 80x40: the pooled stage-2 layer sees 5x3 (stem /4, stride 2, pool 3x3/2),
  stage 3 sees 5x3, stage 4 3x2."""
  model = create_model("aa_resnet50", num_classes=10)
  lengths = resolution.table_lengths(resolution.abstract_variables(model, (1, 80, 40, 3))[0])
  assert lengths["params/stage2_block1/conv2/rel_height"] == 5
  assert lengths["params/stage2_block1/conv2/rel_width"] == 3
  assert lengths["params/stage3_block2/conv2/rel_width"] == 3
  assert lengths["params/stage4_block3/conv2/rel_height"] == 3
  assert lengths["params/stage4_block3/conv2/rel_width"] == 2


def test_gather_kernel_is_resized_with_its_total_weight():
  """GE-θ: a kernel constant over positions stays constant with the same sum per channel, so
  the module gates a constant map as before; a random kernel is resized bilinearly."""
  module = GatherExcite(variant="theta")
  x = jnp.ones((2, 6, 4, 3))
  variables = module.init(jax.random.key(0), x, train=False)
  constant = {**variables, "params": {**variables["params"], "kernel": jnp.broadcast_to(
      jnp.asarray([0.05, -0.1, 0.2]), (6, 4, 3))}}
  for shape in [(2, 9, 5, 3), (2, 3, 2, 3)]:
    converted = resolution.convert_variables(module, constant, shape, train=False)
    np.testing.assert_allclose(converted["params"]["kernel"].sum((0, 1)), [1.2, -2.4, 4.8],
                               rtol=1e-6)
    np.testing.assert_allclose(module.apply(converted, jnp.ones(shape), train=False)[:, 0, 0],
                               module.apply(constant, x, train=False)[:, 0, 0], rtol=1e-5)
    kernel = resolution.convert_variables(module, variables, shape, train=False)["params"]
    expected = jax.image.resize(variables["params"]["kernel"], shape[1:], "linear") * (
        24 / (shape[1] * shape[2]))
    np.testing.assert_allclose(kernel["kernel"], expected, rtol=1e-6)
  same = resolution.convert_variables(module, variables, x.shape, train=False)
  assert same["params"]["kernel"] is variables["params"]["kernel"]


@pytest.fixture(scope="module")
def tiny():
  model = create_model("aa_resnet_tiny", num_classes=10)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 12, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  return model, variables, images


def test_unchanged_size_is_the_identity(tiny):
  model, variables, _ = tiny
  for method in resolution.RESAMPLE_METHODS:
    converted = resolution.convert_variables(model, variables, (5, 16, 12, 3), method=method)
    assert jax.tree.structure(converted) == jax.tree.structure(variables)
    assert all(a is b for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(variables)))


@pytest.mark.parametrize("method,shape", [("interpolate", (2, 24, 20, 3)),
                                          ("extend", (2, 8, 8, 3))])
def test_converted_model_runs_larger_and_smaller(tiny, method, shape):
  model, variables, _ = tiny
  converted = resolution.convert_variables(model, variables, shape, method=method)
  images = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  logits = jax.jit(model.apply)(converted, images)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
  old_lengths = resolution.table_lengths(variables)
  new_lengths = resolution.table_lengths(converted)
  assert all(new_lengths[path] != length for path, length in old_lengths.items())
  # Only the tables changed; batch statistics and every other parameter are the same arrays.
  converted_leaves = dict(resolution.leaves_by_path(converted))
  for path, leaf in resolution.leaves_by_path(variables):
    assert (converted_leaves[path] is leaf) == (path not in old_lengths)
  # Without conversion the model refuses and names the converter.
  with pytest.raises(ValueError, match="aa_flax.resolution.convert_variables"):
    model.apply(variables, jnp.zeros((1, 24, 20, 3)))


def _weights_fn(layer):
  """Jitted ``(variables, x) -> attention weights [B, N, HW, HW]`` (float64 numpy)."""
  apply = jax.jit(lambda v, x: layer.apply(v, x, mutable=["intermediates"])[1])
  return lambda v, x: np.asarray(apply(v, x)["intermediates"]["attention_weights"][0],
                                 np.float64)


def _restricted(weights, positions):
  """Weights among ``positions`` only, renormalised over the keys: softmax over a subset."""
  sub = weights[:, :, positions][:, :, :, positions]
  return sub / sub.sum(-1, keepdims=True)


@pytest.mark.parametrize("strides", [1, 2])
def test_extend_keeps_what_attention_sees_wherever_the_content_moves(strides):
  """Old-size content pasted into a larger canvas at several shifts, away from the borders:
  with "extend" the attention among the pasted positions (renormalised, which removes the
  canvas's share of the softmax) equals the old model's at the old size, at every shift."""
  rng = np.random.default_rng(0)
  layer = AAConv(features=8, key_ratio=1.0, value_ratio=1.0, num_heads=2,
                 min_key_depth_per_head=0, strides=strides)
  old = rng.normal(size=(2, 6 * strides, 5 * strides, 5)).astype(np.float32)
  variables = layer.init(jax.random.key(0), jnp.asarray(old))
  variables = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), variables)
  weights = _weights_fn(layer)
  expected = weights(variables, jnp.asarray(old))
  big = (2, 11 * strides, 9 * strides, 5)
  converted = resolution.convert_variables(layer, variables, big, method="extend")
  reinitialised = jax.tree.map(lambda p: p, converted)
  reinitialised["params"]["rel_width"] = jnp.asarray(
      rng.normal(size=converted["params"]["rel_width"].shape), jnp.float32)
  for top, left in [(1, 2), (3, 1), (5, 4)]:
    canvas = rng.normal(size=big).astype(np.float32)
    canvas[:, top * strides:(top + 6) * strides, left * strides:(left + 5) * strides] = old
    positions = [(top + y) * 9 + left + x for y in range(6) for x in range(5)]
    got = _restricted(weights(converted, jnp.asarray(canvas)), positions)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    other = _restricted(weights(reinitialised, jnp.asarray(canvas)), positions)
    assert np.abs(other - expected).max() > 1e-2


def test_interpolate_keeps_what_attention_sees_when_the_image_is_upscaled():
  """Content upscaled 2x (nearest): with "interpolate" the attention among the even positions
  (one per 2x2 block, renormalised) equals the old model's on the original content."""
  rng = np.random.default_rng(1)
  layer = AAConv(features=8, key_ratio=1.0, value_ratio=1.0, num_heads=2,
                 min_key_depth_per_head=0)
  old = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
  variables = layer.init(jax.random.key(0), jnp.asarray(old))
  variables = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), variables)
  weights = _weights_fn(layer)
  expected = weights(variables, jnp.asarray(old))
  upscaled = jnp.asarray(old.repeat(2, axis=1).repeat(2, axis=2))
  positions = [2 * y * 12 + 2 * x for y in range(4) for x in range(6)]
  results = {}
  for method in resolution.RESAMPLE_METHODS:
    converted = resolution.convert_variables(layer, variables, upscaled.shape, method=method)
    results[method] = _restricted(weights(converted, upscaled), positions)
  np.testing.assert_allclose(results["interpolate"], expected, atol=1e-5)
  assert np.abs(results["extend"] - expected).max() > 1e-2


def test_variables_of_another_model_are_refused(tiny):
  _, variables, _ = tiny
  with pytest.raises(VariableMismatchError, match=r"another model.*head/kernel has shape "
                     r"\(64, 10\), the model needs \(32, 10\).* and 51 more"):
    resolution.convert_variables(create_model("aa_resnet_tiny", 10, width=8), variables,
                                 (1, 24, 24, 3))
  with pytest.raises(VariableMismatchError, match="missing params/stage2_block1/conv1/kernel"):
    resolution.convert_variables(create_model("resnet_tiny", 10), variables, (1, 24, 24, 3))
  with pytest.raises(VariableMismatchError, match=r"qkv/kernel has shape"):
    resolution.convert_variables(create_model("aa_resnet_tiny", 10, num_heads=8), variables,
                                 (1, 48, 48, 3))
  with pytest.raises(VariableMismatchError, match="input channels.*stem_conv/kernel"):
    resolution.convert_variables(create_model("aa_resnet_tiny", 10), variables, (1, 24, 24, 1))
  # A table of another depth is another model's table, whatever its length.
  layer = AAConv(features=8, num_heads=2, min_key_depth_per_head=2)
  layer_variables = layer.init(jax.random.key(0), jnp.zeros((1, 6, 5, 4)))
  layer_variables["params"]["rel_width"] = jnp.zeros((9, 3))
  with pytest.raises(VariableMismatchError, match=r"rel_width has shape \(9, 3\).*\(15, 2\)"):
    resolution.convert_variables(layer, layer_variables, (1, 6, 8, 4))


def test_bad_requests_are_refused(tiny):
  model, variables, _ = tiny
  for shape in [(1, 0, 24, 3), (1, -8, 24, 3), (1, 24.0, 24, 3), ()]:
    with pytest.raises(ValueError, match="input_shape must be positive ints"):
      resolution.convert_variables(model, variables, shape)
  with pytest.raises(ValueError, match=r"method 'bilinear' is not one of \('interpolate'"):
    resolution.convert_variables(model, variables, (1, 24, 24, 3), method="bilinear")
  with pytest.raises(ValueError, match="cannot run on inputs of shape"):
    resolution.convert_variables(model, variables, (24, 24, 3))
  with pytest.raises(ValueError, match=r"shape \[2L-1, d\]"):
    resolution.resample_table(jnp.zeros((4, 2)), 3)
