"""BAM, CBAM, GALA, gather-excite: naive references, properties, placement in the models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax.models import WideResNet, create_model
from aa_flax.models.block_attention import (BAM, BLOCK_ATTENTION_KINDS, CBAM, GALA,
                                            GatherExcite)
from abstract_models import flat_params

EPS = 1e-5  # batch_norm's epsilon: eval-mode BN at its initial statistics divides by sqrt(1+EPS)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def random(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def init(module, x):
  return jax.jit(lambda x: module.init({"params": jax.random.key(0)}, x, train=False))(x)


def apply(module, variables, x):
  return jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)


def apply_with_maps(module, variables, x, train=False):
  """(output, {sown name: array}) in eval mode, or in train mode with updated batch stats."""
  fn = jax.jit(lambda v, x: module.apply(v, x, train=train,
                                         mutable=["intermediates", "batch_stats"]))
  out, state = fn(variables, x)
  return out, {k: v[0] for k, v in state["intermediates"].items()}


def randomize(params, seed=1, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, p.dtype), params)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def dense(x, p):
  return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def conv1x1(x, p):
  return np.einsum("bhwc,cd->bhwd", x, np.asarray(p["kernel"])[0, 0]) + np.asarray(p["bias"])


def naive_conv_same(x, kernel):
  """Zero-padded stride-1 conv by explicit loops: x [B,H,W,Ci], kernel [k,k,Ci,Co]."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(x.shape[1]):
    for j in range(x.shape[2]):
      out[:, i, j] = np.einsum("bhwc,hwcd->bd", xp[:, i:i + k, j:j + k], kernel)
  return out


