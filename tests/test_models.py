"""Model zoo: parameter counts against the paper, AA placement, registry, forward passes."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax import kernels
from aa_flax.layers import AAConv
from aa_flax.model_cost import count_flops, count_params
from aa_flax.models import AttentionSettings, create_model, list_models
from aa_flax.models.common import ATTENTION_SETTING_NAMES, make_aaconv
from aa_flax.tables import PAPER_ROWS, TABLE_INPUTS, is_implemented, model_params
from abstract_models import abstract_variables, flat_params

# Rows whose paper count we do not match within 0.5%, with the reason (see docs/TABLES.md).
# Table 1 lists 36.3M for the baseline WRN-28-10, but a standard WRN-28-10 on CIFAR-100 has
# 36.54M (36.5M in docs/SPECIFICATION.md's parameter-count check and in the WRN paper); our
# SE-WRN is that plus the SE layers; GE-WRN (parameter-free GE-θ⁻) is exactly the WRN count,
# as in the table.
# We pin our exact counts for these rows instead.
EXACT_COUNTS = {"wrn28_10": 36_536_884, "ge_wrn28_10": 36_536_884, "se_wrn28_10": 36_810_444}


pytestmark = pytest.mark.usefixtures("fast_compiles")


def row_params(row):
  """Parameter count of a table row's model at the table's input, from the shared traces."""
  size, classes = TABLE_INPUTS[row.table]
  variables = abstract_variables(row.model, size, size, classes, **dict(row.overrides))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


# Rows with a paper count; rows of tables 2 and 3 that share a model and input are one count.
ROWS_BY_MODEL = {}
for _row in PAPER_ROWS:
  if _row.params_m and is_implemented(_row):
    ROWS_BY_MODEL.setdefault((_row.model, _row.overrides, TABLE_INPUTS[_row.table]),
                             []).append(_row)


@pytest.mark.parametrize("rows", ROWS_BY_MODEL.values(), ids=lambda rows: "-".join(
    [f"table{r.table}" for r in rows] + [rows[0].model]))
def test_parameter_counts_match_paper(rows):
  params = row_params(rows[0])
  for row in rows:
    if row.model in EXACT_COUNTS:
      assert params == EXACT_COUNTS[row.model]
    else:
      assert abs(params / 1e6 - row.params_m) / row.params_m < 0.005, (row, params)


@pytest.mark.parametrize("model", ["aa_wrn28_10", "resnet34"])
def test_tables_module_counts_the_row_model_at_the_table_input(model):
  """``model_params`` (what ``python -m aa_flax.tables`` prints) equals the count checked
  against the paper above, for a CIFAR (table 1) and an ImageNet (table 3) row."""
  row = next(r for r in PAPER_ROWS if r.model == model)
  assert model_params(row) == row_params(row)


@pytest.mark.parametrize("name,size,expected", [
    ("aa_resnet34", 224, 13), ("aa_resnet50", 224, 13), ("aa_resnet101", 224, 30),
    ("aa_resnet152", 224, 47), ("aa_wrn28_10", 32, 12), ("aa_mnasnet_1.0", 224, 13),
    ("fa_resnet50_0.5", 224, 13), ("resnet50", 224, 0), ("se_resnet50", 224, 0)])
def test_number_of_augmented_convs(name, size, expected):
  params = flat_params(name, size, 100 if size == 32 else 1000)
  assert sum(p.endswith("qkv/kernel") for p in params) == expected


def test_aa_resnet50_placement_and_pooled_tables():
  params = flat_params("aa_resnet50", 224)
  # Stage 1 (56x56) plain; stage 2 (28x28) pooled to 14x14; stages 3, 4 at 14x14, 7x7.
  assert not any(p.startswith("stage1") and "qkv" in p for p in params)
  assert params["stage2_block1/conv2/rel_height"] == (27, 20)
  assert params["stage2_block4/conv2/rel_width"] == (27, 20)
  assert params["stage3_block1/conv2/rel_height"] == (27, 20)
  assert params["stage4_block3/conv2/rel_width"] == (13, 20)
  # Conv branch has F_out - d_v filters: 128 - 16 in stage 2.
  assert params["stage2_block2/conv2/conv/kernel"] == (3, 3, 128, 112)
  assert params["stage2_block2/conv2/qkv/kernel"] == (1, 1, 128, 2 * 160 + 16)


def test_fully_attentional_resnet_has_no_conv_branch():
  params = flat_params("fa_resnet50_1.0", 224)
  assert not any("conv2/conv/" in p for p in params if p.startswith(("stage2", "stage3")))
  assert params["stage4_block1/conv2/qkv/kernel"] == (1, 1, 512, 3 * 512)


def test_aa_wrn_and_mnasnet_placement():
  wrn = flat_params("aa_wrn28_10", 32, 100)
  assert wrn["group1_block1/conv1/rel_height"] == (63, 20)  # 32x32, no pooling
  assert wrn["group3_block4/conv1/rel_width"] == (15, 20)
  mnas = flat_params("aa_mnasnet_1.0", 224)
  # First augmented block sees 56x56 (stride is on its depthwise conv), pooled to 28x28.
  assert mnas["stage2_block1/expand_conv/rel_height"] == (55, 2)  # d_k = 8 over 4 heads
  assert mnas["stage6_block1/expand_conv/rel_height"] == (13, 24)
  assert not any(p.startswith("stage1") and "qkv" in p for p in mnas)


def test_mnasnet_placements_attention_sizes():
  def attention_sizes(**overrides):
    params = flat_params("aa_mnasnet_1.0", 224, **overrides)
    return {p.split("/")[0]: (shape[0] + 1) // 2 for p, shape in params.items()
            if p.endswith("rel_height")}

  default = attention_sizes()
  assert len(default) == 13
  # Pooled 56x56 -> 28x28 in the 40-filter stage's first block; unpooled 28x28 in the
  # 80-filter stage's first block; everything else at 14x14 or 7x7.
  assert sorted(k for k, v in default.items() if v == 28) == ["stage2_block1", "stage3_block1"]
  alternative = attention_sizes(attention_pool_stages=(), attention_max_size=14)
  assert alternative.keys() == default.keys()
  assert alternative == {k: min(v, 14) for k, v in default.items()}
  with pytest.raises(ValueError, match=r"attention_pool_stages=\(\) with attention_max_size"):
    flat_params("aa_mnasnet_1.0", 224, attention_max_size=14)


def test_registry_names_and_errors():
  names = set(list_models())
  required = ({f"resnet{d}" for d in (18, 34, 50, 101, 152)}
              | {f"aa_resnet{d}" for d in (18, 34, 50, 101, 152)}
              | {f"se_resnet{d}" for d in (34, 50, 101, 152)}
              | {f"{p}_resnet{d}" for p in ("bam", "cbam", "gala", "ge")
                 for d in (18, 34, 50, 101, 152)}
              | {"wrn28_10", "aa_wrn28_10", "se_wrn28_10", "ge_wrn28_10"}
              | {f"{p}mnasnet_{w}" for p in ("", "aa_") for w in ("0.75", "1.0", "1.25", "1.4")}
              | {f"fa_resnet50_{r}" for r in ("0.25", "0.5", "0.75", "1.0")})
  assert required <= names
  with pytest.raises(ValueError,
                     match=r"unknown model 'resnet51'; closest: resnet50\b.*list_models\(\)"):
    create_model("resnet51", 10)
  with pytest.raises(ValueError, match=r"unknown override\(s\) \['widht'\]"):
    create_model("resnet18", 10, widht=8)
  with pytest.raises(ValueError, match="has no attention"):
    create_model("resnet50", 10, position_encoding="sine")
  with pytest.raises(ValueError, match="num_classes"):
    create_model("resnet50", 0)
  model = create_model("aa_resnet50", 10, position_encoding="none", num_heads=4)
  assert model.attention.position_encoding == "none" and model.attention.num_heads == 4


@pytest.mark.parametrize("name,shape,out", [
    ("aa_resnet50", (2, 224, 224, 3), (2, 1000)), ("aa_wrn28_10", (2, 32, 32, 3), (2, 100)),
    ("aa_mnasnet_0.75", (2, 224, 224, 3), (2, 1000)), ("se_resnet34", (2, 96, 64, 3), (2, 1000)),
    ("aa_resnet34", (2, 96, 64, 3), (2, 1000))])
def test_model_output_shapes(name, shape, out):
  model = create_model(name, out[1])
  variables = abstract_variables(name, *shape[1:3], out[1])
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  assert logits.shape == out and logits.dtype == jnp.float32


@pytest.fixture(scope="module")
def tiny():
  model = create_model("aa_resnet_tiny", 7)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 10, 3)), jnp.float32)
  init = jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x, train=False))
  return model, init(images), images


def test_tiny_model_trains_every_parameter(tiny):
  model, variables, images = tiny
  labels = jnp.arange(4) % 7
  # The last BN of each block starts at scale 0 (so residual branches start as identity),
  # which zeroes the branch gradients at step 0; use scale 1 to see every gradient path.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if jax.tree_util.keystr(p).endswith("['scale']") else v,
      variables["params"])

  def loss(params):
    logits, state = model.apply({**variables, "params": params}, images, train=True,
                                mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), state

  (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(value)
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  paths = []
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    paths.append(jax.tree_util.keystr(path))
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0, paths[-1]
  assert sum("rel_" in p for p in paths) == 4


def test_bfloat16_model_keeps_float32_params_and_logits(tiny):
  model, variables, images = tiny
  bf16 = create_model("aa_resnet_tiny", 7, dtype=jnp.bfloat16)
  logits16 = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, images)
  logits32 = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert logits16.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(jax.eval_shape(
      lambda x: bf16.init({"params": jax.random.key(0)}, x, train=False), images)))
  np.testing.assert_allclose(logits16, logits32, atol=0.1, rtol=0.1)


def test_model_attention_weights_for_figures(tiny):
  model, variables, images = tiny
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
      variables, images)
  weights = jax.tree.leaves(state["intermediates"])
  assert [w.shape for w in weights] == [(4, 4, 30, 30), (4, 4, 9, 9)]


def test_flop_counting_conventions():
  class OneConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(5)(nn.Conv(4, (3, 3), padding="SAME")(x).reshape(x.shape[0], -1))

  dense = count_flops(OneConv(), (1, 8, 8, 2), "dense")
  assert dense == 2 * 64 * 9 * 2 * 4 + 2 * 256 * 5
  assert count_flops(OneConv(), (1, 8, 8, 2), "xla") < dense + 64 * 4 * 2  # no padded taps
  assert count_params(OneConv(), (1, 8, 8, 2)) == 9 * 2 * 4 + 4 + 256 * 5 + 5
  size, classes = TABLE_INPUTS[3]
  resnet50 = count_flops(create_model("resnet50", classes), (1, size, size, 3)) / 1e9
  assert abs(resnet50 - 8.2) / 8.2 < 0.005
  with pytest.raises(ValueError, match="convention"):
    count_flops(OneConv(), (1, 8, 8, 2), "macs")


@pytest.mark.parametrize("name", ["resnet_tiny", "mnasnet_1.0"])
def test_models_without_attention_ignore_attention_stages(name):
  model = create_model(name, 3)
  shape = (2, 32, 24, 3)
  logits = jax.eval_shape(lambda x: model.init_with_output(
      {"params": jax.random.key(0)}, x, train=False)[0], jax.ShapeDtypeStruct(shape, jnp.float32))
  assert logits.shape == (2, 3)


@pytest.mark.parametrize("override,match", [
    (dict(num_heads=0), "num_heads"), (dict(key_ratio=-0.1), "key_ratio"),
    (dict(value_ratio=2.0), "value_ratio"), (dict(position_encoding="learned"), "position"),
    (dict(relative_method="tile"), "relative_method"), (dict(attention_impl="cuda"), "impl")])
def test_invalid_attention_overrides_fail_at_create_model(override, match):
  with pytest.raises(ValueError, match=match):
    create_model("aa_resnet50", 10, attention_stages=(), **override)


def test_attention_settings_are_aaconv_fields_and_reach_every_layer():
  aaconv_defaults = {f.name: f.default for f in dataclasses.fields(AAConv)}
  settings_defaults = {f.name: f.default for f in dataclasses.fields(AttentionSettings)}
  assert settings_defaults == {name: aaconv_defaults[name] for name in ATTENTION_SETTING_NAMES}
  for impl in kernels.ATTENTION_IMPLS:  # every implementation is a valid setting
    AttentionSettings(attention_impl=impl)
  settings = AttentionSettings(key_ratio=0.5, value_ratio=0.25, num_heads=2,
                               min_key_depth_per_head=3, position_encoding="sine",
                               relative_method="skew", attention_impl="auto", remat=True)
  layer = make_aaconv(settings, 16, 3, 1, None, jnp.float32, "aa")
  assert {name: getattr(layer, name) for name in ATTENTION_SETTING_NAMES} == (
      dataclasses.asdict(settings))
  with pytest.raises(ValueError, match="remat must be True or False"):
    AttentionSettings(remat="yes")
