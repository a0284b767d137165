"""Wide ResNet (pre-activation, Zagoruyko & Komodakis) for 32x32 CIFAR images.

Placement (docs/SPECIFICATION.md §2): AA-WRN-28-10 replaces the first 3x3 conv of every residual
block with an AAConv (N_h=8, κ=0.2, υ=0.1, d_k^h >= 20), without attention pooling.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax.layers import SqueezeExcite
from aa_flax.models.block_attention import block_attention_placement, make_block_attention
from aa_flax.models.common import (AttentionSettings, batch_norm, check_images,
                                   classifier_head, conv, make_aaconv)

Dtype = Any


class WideBlock(nn.Module):
  """BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3(-SE / block attention), plus identity
  or 1x1 shortcut."""
  filters: int
  strides: int = 1
  dropout_rate: float = 0.0
  attention: Optional[AttentionSettings] = None
  se_reduction: Optional[int] = None
  block_attention: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    preact = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    if self.attention is not None:
      y = make_aaconv(self.attention, self.filters, 3, self.strides, None, self.dtype,
                      "conv1")(preact)
    else:
      y = conv(self.filters, 3, self.strides, self.dtype, "conv1")(preact)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.filters, 3, 1, self.dtype, "conv2")(y)
    if self.se_reduction:
      y = SqueezeExcite(max(1, self.filters // self.se_reduction), dtype=self.dtype,
                        name="se")(y)
    if self.block_attention:
      y = make_block_attention(self.block_attention, self.dtype, self.block_attention)(y, train)
    if x.shape != y.shape:
      x = conv(self.filters, 1, self.strides, self.dtype, "proj_conv")(preact)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-widen. ``images [B, H, W, C] -> logits [B, num_classes]`` (float32).

  ``depth = 6 n + 4`` gives n blocks in each of three groups of 16k, 32k, 64k filters.
  ``block_attention`` names a module of ``block_attention.BLOCK_ATTENTION_KINDS``, placed on
  every residual branch (after the second conv) or after the first two groups.
  """
  num_classes: int
  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.0
  attention: Optional[AttentionSettings] = None
  se_reduction: Optional[int] = None
  block_attention: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    check_images(images, "WideResNet")
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
    if self.widen_factor < 1:
      raise ValueError(f"widen_factor must be >= 1, got {self.widen_factor}")
    placement = block_attention_placement(self.block_attention) if self.block_attention else None
    blocks_per_group = (self.depth - 4) // 6
    x = conv(16, 3, 1, self.dtype, "stem_conv")(images.astype(self.dtype))
    for group in range(3):
      for index in range(blocks_per_group):
        x = WideBlock(filters=16 * self.widen_factor * 2 ** group,
                      strides=2 if group > 0 and index == 0 else 1,
                      dropout_rate=self.dropout_rate, attention=self.attention,
                      se_reduction=self.se_reduction,
                      block_attention=self.block_attention if placement == "residual" else None,
                      dtype=self.dtype, name=f"group{group + 1}_block{index + 1}")(x, train)
      if placement == "stage" and group < 2:
        x = make_block_attention(self.block_attention, self.dtype,
                                 f"group{group + 1}_{self.block_attention}")(x, train)
    x = nn.relu(batch_norm(train, self.dtype, "final_bn")(x))
    return classifier_head(x, self.num_classes, self.dtype)
