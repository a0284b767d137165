"""ResNet v1.5 (stride on the 3x3 conv), with optional attention augmentation and SE.

Placement (docs/SPECIFICATION.md §2): AA-ResNet-50/101/152 replace the 3x3 conv of every
bottleneck block in the augmented stages with an AAConv (N_h=8, κ=0.2, υ=0.1); AA-ResNet-34
replaces the first 3x3 conv of each basic block (κ=υ=0.25). The attention input of the stages
listed in ``attention_pool_stages`` (the 28x28 stage on ImageNet) is average-pooled by 2.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax.layers import SqueezeExcite
from aa_flax.models.block_attention import block_attention_placement, make_block_attention
from aa_flax.models.common import (AttentionSettings, batch_norm, check_images,
                                   classifier_head, conv, make_aaconv)

Dtype = Any


class _ResidualBlock(nn.Module):
  """Shared fields of the basic and bottleneck blocks. ``[B, H, W, C] -> [B, H/s, W/s, C']``."""
  filters: int
  strides: int = 1
  attention: Optional[AttentionSettings] = None
  attention_pool: Optional[int] = None
  se_reduction: Optional[int] = None
  block_attention: Optional[str] = None
  dtype: Dtype = jnp.float32

  def _first_spatial_conv(self, x, filters, strides, name):
    """The conv that attention augments: a 3x3 conv or an AAConv."""
    if self.attention is not None:
      return make_aaconv(self.attention, filters, 3, strides, self.attention_pool, self.dtype,
                         name)(x)
    return conv(filters, 3, strides, self.dtype, name)(x)

  def _finish(self, x, residual, train, out_filters):
    """SE / block attention on the residual branch, projection shortcut, add, ReLU."""
    if self.se_reduction:
      residual = SqueezeExcite(max(1, out_filters // self.se_reduction), dtype=self.dtype,
                               name="se")(residual)
    if self.block_attention:
      residual = make_block_attention(self.block_attention, self.dtype,
                                      self.block_attention)(residual, train)
    if x.shape != residual.shape:
      x = conv(out_filters, 1, self.strides, self.dtype, "proj_conv")(x)
      x = batch_norm(train, self.dtype, "proj_bn")(x)
    return nn.relu(x + residual)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs; the first is augmented in AA models."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = self._first_spatial_conv(x, self.filters, self.strides, "conv1")
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.filters, 3, 1, self.dtype, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2", zero_init=True)(y)
    return self._finish(x, y, train, self.filters)


class BottleneckBlock(_ResidualBlock):
  """1x1 -> 3x3 (strided, augmented in AA models) -> 1x1 with 4x expansion."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(self.filters, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = self._first_spatial_conv(y, self.filters, self.strides, "conv2")
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = conv(self.filters * 4, 1, 1, self.dtype, "conv3")(y)
    y = batch_norm(train, self.dtype, "bn3", zero_init=True)(y)
    return self._finish(x, y, train, self.filters * 4)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
  """ResNet v1.5. ``images [B, H, W, C] -> logits [B, num_classes]`` (float32).

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: "basic" or "bottleneck".
    width: filters of the first stage (doubled each stage).
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, for 32x32 inputs).
    attention: AAConv settings, or None for no augmentation.
    attention_stages: indices of the augmented stages (0-based).
    attention_pool_stages: augmented stages whose attention input is pooled by 2.
    se_reduction: squeeze-excite reduction (16 in SE-ResNets), or None.
    block_attention: a module of ``block_attention.BLOCK_ATTENTION_KINDS`` ("bam", "cbam",
      "gala", "ge_theta", ...), placed on every residual branch or after every stage but
      the last, as the module defines; or None.
  """
  stage_sizes: Sequence[int]
  block: str
  num_classes: int
  width: int = 64
  stem: str = "imagenet"
  attention: Optional[AttentionSettings] = None
  attention_stages: Sequence[int] = (1, 2, 3)
  attention_pool_stages: Sequence[int] = ()
  se_reduction: Optional[int] = None
  block_attention: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    check_images(images, "ResNet")
    if self.block not in BLOCKS:
      raise ValueError(f"block {self.block!r} is not one of {tuple(BLOCKS)}")
    if self.stem not in STEMS:
      raise ValueError(f"stem {self.stem!r} is not one of {STEMS}")
    if not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f"width must be a positive int, got {self.width!r}")
    if not self.stage_sizes or any(not isinstance(n, int) or n < 1 for n in self.stage_sizes):
      raise ValueError(f"stage_sizes must be a non-empty sequence of positive ints, got "
                       f"{self.stage_sizes!r}")
    if self.se_reduction is not None and self.se_reduction < 1:
      raise ValueError(f"se_reduction must be None or >= 1, got {self.se_reduction!r}")
    stages = (*self.attention_stages, *self.attention_pool_stages) if self.attention else ()
    bad_stages = [s for s in stages if not 0 <= s < len(self.stage_sizes)]
    if bad_stages:
      raise ValueError(f"attention stages {bad_stages} out of range for "
                       f"{len(self.stage_sizes)} stages (valid: 0..{len(self.stage_sizes) - 1})")
    placement = block_attention_placement(self.block_attention) if self.block_attention else None
    block_cls = BLOCKS[self.block]
    x = images.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.width, 7, 2, self.dtype, "stem_conv")(x)
      x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    else:
      x = conv(self.width, 3, 1, self.dtype, "stem_conv")(x)
      x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      augmented = self.attention is not None and stage in self.attention_stages
      for index in range(num_blocks):
        x = block_cls(
            filters=self.width * 2 ** stage,
            strides=2 if stage > 0 and index == 0 else 1,
            attention=self.attention if augmented else None,
            attention_pool=2 if stage in self.attention_pool_stages else None,
            se_reduction=self.se_reduction,
            block_attention=self.block_attention if placement == "residual" else None,
            dtype=self.dtype, name=f"stage{stage + 1}_block{index + 1}")(x, train)
      if placement == "stage" and stage < len(self.stage_sizes) - 1:
        x = make_block_attention(self.block_attention, self.dtype,
                                 f"stage{stage + 1}_{self.block_attention}")(x, train)
    return classifier_head(x, self.num_classes, self.dtype)
