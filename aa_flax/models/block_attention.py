"""The attention modules attention augmentation is compared with: BAM, CBAM, GALA, gather-excite.

Every module maps a feature map ``[B, H, W, C]`` to one of the same shape and is called as
``module(x, train)``. Its ``placement`` says where ``ResNet`` and ``WideResNet`` put it when
their ``block_attention`` field names it:

* ``"residual"``: on the residual branch of every block, after the branch's last layer and
  before the shortcut is added (where squeeze-and-excitation goes): CBAM, GALA, GE.
* ``"stage"``: on the trunk after every stage but the last, where the next stage downsamples
  (the "bottlenecks" of BAM).

``block_attention`` names (``BLOCK_ATTENTION_KINDS``): ``bam``, ``cbam``, ``gala``,
``ge_theta``, ``ge_theta_minus``, ``ge_theta_plus``. Every reduction ratio is 16, as in each
paper. Where a paper leaves a detail open, the docstring says what we chose; dense layers and
1x1 convs use flax's default (LeCun normal) init with zero biases. Each module sows its
attention maps into the ``intermediates`` collection (stored only when it is mutable).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax.models.common import batch_norm, conv

Dtype = Any


def _hidden(channels: int, reduction: int) -> int:
  return max(1, channels // reduction)


class BAM(nn.Module):
  """Bottleneck attention module (Park et al., BMVC 2018). ``[B, H, W, C] -> [B, H, W, C]``.

  ``out = x * (1 + sigmoid(M_c(x) + M_s(x)))`` where, with r = 16 and dilation d = 4,

  * channel branch ``M_c(x) = BN(W_1 relu(W_0 avgpool(x) + b_0) + b_1)``: ``[B, 1, 1, C]``,
    ``W_0: C -> C/r``, ``W_1: C/r -> C``;
  * spatial branch ``M_s(x) = BN(f_3 relu(f_2 relu(f_1 relu(f_0 x))))``: ``[B, H, W, 1]``,
    ``f_0`` a 1x1 conv ``C -> C/r``, ``f_1``, ``f_2`` 3x3 convs ``C/r -> C/r`` with dilation d,
    ``f_3`` a 1x1 conv ``C/r -> 1`` (all with biases);

  the two are broadcast to ``[B, H, W, C]`` and summed. Placement: ``"stage"`` (three modules
  in a four-stage ResNet). We follow the paper's equations: one BN at the end of each branch
  and the branches summed. The authors' released code differs on both (BN + ReLU after every
  hidden layer, no BN on the branch outputs, branches multiplied), with 2,694 fewer parameters
  in ResNet-50. The paper's MLP has no stated nonlinearity; we use ReLU.
  """
  placement = "stage"
  reduction: int = 16
  dilation: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    hidden = _hidden(channels, self.reduction)
    c = jnp.mean(x, axis=(1, 2), keepdims=True)
    c = nn.relu(nn.Dense(hidden, dtype=self.dtype, name="channel_reduce")(c))
    c = nn.Dense(channels, dtype=self.dtype, name="channel_expand")(c)
    c = batch_norm(train, self.dtype, "channel_bn")(c)
    s = nn.relu(nn.Conv(hidden, (1, 1), dtype=self.dtype, name="spatial_reduce")(x))
    for index in range(2):
      s = nn.relu(nn.Conv(hidden, (3, 3), padding="SAME", kernel_dilation=self.dilation,
                          dtype=self.dtype, name=f"spatial_dilated{index + 1}")(s))
    s = nn.Conv(1, (1, 1), dtype=self.dtype, name="spatial_collapse")(s)
    s = batch_norm(train, self.dtype, "spatial_bn")(s)
    self.sow("intermediates", "channel_logits", c)
    self.sow("intermediates", "spatial_logits", s)
    attention = nn.sigmoid(c + s)
    self.sow("intermediates", "attention_map", attention)
    return x * (1 + attention).astype(x.dtype)


class CBAM(nn.Module):
  """Convolutional block attention module (Woo et al., ECCV 2018). ``[B,H,W,C] -> [B,H,W,C]``.

  Channel attention, then spatial attention, each multiplied in:

  * ``M_c = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``: ``[B, 1, 1, C]``; the MLP
    ``C -> C/r -> C`` (ReLU, biases, r = 16) is shared by both pooled descriptors;
  * ``y = x * M_c``; ``M_s = sigmoid(BN(conv7x7([mean_c(y), max_c(y)])))``: ``[B, H, W, 1]``,
    the same value multiplying every channel at a position; ``out = y * M_s``.

  Placement: ``"residual"`` (every block). The paper writes ``M_s`` without a BN; we add the
  bias-free 7x7 conv + BN of the authors' released code, whose ResNets start that BN's scale
  at zero, so ``M_s`` starts at 0.5 everywhere; we do the same.
  """
  placement = "residual"
  reduction: int = 16
  kernel_size: int = 7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    pooled = jnp.stack([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))])  # [2, B, C]
    h = nn.relu(nn.Dense(_hidden(channels, self.reduction), dtype=self.dtype,
                         name="mlp_reduce")(pooled))
    logits = jnp.sum(nn.Dense(channels, dtype=self.dtype, name="mlp_expand")(h), axis=0)
    channel_map = nn.sigmoid(logits)[:, None, None, :]
    y = x * channel_map.astype(x.dtype)
    descriptor = jnp.concatenate([jnp.mean(y, axis=-1, keepdims=True),
                                  jnp.max(y, axis=-1, keepdims=True)], axis=-1)
    s = conv(1, self.kernel_size, 1, self.dtype, "spatial_conv")(descriptor)
    spatial_map = nn.sigmoid(batch_norm(train, self.dtype, "spatial_bn", zero_init=True)(s))
    self.sow("intermediates", "channel_map", channel_map)
    self.sow("intermediates", "spatial_map", spatial_map)
    return y * spatial_map.astype(x.dtype)


class GALA(nn.Module):
  """Global-and-local attention (Linsley et al., ICLR 2019). ``[B, H, W, C] -> [B, H, W, C]``.

  * global ``G = W_2 relu(W_1 avgpool(x) + b_1) + b_2``: ``[B, 1, 1, C]`` (SE's MLP, C -> C/r
    -> C, without its sigmoid);
  * local ``S = V_2 relu(V_1 x + c_1) + c_2``: ``[B, H, W, 1]``, two 1x1 convs C -> C/r -> 1;
  * ``A = tanh(a * (G + S) + m * (G * S))``: ``[B, H, W, C]``, with learned ``a, m`` of
    shape ``[C]`` weighting the additive and multiplicative integration; ``out = x * A``.

  r = 16 for both paths. Placement: ``"residual"`` (every block, where SE goes). Choices the
  paper leaves open: ``a`` and ``m`` start at 1 (both integrations on); the local path's
  reduction is the global path's (this is what gives the paper's ResNet-50 count). Note that
  ``tanh`` lets A be negative, as the paper writes it (the authors' later TPU code squashes
  with a sigmoid instead).
  """
  placement = "residual"
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # no batch statistics
    channels = x.shape[-1]
    hidden = _hidden(channels, self.reduction)
    g = jnp.mean(x, axis=(1, 2), keepdims=True)
    g = nn.relu(nn.Dense(hidden, dtype=self.dtype, name="global_reduce")(g))
    g = nn.Dense(channels, dtype=self.dtype, name="global_expand")(g)
    s = nn.relu(nn.Conv(hidden, (1, 1), dtype=self.dtype, name="local_reduce")(x))
    s = nn.Conv(1, (1, 1), dtype=self.dtype, name="local_collapse")(s)
    additive = self.param("additive_weight", nn.initializers.ones, (channels,))
    multiplicative = self.param("multiplicative_weight", nn.initializers.ones, (channels,))
    attention = jnp.tanh(additive.astype(self.dtype) * (g + s)
                         + multiplicative.astype(self.dtype) * (g * s))
    self.sow("intermediates", "global_logits", g)
    self.sow("intermediates", "local_logits", s)
    self.sow("intermediates", "attention_map", attention)
    return x * attention.astype(x.dtype)


GE_VARIANTS = ("theta_minus", "theta", "theta_plus")


class GatherExcite(nn.Module):
  """Gather-excite with global extent (Hu et al., NeurIPS 2018). ``[B,H,W,C] -> [B,H,W,C]``.

  ``out = x * sigmoid(excite(gather(x)))`` with ``gather(x)``: ``[B, 1, 1, C]``:

  * ``theta_minus`` (GE-θ⁻, no parameters): gather = mean over H, W; excite = identity.
  * ``theta`` (GE-θ): gather = BN(depthwise conv whose kernel covers the whole map, no bias),
    i.e. a learned ``[H, W, C]`` weighting of every position; excite = identity.
  * ``theta_plus`` (GE-θ⁺): GE-θ's gather, ReLU, then SE's excite ``W_2 relu(W_1 . + b_1) +
    b_2`` (C -> C/16 -> C).

  With global extent the paper's excite interpolation is a broadcast. The θ and θ⁺ gather
  kernels are sized from the feature map at init (56, 28, 14, 7 in a 224 px ResNet-50), so a
  model holding them runs at another image size only after
  ``aa_flax.resolution.convert_variables``. Placement:
  ``"residual"``. Smaller extents (strided gathers + nearest upsampling) are not implemented.
  """
  placement = "residual"
  variant: str = "theta"
  reduction: int = 16
  dtype: Dtype = jnp.float32

  def _gather_kernel(self, height: int, width: int, channels: int) -> jax.Array:
    shape = (height, width, channels)
    if self.has_variable("params", "kernel"):
      existing = self.get_variable("params", "kernel").shape
      if existing != shape:
        where = "/".join(self.scope.path) or "(top level)"
        raise ValueError(
            f"GatherExcite at {where}: the feature map is {height}x{width}x{channels} but the "
            f"gather kernel was initialised for {existing[0]}x{existing[1]}x{existing[2]}; "
            f"GE-θ gathers with a kernel the size of the map; convert the variables with "
            f"aa_flax.resolution.convert_variables, or use the image size they were made for.")
    fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=(0, 1), out_axis=-1)
    return self.param("kernel", fan_in, shape)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.variant not in GE_VARIANTS:
      raise ValueError(f"GatherExcite variant {self.variant!r} is not one of {GE_VARIANTS}")
    _, height, width, channels = x.shape
    if self.variant == "theta_minus":
      gathered = jnp.mean(x, axis=(1, 2), keepdims=True)
    else:
      kernel = self._gather_kernel(height, width, channels).astype(self.dtype)
      gathered = jnp.einsum("bhwc,hwc->bc", x.astype(self.dtype), kernel)[:, None, None, :]
      gathered = batch_norm(train, self.dtype, "gather_bn")(gathered)
    if self.variant == "theta_plus":
      h = nn.relu(nn.Dense(_hidden(channels, self.reduction), dtype=self.dtype,
                           name="excite_reduce")(nn.relu(gathered)))
      gathered = nn.Dense(channels, dtype=self.dtype, name="excite_expand")(h)
    gate = nn.sigmoid(gathered)
    self.sow("intermediates", "gate", gate)
    return x * gate.astype(x.dtype)


# name -> (module class, its keyword arguments)
BLOCK_ATTENTION_KINDS: dict[str, tuple[type, dict[str, Any]]] = {
    "bam": (BAM, {}),
    "cbam": (CBAM, {}),
    "gala": (GALA, {}),
    "ge_theta": (GatherExcite, dict(variant="theta")),
    "ge_theta_minus": (GatherExcite, dict(variant="theta_minus")),
    "ge_theta_plus": (GatherExcite, dict(variant="theta_plus")),
}


def block_attention_placement(kind: str) -> str:
  """``"residual"`` or ``"stage"`` for a ``BLOCK_ATTENTION_KINDS`` name (ValueError if unknown)."""
  if kind not in BLOCK_ATTENTION_KINDS:
    raise ValueError(f"block_attention {kind!r} is not one of {tuple(BLOCK_ATTENTION_KINDS)}")
  return BLOCK_ATTENTION_KINDS[kind][0].placement


def make_block_attention(kind: str, dtype: Dtype, name: str) -> nn.Module:
  """The module a ``block_attention`` name stands for."""
  block_attention_placement(kind)
  cls, kwargs = BLOCK_ATTENTION_KINDS[kind]
  return cls(dtype=dtype, name=name, **kwargs)
