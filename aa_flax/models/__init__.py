"""Model zoo and registry: ``create_model(name, num_classes, **overrides)``, ``list_models()``."""

from aa_flax.models.common import AttentionSettings
from aa_flax.models.mnasnet import MnasNet
from aa_flax.models.registry import create_model, list_models, model_spec
from aa_flax.models.resnet import ResNet
from aa_flax.models.wide_resnet import WideResNet

__all__ = ["AttentionSettings", "MnasNet", "ResNet", "WideResNet", "create_model",
           "list_models", "model_spec"]
