"""Building blocks shared by the model families: attention settings, conv/BN helpers, head."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax.layers import AAConv

Dtype = Any

# He init on fan-out, the usual choice for ResNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
  """Settings of every AAConv in a model (PAPER.md section 2).

  ``key_ratio``/``value_ratio`` are κ and υ; ``min_key_depth_per_head`` is the d_k^h floor
  (20 for the ResNets and WRN, 0 for MnasNet, whose parameter counts only match without it).
  ``attention_impl`` picks the attention kernel ("xla" or "pallas"); ``remat`` recomputes the
  attention branch in the backward pass to save memory.
  """
  key_ratio: float = 0.2
  value_ratio: float = 0.1
  num_heads: int = 8
  min_key_depth_per_head: int = 20
  position_encoding: str = "relative"
  relative_method: str = "gather"
  attention_impl: str = "xla"
  remat: bool = False

  def __post_init__(self):
    # Validate once, when a model is created, with the checks AAConv itself applies
    # (ratios, heads, encodings, methods); value_ratio <= 1 keeps d_v <= features for any F.
    heads = self.num_heads if isinstance(self.num_heads, int) and self.num_heads > 0 else 1
    probe = make_aaconv(self, features=64 * heads, kernel_size=3, strides=1, attention_pool=None,
                        dtype=jnp.float32, name=None)
    probe.validate()


ATTENTION_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(AttentionSettings))


def make_aaconv(settings: AttentionSettings, features: int, kernel_size, strides: int,
                attention_pool: Optional[int], dtype: Dtype, name: str) -> AAConv:
  """An AAConv configured from ``settings`` (the one place models build attention)."""
  return AAConv(features, kernel_size=kernel_size, strides=strides,
                key_ratio=settings.key_ratio, value_ratio=settings.value_ratio,
                num_heads=settings.num_heads,
                min_key_depth_per_head=settings.min_key_depth_per_head,
                position_encoding=settings.position_encoding,
                relative_method=settings.relative_method,
                attention_impl=settings.attention_impl, remat=settings.remat,
                attention_pool=attention_pool, dtype=dtype, kernel_init=conv_kernel_init,
                name=name)


def conv(features: int, kernel_size: int, strides: int = 1, dtype: Dtype = jnp.float32,
         name: Optional[str] = None, groups: int = 1) -> nn.Conv:
  """Bias-free SAME conv with He fan-out init (a BN always follows)."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides, padding="SAME",
                 use_bias=False, feature_group_count=groups, dtype=dtype,
                 kernel_init=conv_kernel_init, name=name)


def batch_norm(train: bool, dtype: Dtype, name: Optional[str] = None, zero_init: bool = False,
               momentum: float = 0.9, epsilon: float = 1e-5) -> nn.BatchNorm:
  """BatchNorm; under jit over a sharded batch its statistics are global-batch statistics."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, name=name,
                      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)


def classifier_head(x: jax.Array, num_classes: int, dtype: Dtype, dropout_rate: float = 0.0,
                    train: bool = False) -> jax.Array:
  """Global average pool (+ dropout) + dense; ``[B, H, W, C]`` -> f32 logits ``[B, classes]``."""
  x = jnp.mean(x, axis=(1, 2))
  if dropout_rate:
    x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  x = nn.Dense(num_classes, dtype=dtype, name="head")(x)
  return x.astype(jnp.float32)


def check_images(images: jax.Array, model_name: str) -> None:
  if images.ndim != 4:
    raise ValueError(f"{model_name} expects images [B, H, W, C], got shape {images.shape}")

