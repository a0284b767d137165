"""MnasNet-A1 (Tan et al., 2019) with optional attention augmentation.

Placement (docs/SPECIFICATION.md §2, marked unsure there): AA-MnasNet augments the expansion 1x1
conv of the inverted bottleneck in the 13 MBConv blocks from the 28x28 stage on (stages 40, 80,
112, 160, 320 at width 1.0), with N_h=4, κ=0.1, υ=0.05 and no d_k^h floor (the paper's parameter
counts only match without it), pooling the attention input in the first augmented stage. That
stage's first block sees the 56x56 map (its stride is on the depthwise conv), so pooling brings
its attention to 28x28, while its other two blocks attend at 14x14; the 80-filter stage's first
block attends at 28x28 unpooled. ``attention_max_size=14`` (with ``attention_pool_stages=()``)
is the alternative: every augmented layer is pooled until its attention map is at most 14x14.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax.layers import SqueezeExcite
from aa_flax.models.common import (AttentionSettings, batch_norm, check_images,
                                   classifier_head, conv, make_aaconv)

Dtype = Any


class StageSpec(NamedTuple):
  expand_ratio: int
  kernel_size: int
  strides: int
  filters: int
  repeats: int
  squeeze_excite: bool


# MnasNet-A1 after the stem conv (32) and the separable conv (16).
MNASNET_A1_STAGES = (
    StageSpec(6, 3, 2, 24, 2, False),
    StageSpec(3, 5, 2, 40, 3, True),
    StageSpec(6, 3, 2, 80, 4, False),
    StageSpec(6, 3, 1, 112, 2, True),
    StageSpec(6, 5, 2, 160, 3, True),
    StageSpec(6, 3, 1, 320, 1, False),
)


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
  """Scales a channel count by the width multiplier, rounding to a multiple of 8 (>= 90%)."""
  scaled = filters * multiplier
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


class MBConv(nn.Module):
  """Inverted bottleneck: expand 1x1 -> depthwise kxk (stride) -> SE -> project 1x1 (+ skip).

  ``[B, H, W, C_in] -> [B, H/s, W/s, filters]``; the expansion conv is an AAConv when
  ``attention`` is set. SE reduces to ``0.25 * C_in`` channels, as in MnasNet.
  """
  filters: int
  expand_ratio: int
  kernel_size: int
  strides: int
  squeeze_excite: bool
  attention: Optional[AttentionSettings] = None
  attention_pool: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    in_filters = x.shape[-1]
    expanded = in_filters * self.expand_ratio
    y = x
    if self.expand_ratio != 1:
      if self.attention is not None:
        y = make_aaconv(self.attention, expanded, 1, 1, self.attention_pool, self.dtype,
                        "expand_conv")(y)
      else:
        y = conv(expanded, 1, 1, self.dtype, "expand_conv")(y)
      y = nn.relu(batch_norm(train, self.dtype, "expand_bn", momentum=0.99, epsilon=1e-3)(y))
    y = conv(expanded, self.kernel_size, self.strides, self.dtype, "depthwise_conv",
             groups=expanded)(y)
    y = nn.relu(batch_norm(train, self.dtype, "depthwise_bn", momentum=0.99, epsilon=1e-3)(y))
    if self.squeeze_excite:
      y = SqueezeExcite(max(1, int(in_filters * 0.25)), dtype=self.dtype, name="se")(y)
    y = conv(self.filters, 1, 1, self.dtype, "project_conv")(y)
    y = batch_norm(train, self.dtype, "project_bn", momentum=0.99, epsilon=1e-3)(y)
    if self.strides == 1 and in_filters == self.filters:
      y = y + x
    return y


class MnasNet(nn.Module):
  """MnasNet-A1. ``images [B, H, W, C] -> logits [B, num_classes]`` (float32).

  Attributes:
    width_multiplier: 0.75, 1.0, 1.25, 1.4 in the paper (any positive value works).
    attention: AAConv settings, or None.
    attention_stages: indices into MNASNET_A1_STAGES of the augmented stages.
    attention_pool_stages: augmented stages whose attention input is pooled by 2.
    attention_max_size: instead of ``attention_pool_stages`` (leave that empty), pool the
      attention input of every augmented layer larger than this by the smallest factor p that
      brings it to at most ``attention_max_size`` on each side (p = ceil(side / max size)).
    dropout_rate: dropout before the classifier.
  """
  num_classes: int
  width_multiplier: float = 1.0
  attention: Optional[AttentionSettings] = None
  attention_stages: tuple = (1, 2, 3, 4, 5)
  attention_pool_stages: tuple = (1,)
  attention_max_size: Optional[int] = None
  dropout_rate: float = 0.2
  dtype: Dtype = jnp.float32

  def _attention_pool(self, stage: int, size: tuple[int, int]) -> Optional[int]:
    """Pool factor of an augmented expansion conv whose input is ``size`` (H, W)."""
    if self.attention_max_size is None:
      return 2 if stage in self.attention_pool_stages else None
    factor = -(-max(size) // self.attention_max_size)
    return factor if factor > 1 else None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    check_images(images, "MnasNet")
    if not self.width_multiplier > 0:
      raise ValueError(f"width_multiplier must be > 0, got {self.width_multiplier}")
    stages = (*self.attention_stages, *self.attention_pool_stages) if self.attention else ()
    bad = [s for s in stages if not 0 <= s < len(MNASNET_A1_STAGES)]
    if bad:
      raise ValueError(f"attention stages {bad} out of range (valid: "
                       f"0..{len(MNASNET_A1_STAGES) - 1})")
    if self.attention_max_size is not None:
      if not isinstance(self.attention_max_size, int) or self.attention_max_size < 1:
        raise ValueError(f"attention_max_size must be None or an int >= 1, got "
                         f"{self.attention_max_size!r}")
      if self.attention_pool_stages:
        raise ValueError(f"set attention_pool_stages=() with attention_max_size (one pooling "
                         f"rule at a time), got {tuple(self.attention_pool_stages)}")
    stem = round_filters(32, self.width_multiplier)
    x = conv(stem, 3, 2, self.dtype, "stem_conv")(images.astype(self.dtype))
    x = nn.relu(batch_norm(train, self.dtype, "stem_bn", momentum=0.99, epsilon=1e-3)(x))
    # Separable conv: depthwise 3x3 + pointwise 1x1 to 16 channels, no skip.
    x = conv(stem, 3, 1, self.dtype, "sep_depthwise_conv", groups=stem)(x)
    x = nn.relu(batch_norm(train, self.dtype, "sep_depthwise_bn", momentum=0.99,
                           epsilon=1e-3)(x))
    x = conv(round_filters(16, self.width_multiplier), 1, 1, self.dtype, "sep_project_conv")(x)
    x = batch_norm(train, self.dtype, "sep_project_bn", momentum=0.99, epsilon=1e-3)(x)
    for stage, spec in enumerate(MNASNET_A1_STAGES):
      augmented = self.attention is not None and stage in self.attention_stages
      for index in range(spec.repeats):
        x = MBConv(filters=round_filters(spec.filters, self.width_multiplier),
                   expand_ratio=spec.expand_ratio, kernel_size=spec.kernel_size,
                   strides=spec.strides if index == 0 else 1,
                   squeeze_excite=spec.squeeze_excite,
                   attention=self.attention if augmented else None,
                   attention_pool=self._attention_pool(stage, x.shape[1:3]),
                   dtype=self.dtype, name=f"stage{stage + 1}_block{index + 1}")(x, train)
    x = conv(1280, 1, 1, self.dtype, "head_conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, "head_bn", momentum=0.99, epsilon=1e-3)(x))
    return classifier_head(x, self.num_classes, self.dtype, self.dropout_rate, train)