@pytest.mark.parametrize("kind", sorted(BLOCK_ATTENTION_KINDS))
def test_modules_keep_shape_and_train_every_parameter(kind):
  cls, kwargs = BLOCK_ATTENTION_KINDS[kind]
  module = cls(**kwargs)
  x = random((3, 9, 6, 32))
  variables = init(module, x)
  # BN scales at 1 (CBAM's spatial BN starts at 0, which would zero its conv's gradient).
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if jax.tree_util.keystr(p).endswith("['scale']") else v,
      variables.get("params", {}))
  weights = random((3, 9, 6, 32), seed=5)

  def loss(params):
    out, _ = module.apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])
    return jnp.sum(out * weights), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert (kind == "ge_theta_minus") == (not jax.tree.leaves(grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0, (kind, path)
  bf16 = jax.eval_shape(lambda v, x: cls(dtype=jnp.bfloat16, **kwargs).apply(v, x, train=False),
                        variables, x.astype(jnp.bfloat16))
  assert (bf16.shape, bf16.dtype) == (x.shape, jnp.bfloat16)


def test_bam_sums_channel_and_spatial_branches_into_a_residual_gate():
  module = BAM()
  x = random((2, 21, 19, 64))
  variables = init(module, x)
  out, maps = apply_with_maps(module, variables, x)
  channel, spatial, attention = (maps["channel_logits"], maps["spatial_logits"],
                                 maps["attention_map"])
  assert channel.shape == (2, 1, 1, 64) and spatial.shape == (2, 21, 19, 1)
  np.testing.assert_allclose(attention, sigmoid(np.asarray(channel + spatial)), atol=1e-6)
  assert attention.shape == x.shape and np.all((attention > 0) & (attention < 1))
  np.testing.assert_allclose(out, x * (1 + attention), atol=1e-6)
  # Naive channel branch: MLP on the average-pooled map, then eval-mode BN.
  p = variables["params"]
  hidden = np.maximum(dense(np.asarray(x).mean(axis=(1, 2)), p["channel_reduce"]), 0)
  np.testing.assert_allclose(channel[:, 0, 0], dense(hidden, p["channel_expand"])
                             / np.sqrt(1 + EPS), atol=1e-5)
  assert p["channel_reduce"]["kernel"].shape == (64, 4)  # reduction 16


def test_bam_spatial_branch_sees_through_two_dilation_4_convs():
  """One perturbed pixel moves the spatial logits only at offsets in {-8,-4,0,4,8}^2."""
  module = BAM()
  x = random((1, 21, 19, 32))
  variables = init(module, x)
  _, before = apply_with_maps(module, variables, x)
  _, after = apply_with_maps(module, variables, x.at[0, 10, 9].add(3.0))
  changed = np.argwhere(np.abs(np.asarray(after["spatial_logits"] - before["spatial_logits"])
                                 [0, :, :, 0]) > 1e-6)
  offsets = changed - np.array([10, 9])
  assert len(changed) > 1 and np.all(np.isin(offsets, (-8, -4, 0, 4, 8)))


def test_cbam_channel_then_spatial_maps_match_naive_reference():
  module = CBAM()
  x = random((2, 9, 6, 32))
  variables = init(module, x)
  out, maps = apply_with_maps(module, variables, x)
  # As initialised, the spatial BN's zero scale makes the spatial map 0.5 everywhere.
  np.testing.assert_array_equal(maps["spatial_map"], 0.5)
  params = randomize(variables["params"])
  variables = {**variables, "params": params}
  out, maps = apply_with_maps(module, variables, x)
  xn = np.asarray(x)
  mlp = lambda v: dense(np.maximum(dense(v, params["mlp_reduce"]), 0), params["mlp_expand"])
  channel = sigmoid(mlp(xn.mean(axis=(1, 2))) + mlp(xn.max(axis=(1, 2))))[:, None, None]
  y = xn * channel
  descriptor = np.concatenate([y.mean(-1, keepdims=True), y.max(-1, keepdims=True)], -1)
  bn = params["spatial_bn"]
  logits = (naive_conv_same(descriptor, np.asarray(params["spatial_conv"]["kernel"]))
            / np.sqrt(1 + EPS) * np.asarray(bn["scale"]) + np.asarray(bn["bias"]))
  spatial = sigmoid(logits)
  np.testing.assert_allclose(maps["channel_map"], channel, atol=1e-5)
  np.testing.assert_allclose(maps["spatial_map"], spatial, atol=1e-5)
  # The spatial map is in [0, 1] and multiplies every channel at a position by one value.
  assert maps["spatial_map"].shape == (2, 9, 6, 1)
  assert np.all((maps["spatial_map"] >= 0) & (maps["spatial_map"] <= 1))
  np.testing.assert_allclose(out, y * spatial, atol=1e-5)
  assert params["spatial_conv"]["kernel"].shape == (7, 7, 2, 1)


def test_gala_integrates_global_and_local_attention_with_learned_weights():
  module = GALA()
  x = random((2, 7, 5, 48))
  variables = init(module, x)
  assert np.all(variables["params"]["additive_weight"] == 1)
  params = randomize(variables["params"], scale=0.3)
  out, maps = apply_with_maps(module, {"params": params}, x)
  xn = np.asarray(x)
  g = dense(np.maximum(dense(xn.mean(axis=(1, 2)), params["global_reduce"]), 0),
            params["global_expand"])[:, None, None]
  s = conv1x1(np.maximum(conv1x1(xn, params["local_reduce"]), 0), params["local_collapse"])
  a, m = np.asarray(params["additive_weight"]), np.asarray(params["multiplicative_weight"])
  attention = np.tanh(a * (g + s) + m * g * s)
  assert maps["global_logits"].shape == (2, 1, 1, 48)
  assert maps["local_logits"].shape == (2, 7, 5, 1)
  np.testing.assert_allclose(maps["attention_map"], attention, atol=1e-5)
  np.testing.assert_allclose(out, xn * attention, atol=1e-5)
  assert params["local_reduce"]["kernel"].shape == (1, 1, 48, 3)  # reduction 16


def test_gather_excite_variants_match_naive_references():
  x = random((2, 6, 5, 32), seed=3)
  xn = np.asarray(x)
  minus = GatherExcite(variant="theta_minus")
  np.testing.assert_allclose(apply(minus, {}, x),
                             xn * sigmoid(xn.mean(axis=(1, 2), keepdims=True)), atol=1e-6)
  theta = GatherExcite(variant="theta")
  variables = init(theta, x)
  kernel = np.asarray(variables["params"]["kernel"])
  assert kernel.shape == (6, 5, 32)  # one weight per position and channel
  gathered = np.zeros((2, 32))
  for h in range(6):
    for w in range(5):
      gathered += xn[:, h, w] * kernel[h, w]
  expected = xn * sigmoid(gathered / np.sqrt(1 + EPS))[:, None, None]
  np.testing.assert_allclose(apply(theta, variables, x), expected, atol=1e-5)
  # With a uniform kernel, GE-θ's gather is GE-θ⁻'s mean.
  uniform = {**variables, "params": {**variables["params"],
                                     "kernel": jnp.full((6, 5, 32), 1 / 30)}}
  np.testing.assert_allclose(
      apply(theta, uniform, x),
      xn * sigmoid(xn.mean(axis=(1, 2), keepdims=True) / np.sqrt(1 + EPS)), atol=1e-6)
  plus = GatherExcite(variant="theta_plus")
  params = init(plus, x)["params"]
  assert params["excite_reduce"]["kernel"].shape == (32, 2)
  with pytest.raises(ValueError, match="variant 'theta_star'"):
    init(GatherExcite(variant="theta_star"), x)


def test_gather_excite_applied_at_another_size_fails_clearly():
  theta = GatherExcite(variant="theta")
  variables = init(theta, random((1, 6, 5, 8)))
  with pytest.raises(ValueError, match="7x5x8.*initialised for 6x5x8"):
    theta.apply(variables, random((1, 7, 5, 8)), train=False)


def test_resnet50_placement_of_each_module():
  bam = flat_params("bam_resnet50", 224)
  # One BAM at each of the three stage boundaries, on 256, 512 and 1024 channels.
  assert {p.split("/")[0] for p in bam if "bam" in p} == {"stage1_bam", "stage2_bam",
                                                           "stage3_bam"}
  assert [bam[f"stage{s}_bam/channel_expand/kernel"] for s in (1, 2, 3)] == [
      (16, 256), (32, 512), (64, 1024)]
  assert bam["stage3_bam/spatial_dilated2/kernel"] == (3, 3, 64, 64)
  for name, scope in [("cbam_resnet50", "cbam"), ("gala_resnet50", "gala"),
                      ("ge_resnet50", "ge_theta")]:
    params = flat_params(name, 224)
    blocks = {p.split("/")[0] for p in params if f"/{scope}/" in p}
    assert len(blocks) == 16 and all("_block" in b for b in blocks), name
  ge = flat_params("ge_resnet50", 224)
  assert ge["stage1_block1/ge_theta/kernel"] == (56, 56, 256)
  assert ge["stage2_block1/ge_theta/kernel"] == (28, 28, 512)  # after the block's stride
  assert ge["stage4_block3/ge_theta/kernel"] == (7, 7, 2048)
  assert flat_params("gala_resnet50", 224)["stage4_block1/gala/global_reduce/kernel"] == (
      2048, 128)


def test_ge_wrn_is_parameter_free_and_modules_fit_basic_blocks():
  assert flat_params("ge_wrn28_10", 32, 100) == flat_params("wrn28_10", 32, 100)
  cbam34 = flat_params("cbam_resnet34", 224)
  assert cbam34["stage4_block3/cbam/mlp_reduce/kernel"] == (512, 32)


def test_small_resnet_and_wrn_run_with_bam_after_every_stage_but_the_last():
  x = random((2, 16, 12, 3))
  wrn = WideResNet(num_classes=5, depth=10, widen_factor=1, block_attention="bam")
  variables = init(wrn, x)
  logits, _ = jax.jit(lambda v, x: wrn.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
  assert sorted(k for k in variables["params"] if k.endswith("_bam")) == ["group1_bam",
                                                                          "group2_bam"]
  tiny = create_model("resnet_tiny", 5, block_attention="bam")
  params = jax.eval_shape(lambda x: tiny.init(jax.random.key(0), x, train=False), x)["params"]
  assert sorted(k for k in params if k.endswith("_bam")) == ["stage1_bam", "stage2_bam"]


def test_unknown_block_attention_lists_the_valid_ones():
  model = create_model("resnet_tiny", 3, block_attention="se")
  with pytest.raises(ValueError, match="block_attention 'se' is not one of.*'cbam'"):
    init(model, random((1, 8, 8, 3)))
