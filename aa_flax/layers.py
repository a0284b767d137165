"""Linen layers: the attention-augmented convolution (AAConv) and squeeze-and-excitation.

Shapes use B batch, H x W spatial size, C channels; feature maps are ``[B, H, W, C]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax import attention, kernels

Dtype = Any
KernelSize = Union[int, Sequence[int]]


def _pair(value: KernelSize, name: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or any((not isinstance(v, int)) or v < 1 for v in pair):
    raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
  return pair


def _round_to_heads(depth: float, num_heads: int) -> int:
  """Rounds a depth to the nearest multiple of num_heads (halves up), at least num_heads."""
  return max(num_heads, int(math.floor(depth / num_heads + 0.5)) * num_heads)


@dataclasses.dataclass(frozen=True)
class AttentionDepths:
  """Resolved depths of one AAConv. ``key`` = d_k, ``value`` = d_v, per head = / heads."""
  key: int
  value: int
  num_heads: int

  @property
  def key_per_head(self) -> int:
    return self.key // self.num_heads

  @property
  def value_per_head(self) -> int:
    return self.value // self.num_heads


# The AAConv fields a model sets once for all its attention layers; the fields of
# ``aa_flax.models.AttentionSettings`` are derived from these.
ATTENTION_SETTING_NAMES = ("key_ratio", "value_ratio", "num_heads", "min_key_depth_per_head",
                           "position_encoding", "relative_method", "attention_impl", "remat")


def _check_heads_and_depths(key_ratio, value_ratio, num_heads, min_key_depth_per_head,
                            key_depth=None, value_depth=None) -> None:
  if not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
  if min_key_depth_per_head < 0:
    raise ValueError(f"min_key_depth_per_head must be >= 0, got {min_key_depth_per_head}")
  if key_depth is None:
    if not key_ratio > 0:
      raise ValueError(f"key_ratio (kappa) must be > 0, got {key_ratio!r}")
  elif key_depth < 1 or key_depth % num_heads:
    raise ValueError(f"key_depth must be a positive multiple of num_heads={num_heads}, "
                     f"got {key_depth}")
  if value_depth is None:
    if not 0 < value_ratio <= 1:
      raise ValueError(f"value_ratio (upsilon) must be in (0, 1], got {value_ratio!r}")
  elif value_depth < 1 or value_depth % num_heads:
    raise ValueError(f"value_depth must be a positive multiple of num_heads={num_heads}, "
                     f"got {value_depth}")


def check_attention_settings(key_ratio, value_ratio, num_heads, min_key_depth_per_head,
                             position_encoding, relative_method, attention_impl, remat,
                             key_depth=None, value_depth=None) -> None:
  """Raises ``ValueError`` naming the first invalid attention setting (the settings of
  ``ATTENTION_SETTING_NAMES`` and the absolute depths; checks that need no feature count)."""
  _check_heads_and_depths(key_ratio, value_ratio, num_heads, min_key_depth_per_head,
                          key_depth, value_depth)
  if position_encoding not in attention.POSITION_ENCODINGS:
    raise ValueError(f"position_encoding {position_encoding!r} is not one of "
                     f"{attention.POSITION_ENCODINGS}")
  if relative_method not in attention.RELATIVE_METHODS:
    raise ValueError(f"relative_method {relative_method!r} is not one of "
                     f"{attention.RELATIVE_METHODS}")
  kernels.check_impl(attention_impl)
  if not isinstance(remat, bool):
    raise ValueError(f"remat must be True or False, got {remat!r}")


def attention_depths(features: int, key_ratio: float, value_ratio: float, num_heads: int,
                     min_key_depth_per_head: int = 20, key_depth: Optional[int] = None,
                     value_depth: Optional[int] = None) -> AttentionDepths:
  """Resolves d_k and d_v of an AAConv, validating every setting.

  Rules, chosen so that parameter counts match the paper's tables:

  * ``d_k = max(round_h(key_ratio * features), min_key_depth_per_head * num_heads)`` and
    ``d_v = round_h(value_ratio * features)``, where ``round_h`` rounds to the nearest
    multiple of ``num_heads`` (halves up) and is at least ``num_heads``.
  * Absolute ``key_depth``/``value_depth``, when given, replace the ratios; they must be
    multiples of ``num_heads`` (``key_depth`` still obeys the per-head floor).
  * ``d_v <= features``; ``d_v == features`` (value_ratio 1) leaves no convolution branch.
  """
  if not isinstance(features, int) or features < 1:
    raise ValueError(f"features must be a positive int, got {features!r}")
  _check_heads_and_depths(key_ratio, value_ratio, num_heads, min_key_depth_per_head,
                          key_depth, value_depth)
  key = _round_to_heads(key_ratio * features, num_heads) if key_depth is None else key_depth
  key = max(key, min_key_depth_per_head * num_heads)
  value = (_round_to_heads(value_ratio * features, num_heads) if value_depth is None
           else value_depth)
  if value > features:
    raise ValueError(
        f"value depth d_v={value} exceeds features={features} (value_ratio={value_ratio}, "
        f"value_depth={value_depth}, num_heads={num_heads}); need d_v <= features")
  return AttentionDepths(key=key, value=value, num_heads=num_heads)


def attention_layer_shape(q_shape, v_shape, *, relative: bool, dtype) -> dict[str, Any]:
  """What ``attention_impl="auto"`` decides on (``aa_flax.kernels.auto_impl``): the attention
  ``length`` H*W, the per-head ``depth`` the fused kernels see and the ``dtype``, for q
  ``[B, N, H, W, d_k^h]`` and v ``[B, N, H, W, d_v^h]``."""
  _, _, height, width, key_depth = q_shape
  depth = key_depth + (height + width if relative else 0)
  return {"length": height * width, "depth": max(depth, v_shape[-1]), "dtype": dtype}


def avg_pool_same(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Average pool of ``[B, H, W, C]`` with SAME padding (padding excluded from the mean).

  Output is ``[B, ceil(H / stride), ceil(W / stride), C]``.
  """
  if window == 1 and stride == 1:
    return x
  return nn.avg_pool(x, (window, window), (stride, stride), padding="SAME",
                     count_include_pad=False)


