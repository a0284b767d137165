"""Building blocks shared by the model families: attention settings, conv/BN helpers, head."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax import layers
from aa_flax.layers import AAConv

Dtype = Any

# He init on fan-out, the usual choice for ResNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_settings(settings) -> None:
  layers.check_attention_settings(**dataclasses.asdict(settings))


# The settings are AAConv's own fields (same names, types and defaults), so they cannot drift
# apart, and are validated by the function AAConv uses, when a model is created.
AttentionSettings = dataclasses.make_dataclass(
    "AttentionSettings",
    [(field.name, field.type, dataclasses.field(default=field.default))
     for field in dataclasses.fields(AAConv) if field.name in layers.ATTENTION_SETTING_NAMES],
    frozen=True,
    namespace={"__post_init__": _check_settings, "__module__": __name__})
AttentionSettings.__doc__ = """Settings of every AAConv in a model: the AAConv fields named in
``aa_flax.layers.ATTENTION_SETTING_NAMES``, with AAConv's defaults.

``key_ratio``/``value_ratio`` are κ and υ; ``num_heads`` is N_h; ``min_key_depth_per_head`` is
the d_k^h floor (20 for the ResNets and WRN, 0 for MnasNet, whose parameter counts only match
without it); ``position_encoding`` and ``relative_method`` as in AAConv; ``attention_impl``
picks how attention runs (any of ``aa_flax.kernels.ATTENTION_IMPLS``, e.g. ``"auto"`` for the
backend's best path); ``remat`` recomputes the attention in the
backward pass to save memory. Invalid values raise ``ValueError`` at construction.
"""
ATTENTION_SETTING_NAMES = layers.ATTENTION_SETTING_NAMES


def make_aaconv(settings: AttentionSettings, features: int, kernel_size, strides: int,
                attention_pool: Optional[int], dtype: Dtype, name: str) -> AAConv:
  """An AAConv configured from ``settings`` (the one place models build attention)."""
  return AAConv(features, kernel_size=kernel_size, strides=strides,
                attention_pool=attention_pool, dtype=dtype, kernel_init=conv_kernel_init,
                name=name, **dataclasses.asdict(settings))


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

