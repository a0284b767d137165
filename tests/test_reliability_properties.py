"""Property-based tests (hypothesis): random AAConv and model settings and random npz inputs.

Invalid settings or data must raise ``ValueError`` (``DataError`` for data) whose message
names the offending setting, never another exception type; valid ones must run.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aa_flax.attention import POSITION_ENCODINGS
from aa_flax.config_utils import base_config
from aa_flax.data import load_splits
from aa_flax.errors import DataError
from aa_flax.layers import AAConv
from aa_flax.models import create_model
from aa_flax.models.common import ATTENTION_SETTING_NAMES

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _round_to_heads(depth, heads):
  return max(heads, int(math.floor(depth / heads + 0.5)) * heads)


def _aaconv_problems(s) -> set[str]:
  """Names of the settings that make ``s`` invalid, by the rules of docs/SPECIFICATION.md §1."""
  problems = set()
  for name in ("features", "kernel_size", "strides", "num_heads"):
    if s[name] < 1:
      problems.add(name)
  if s["min_key_depth_per_head"] < 0:
    problems.add("min_key_depth_per_head")
  if not s["key_ratio"] > 0:
    problems.add("key_ratio")
  if not 0 < s["value_ratio"] <= 1:
    problems.add("value_ratio")
  if s["position_encoding"] not in POSITION_ENCODINGS:
    problems.add("position_encoding")
  if s["attention_pool"] is not None and s["attention_pool"] < 1:
    problems.add("attention_pool")
  if not problems and _round_to_heads(s["value_ratio"] * s["features"], s["num_heads"]) > \
      s["features"]:
    problems.add("d_v")
  return problems


VALID_AACONV = st.fixed_dictionaries({
    "features": st.sampled_from([1, 4, 6, 8]),
    "kernel_size": st.integers(1, 3),
    "strides": st.integers(1, 3),
    "key_ratio": st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.5]),
    "value_ratio": st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    "num_heads": st.sampled_from([1, 2, 4]),
    "min_key_depth_per_head": st.sampled_from([0, 2]),
    "position_encoding": st.sampled_from(POSITION_ENCODINGS),
    "attention_pool": st.sampled_from([None, 1, 2]),
})
INVALID_AACONV = {
    "features": [0, -1], "kernel_size": [0, -2], "strides": [0, -1], "key_ratio": [0.0, -0.1],
    "value_ratio": [0.0, -0.1, 1.5], "num_heads": [0, -1], "min_key_depth_per_head": [-1],
    "position_encoding": ["rel", "", "Relative"], "attention_pool": [0, -1],
}
# Half the examples are valid; the other half break one setting (d_v > features can still
# arise from valid-looking values, and the oracle accounts for it).
aaconv_settings = st.tuples(
    VALID_AACONV,
    st.one_of(st.none(), st.sampled_from([(k, v) for k, vs in INVALID_AACONV.items()
                                          for v in vs]))).map(
    lambda pair: pair[0] if pair[1] is None else {**pair[0], pair[1][0]: pair[1][1]})


_VALID_AACONV_RUNS = []


@settings(PROPERTY_SETTINGS, max_examples=30)  # jitted layers: a compile per new layer
@given(aaconv_settings, st.sampled_from([1, 3, 4]), st.sampled_from([1, 5]),
       st.sampled_from([1, 3]))
def aaconv_settings_raise_value_error_or_run(s, height, width, channels):
  layer = AAConv(**s)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, height, width, channels)),
                  jnp.float32)
  init_and_apply = jax.jit(lambda x: layer.apply(layer.init(jax.random.key(0), x), x))
  problems = _aaconv_problems(s)
  if problems:
    with pytest.raises(ValueError) as error:
      init_and_apply(x)
    message = str(error.value)
    assert any(name in message for name in problems), (problems, message)
    return
  y = init_and_apply(x)  # one compiled program per example
  _VALID_AACONV_RUNS.append(s)
  assert y.shape == (2, -(-height // s["strides"]), -(-width // s["strides"]), s["features"])
  assert bool(jnp.all(jnp.isfinite(y)))


VALID_MODEL_OVERRIDES = st.fixed_dictionaries({}, optional={
    "width": st.sampled_from([4, 8, 12]),
    "num_heads": st.sampled_from([1, 2, 4]),
    "key_ratio": st.sampled_from([0.25, 0.5]),
    "value_ratio": st.sampled_from([0.25, 0.5]),
    "position_encoding": st.sampled_from(POSITION_ENCODINGS),
    "stem": st.sampled_from(["cifar", "imagenet"]),
    "attention_stages": st.sampled_from([(), (1,), (1, 2), (0, 2)]),
    "min_key_depth_per_head": st.sampled_from([0, 4]),
    "block_attention": st.sampled_from(["bam", "cbam", "gala", "ge_theta", "ge_theta_plus"]),
})
INVALID_MODEL_OVERRIDES = [
    ("width", 0), ("width", -1), ("num_heads", 0), ("key_ratio", 0.0), ("value_ratio", 2.0),
    ("position_encoding", "learned"), ("stem", "vgg"), ("attention_stages", (7,)),
    ("attention_stages", (-1,)), ("min_key_depth_per_head", -1), ("block_attention", "sk"),
    ("kernel_size", 3),  # not a model field: must be refused by name
]
# Half the examples keep valid-looking overrides; the rest break one of them.
model_overrides = st.tuples(
    VALID_MODEL_OVERRIDES, st.one_of(st.none(), st.sampled_from(INVALID_MODEL_OVERRIDES))).map(
    lambda pair: pair[0] if pair[1] is None else {**pair[0], pair[1][0]: pair[1][1]})


_TRACED_MODELS = []


@settings(PROPERTY_SETTINGS, max_examples=80)  # traced only: cheap
@given(st.sampled_from(["aa_resnet_tiny", "aa_resnet_tiny", "resnet_tiny", "aa_resnet18",
                        "aa_mnasnet_0.75", "aa_resnt"]),
       st.sampled_from([0, 1, 3, 5, 5]), model_overrides, st.integers(1, 9), st.integers(1, 9))
def model_settings_raise_value_error_or_trace(name, num_classes, overrides, height, width):
  """Traced with ``eval_shape`` (no compile): every setting either builds or is refused."""
  images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  try:
    model = create_model(name, num_classes, **overrides)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape),
                                                  train=False))
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  except ValueError as error:
    assert len(str(error)) > 20
    return
  no_attention = name == "resnet_tiny" or overrides.get("attention_stages") == ()
  injected = [(k, v) for k, v in INVALID_MODEL_OVERRIDES if overrides.get(k, None) == v
              # Attention settings of a model that builds no AAConv are never used.
              and not (no_attention and k in ATTENTION_SETTING_NAMES + ("attention_stages",))]
  assert not injected, f"{name} accepted invalid overrides {injected}"
  _TRACED_MODELS.append((name, overrides))
  assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
  assert name != "aa_resnt" and "kernel_size" not in overrides and num_classes >= 1


@pytest.mark.parametrize("width", [0, -1])
def test_nonpositive_model_width_raises_value_error(width):
  model = create_model("aa_resnet_tiny", 3, width=width)
  with pytest.raises(ValueError, match="width"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False))


def test_model_settings_raise_value_error_or_trace():
  """The property over random model settings, and a guard on its strategy: it must build and
  trace many valid models."""
  _TRACED_MODELS.clear()
  model_settings_raise_value_error_or_trace()
  assert len(_TRACED_MODELS) >= 8
  assert {"aa_resnet_tiny", "resnet_tiny"} <= {name for name, _ in _TRACED_MODELS}


def _npz_problems(images, labels, num_classes) -> bool:
  if images.dtype != np.uint8 or images.ndim != 4 or min(images.shape) < 1:
    return True
  if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (images.shape[0],):
    return True
  return bool(labels.min() < 0 or (num_classes and labels.max() >= num_classes))


npz_images = st.builds(
    lambda dtype, shape: np.ones(shape, dtype),
    st.sampled_from([np.uint8, np.int8, np.int32, np.float32, np.bool_]),
    st.lists(st.integers(0, 3), min_size=1, max_size=5).map(tuple))
npz_labels = st.builds(
    lambda dtype, values: np.asarray(values).astype(dtype),
    st.sampled_from([np.int32, np.int64, np.uint8, np.float32]),
    st.lists(st.integers(-2, 5), max_size=4))


@PROPERTY_SETTINGS
@given(npz_images, npz_labels, st.integers(0, 6))
def test_npz_inputs_raise_data_error_or_load(tmp_path, images, labels, num_classes):
  path = tmp_path / "data.npz"
  np.savez(path, images=images, labels=labels)
  config = base_config().data
  config.name, config.train_files, config.eval_files = "npz", str(path), str(path)
  config.num_classes = num_classes
  if _npz_problems(images, labels, num_classes):
    with pytest.raises(DataError, match=r"data\.npz"):
      load_splits(config, seed=0)
    return
  splits = load_splits(config, seed=0)
  assert len(splits.train) == images.shape[0] and splits.image_shape == images.shape[1:]
  assert splits.num_classes == (num_classes or int(labels.max()) + 1)


@PROPERTY_SETTINGS
@given(st.integers(0, 400))
def test_truncated_npz_files_raise_data_error(tmp_path, keep_bytes):
  path = tmp_path / "full.npz"
  np.savez_compressed(path, images=np.arange(96, dtype=np.uint8).reshape(2, 4, 4, 3),
                      labels=np.array([0, 1]))
  data = path.read_bytes()
  if keep_bytes >= len(data):
    return
  cut = tmp_path / "cut.npz"
  cut.write_bytes(data[:keep_bytes])
  config = base_config().data
  config.name, config.train_files, config.eval_files = "npz", str(cut), str(cut)
  with pytest.raises(DataError, match=r"cut\.npz"):
    load_splits(config, seed=0)


def test_aaconv_settings_raise_value_error_or_run():
  """The property over random AAConv settings, and a guard on its strategy: it must run many
  real, valid layers."""
  _VALID_AACONV_RUNS.clear()
  aaconv_settings_raise_value_error_or_run()
  assert len(_VALID_AACONV_RUNS) >= 10