class AAConv(nn.Module):
  """Attention-augmented convolution: ``concat[conv(X), W^O MHA(X)]`` on channels.

  Input ``[B, H, W, C_in]``; output ``[B, ceil(H/s), ceil(W/s), features]`` where the first
  ``features - d_v`` channels come from a ``kernel_size`` convolution and the last ``d_v``
  from multi-head self-attention (heads concatenated, then a 1x1 conv W^O).

  Attention branch: a 1x1 conv gives ``2 d_k + d_v`` channels split into
  q, k, v; q is scaled by ``(d_k^h) ** -0.5`` before both the content and the relative logits;
  relative tables ``rel_height [2H'-1, d_k^h]`` and ``rel_width [2W'-1, d_k^h]`` are shared
  across heads and sized from the spatial size H' x W' attention actually sees.

  Spatial handling of the attention branch (the paper is silent on strides):

  * ``strides > 1``: the convolution branch strides; the attention input is average-pooled
    with window = stride = ``strides`` (SAME), so both branches meet at the output size.
  * ``attention_pool = p``: the attention input is further average-pooled with a
    ``(p+1) x (p+1)`` window and stride p (p = 2 gives the paper's 3x3 stride-2 pool), and
    the W^O output is bilinearly upsampled back to the output size.

  ``key_ratio = value_ratio = 1`` gives the fully attentional layer (no conv branch).
  ``attention_impl`` picks how attention runs (one of ``aa_flax.kernels.ATTENTION_IMPLS``;
  ``"auto"`` picks per layer from its attention size, see ``aa_flax.kernels.auto_impl``); all
  give the same outputs and gradients. The attention weights ``[B, N_h, H'W', H'W']`` are sown into the
  ``intermediates`` collection as ``attention_weights`` (stored only when that collection is
  mutable).
  """
  features: int
  kernel_size: KernelSize = 3
  strides: int = 1
  key_ratio: float = 0.2
  value_ratio: float = 0.1
  key_depth: Optional[int] = None
  value_depth: Optional[int] = None
  num_heads: int = 8
  min_key_depth_per_head: int = 20
  position_encoding: str = "relative"
  attention_pool: Optional[int] = None
  relative_method: attention.RelativeMethod = "gather"
  attention_impl: str = "xla"
  remat: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  @property
  def depths(self) -> AttentionDepths:
    return attention_depths(self.features, self.key_ratio, self.value_ratio, self.num_heads,
                            self.min_key_depth_per_head, self.key_depth, self.value_depth)

  def validate(self) -> None:
    """Raises ``ValueError`` for any invalid setting (also run at the first call)."""
    _pair(self.kernel_size, "kernel_size")
    if not isinstance(self.strides, int) or self.strides < 1:
      raise ValueError(f"strides must be a positive int, got {self.strides!r}")
    if self.attention_pool is not None and (not isinstance(self.attention_pool, int)
                                            or self.attention_pool < 1):
      raise ValueError(f"attention_pool must be None or an int >= 1, got "
                       f"{self.attention_pool!r}")
    check_attention_settings(**{name: getattr(self, name) for name in ATTENTION_SETTING_NAMES},
                             key_depth=self.key_depth, value_depth=self.value_depth)
    self.depths  # pylint: disable=pointless-statement

  def _relative_table(self, name: str, length: int, depth: int) -> jax.Array:
    shape = (2 * length - 1, depth)
    if self.has_variable("params", name):
      existing = self.get_variable("params", name)
      if existing.shape != shape:
        where = "/".join(self.scope.path) or "(top level)"
        raise ValueError(
            f"AAConv at {where}: the attention input is {length} along the axis of {name}, "
            f"which needs a table of shape {shape}, but the parameters hold {existing.shape}. "
            f"Relative tables are sized at init from the spatial size attention sees; "
            f"convert the variables with aa_flax.resolution.convert_variables, or use the "
            f"image size they were made for.")
    init = nn.initializers.normal(stddev=attention.relative_table_stddev(depth))
    return self.param(name, init, shape, self.param_dtype)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x ``[B, H, W, C_in]`` -> ``[B, ceil(H/s), ceil(W/s), features]``."""
    self.validate()
    depths = self.depths
    if x.ndim != 4 or min(x.shape[1:]) < 1:
      raise ValueError(f"AAConv input must be [B, H, W, C] with positive sizes, got {x.shape}")
    batch, height, width, _ = x.shape
    out_h, out_w = -(-height // self.strides), -(-width // self.strides)
    outputs = []
    if depths.value < self.features:
      outputs.append(nn.Conv(self.features - depths.value, _pair(self.kernel_size, "kernel_size"),
                             strides=self.strides, padding="SAME", use_bias=False,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=self.kernel_init, name="conv")(x))
    outputs.append(self._attention_branch(x, depths, out_h, out_w))
    return jnp.concatenate(outputs, axis=-1) if len(outputs) > 1 else outputs[0]

  def _attention_branch(self, x, depths: AttentionDepths, out_h: int, out_w: int):
    a = avg_pool_same(x, self.strides, self.strides)
    if self.attention_pool and self.attention_pool > 1:
      a = avg_pool_same(a, self.attention_pool + 1, self.attention_pool)
    batch, height, width, channels = a.shape
    a = a.astype(self.dtype)
    if self.position_encoding == "sine":
      a = a + attention.sine_position_encoding_2d(height, width, channels, self.dtype)
    elif self.position_encoding == "coordconv":
      a = jnp.concatenate([a, attention.coord_channels(batch, height, width, self.dtype)], -1)

    conv1x1 = lambda feats, name: nn.Conv(  # noqa: E731
        feats, (1, 1), use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    qkv = conv1x1(2 * depths.key + depths.value, "qkv")(a)
    q, k, v = jnp.split(qkv, [depths.key, 2 * depths.key], axis=-1)

    def heads(t):  # [B, h, w, N * d] -> [B, N, h, w, d]
      t = t.reshape(batch, height, width, depths.num_heads, -1)
      return jnp.transpose(t, (0, 3, 1, 2, 4))

    q = heads(q) * jnp.asarray(depths.key_per_head ** -0.5, self.dtype)
    k, v = heads(k), heads(v)
    rel_h = rel_w = None
    if self.position_encoding == "relative":
      rel_h = self._relative_table("rel_height", height, depths.key_per_head).astype(self.dtype)
      rel_w = self._relative_table("rel_width", width, depths.key_per_head).astype(self.dtype)
    out = self._attend(q, k, v, rel_h, rel_w)
    # [B, N, h, w, d_v^h] -> [B, h, w, N * d_v^h]: head n owns channels [n d_v^h, (n+1) d_v^h).
    out = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(batch, height, width, depths.value)
    out = conv1x1(depths.value, "attention_output")(out)
    if (height, width) != (out_h, out_w):
      out = jax.image.resize(out, (batch, out_h, out_w, depths.value), "bilinear")
    return out


  def _attend(self, q, k, v, rel_h, rel_w):
    """Runs the chosen attention implementation: ``[B, N, h, w, d]`` -> ``[B, N, h, w, d_v^h]``.

    The weights are computed (and sown) only when ``intermediates`` is mutable.
    """
    attend = kernels.attention_fn(self.attention_impl, self.remat, **attention_layer_shape(
        q.shape, v.shape, relative=rel_h is not None, dtype=q.dtype))
    want_weights = self.is_mutable_collection("intermediates")
    result = attend(q, k, v, rel_h, rel_w, relative_method=self.relative_method,
                    return_weights=want_weights)
    if not want_weights:
      return result
    out, weights = result
    self.sow("intermediates", "attention_weights", weights)
    return out


@dataclasses.dataclass(frozen=True)
class AttentionPath:
  """Which implementation one AAConv's attention runs: module ``path`` ("stage2_block1/conv2"),
  the map ``size`` attention sees ("14x14") and ``impl`` ("auto" resolved)."""
  path: str
  size: str
  impl: str


@contextlib.contextmanager
def recorded_attention_paths() -> Iterator[list[AttentionPath]]:
  """Yields a list that fills with an :class:`AttentionPath` for every AAConv attention traced
  inside the block (e.g. under ``jax.eval_shape(model.init, ...)``), in call order."""
  paths: list[AttentionPath] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, AAConv) and context.method_name == "_attend":
      q, _, v, rel_h, _ = args
      impl = kernels.resolve_impl(context.module.attention_impl, **attention_layer_shape(
          q.shape, v.shape, relative=rel_h is not None, dtype=q.dtype))
      paths.append(AttentionPath("/".join(context.module.scope.path),
                                 f"{q.shape[2]}x{q.shape[3]}", impl))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    yield paths


def attention_paths_by_stage(paths: Sequence[AttentionPath]) -> str:
  """One line: per stage (the top-level module, ``_blockN`` dropped), each distinct map size
  and implementation with its layer count, e.g. ``"stage3: 14x14 pallas_tpu x6; stage4: 7x7
  xla x3"``."""
  stages: dict[str, dict[tuple[str, str], int]] = {}
  for p in paths:
    stage = re.sub(r"_block\d+$", "", p.path.split("/")[0])
    counts = stages.setdefault(stage, {})
    counts[(p.size, p.impl)] = counts.get((p.size, p.impl), 0) + 1
  return "; ".join(f"{stage}: " + ", ".join(f"{size} {impl} x{count}"
                                             for (size, impl), count in counts.items())
                   for stage, counts in stages.items())


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation: ``x * sigmoid(W2 relu(W1 mean_hw(x)))``; ``[B,H,W,C]`` in and out."""
  hidden_features: int
  gate: Any = nn.sigmoid
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.hidden_features < 1:
      raise ValueError(f"SqueezeExcite hidden_features must be >= 1, got {self.hidden_features}")
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.Conv(self.hidden_features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                name="reduce")(s)
    s = nn.relu(s)
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                name="expand")(s)
    return x * self.gate(s).astype(x.dtype)
