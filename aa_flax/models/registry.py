"""Name -> model constructor registry for every model of the paper's tables.

``create_model(name, num_classes, dtype=..., **overrides)`` builds a linen module. Overrides
named like a field of ``AttentionSettings`` (``position_encoding``, ``num_heads``,
``key_ratio``, ``attention_impl``, ...) change the attention of augmented models; any other
override must be a field of the model class (``width``, ``stem``, ``attention_pool_stages``,
``dropout_rate``, ...).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aa_flax.models.common import ATTENTION_SETTING_NAMES, AttentionSettings
from aa_flax.models.mnasnet import MnasNet
from aa_flax.models.resnet import ResNet
from aa_flax.models.wide_resnet import WideResNet

RESNET_LAYOUTS = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
}
MNASNET_WIDTHS = ("0.75", "1.0", "1.25", "1.4")
FULLY_ATTENTIONAL_RATIOS = ("0.25", "0.5", "0.75", "1.0")

# docs/SPECIFICATION.md §2. Bottleneck ResNets: κ=0.2, υ=0.1; basic-block ResNets: κ=υ=0.25.
AA_BOTTLENECK = AttentionSettings(key_ratio=0.2, value_ratio=0.1)
AA_BASIC = AttentionSettings(key_ratio=0.25, value_ratio=0.25)
AA_MNASNET = AttentionSettings(key_ratio=0.1, value_ratio=0.05, num_heads=4,
                               min_key_depth_per_head=0)
AA_TINY = AttentionSettings(key_ratio=0.25, value_ratio=0.25, num_heads=4,
                            min_key_depth_per_head=8)
# Registry prefix -> block_attention module (see models/block_attention.py). GE-ResNets use
# GE-θ, the variant whose ResNet-50 count is the paper's; GE-WRN uses the parameter-free GE-θ⁻,
# which leaves the WRN count unchanged, as the paper's GE-WRN row does.
BLOCK_ATTENTION_RESNETS = {"bam": "bam", "cbam": "cbam", "gala": "gala", "ge": "ge_theta"}


def _build_registry() -> dict[str, tuple[type, dict[str, Any]]]:
  registry: dict[str, tuple[type, dict[str, Any]]] = {}
  for depth, (stages, block) in RESNET_LAYOUTS.items():
    base = dict(stage_sizes=stages, block=block)
    aa = AA_BASIC if block == "basic" else AA_BOTTLENECK
    registry[f"resnet{depth}"] = (ResNet, base)
    # The 28x28 stage (index 1 at 224 px) pools its attention input on ImageNet.
    registry[f"aa_resnet{depth}"] = (ResNet, dict(base, attention=aa,
                                                  attention_pool_stages=(1,)))
    if depth != 18:
      registry[f"se_resnet{depth}"] = (ResNet, dict(base, se_reduction=16))
    for prefix, kind in BLOCK_ATTENTION_RESNETS.items():
      registry[f"{prefix}_resnet{depth}"] = (ResNet, dict(base, block_attention=kind))
  for ratio in FULLY_ATTENTIONAL_RATIOS:
    registry[f"fa_resnet50_{ratio}"] = (ResNet, dict(
        stage_sizes=RESNET_LAYOUTS[50][0], block="bottleneck", attention_pool_stages=(1,),
        attention=AttentionSettings(key_ratio=float(ratio), value_ratio=float(ratio))))
  registry["wrn28_10"] = (WideResNet, {})
  registry["aa_wrn28_10"] = (WideResNet, dict(attention=AA_BOTTLENECK))
  registry["se_wrn28_10"] = (WideResNet, dict(se_reduction=16))
  registry["ge_wrn28_10"] = (WideResNet, dict(block_attention="ge_theta_minus"))
  for width in MNASNET_WIDTHS:
    registry[f"mnasnet_{width}"] = (MnasNet, dict(width_multiplier=float(width)))
    registry[f"aa_mnasnet_{width}"] = (MnasNet, dict(width_multiplier=float(width),
                                                     attention=AA_MNASNET))
  # Small models for CPU runs, tests and the embedded default (any image size >= 4 px).
  tiny = dict(stage_sizes=(1, 1, 1), block="basic", width=16, stem="cifar",
              attention_stages=(1, 2))
  registry["resnet_tiny"] = (ResNet, tiny)
  registry["aa_resnet_tiny"] = (ResNet, dict(tiny, attention=AA_TINY))
  return registry


_REGISTRY = _build_registry()


def list_models() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


# Model-class fields that are not user settings: set by create_model itself or by flax.
_RESERVED_FIELDS = ("parent", "name", "num_classes", "dtype", "attention")


def _plain_type(hint) -> type | None:
  """``int``, ``float``, ``str``, ``bool`` or ``tuple`` for a field's type hint (``Optional``
  unwrapped, sequences as ``tuple``); ``None`` for anything else."""
  if typing.get_origin(hint) is typing.Union:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if len(args) == 1 else None
  origin = typing.get_origin(hint) or hint
  if origin in (int, float, str, bool):
    return origin
  if origin in (tuple, list) or (isinstance(origin, type)
                                 and issubclass(origin, typing.Sequence) and origin is not str):
    return tuple
  return None


def model_options() -> dict[str, tuple[type, tuple[str, ...]]]:
  """Every model field a user may set, over all registered classes.

  Returns ``{field: (type, class names that have it)}``; ``type`` is ``int``, ``float``,
  ``str``, ``bool`` or ``tuple``. These are the ``create_model`` overrides besides the
  attention settings (and the ``config.model.<field>`` keys of every training config).
  """
  options: dict[str, tuple[type, tuple[str, ...]]] = {}
  for cls in sorted({cls for cls, _ in _REGISTRY.values()}, key=lambda c: c.__name__):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
      kind = _plain_type(hints.get(field.name))
      if field.name in _RESERVED_FIELDS or kind is None:
        continue
      known_kind, owners = options.get(field.name, (kind, ()))
      if known_kind is not kind:
        raise TypeError(f"model field {field.name!r} has type {kind} in {cls.__name__} but "
                        f"{known_kind} in {owners}; one setting needs one type")
      options[field.name] = (kind, (*owners, cls.__name__))
  return options


def attention_options() -> dict[str, type]:
  """``{setting: type}`` for every attention setting of augmented models."""
  defaults = AttentionSettings()
  return {name: type(getattr(defaults, name)) for name in ATTENTION_SETTING_NAMES}


def model_spec(name: str) -> tuple[type, dict[str, Any]]:
  """The model class and its registered keyword arguments (a copy)."""
  if name not in _REGISTRY:
    import difflib
    names = list_models()
    closest = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    raise ValueError(f"unknown model {name!r}; closest: {', '.join(closest) or 'none'} (all "
                     f"{len(names)}: aa_flax.models.list_models())")
  cls, kwargs = _REGISTRY[name]
  return cls, dict(kwargs)


def create_model(name: str, num_classes: int, *, dtype=jnp.float32, **overrides) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of ``list_models()``.
    num_classes: size of the classifier.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision; parameters stay float32).
    **overrides: attention settings (see ``AttentionSettings``) or model fields.

  Returns:
    A linen module; ``model.apply(variables, images [B, H, W, C], train=...)`` gives float32
    logits ``[B, num_classes]``.
  """
  cls, kwargs = model_spec(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  attention_overrides = {k: overrides.pop(k) for k in list(overrides)
                         if k in ATTENTION_SETTING_NAMES}
  if attention_overrides:
    if kwargs.get("attention") is None:
      raise ValueError(f"model {name!r} has no attention, so attention settings "
                       f"{sorted(attention_overrides)} cannot apply; use an aa_ model")
    kwargs["attention"] = dataclasses.replace(kwargs["attention"], **attention_overrides)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for {name!r} ({cls.__name__}); valid: "
                     f"{sorted(fields | set(ATTENTION_SETTING_NAMES))}")
  kwargs.update(overrides)
  return cls(num_classes=num_classes, dtype=dtype, **kwargs)
