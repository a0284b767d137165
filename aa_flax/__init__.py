"""aa_flax: Attention Augmented Convolutional Networks (Bello et al., ICCV 2019) in JAX/Flax."""

from importlib import metadata

from aa_flax import attention, layers

__all__ = ["__version__", "attention", "evaluate_checkpoint", "layers", "train_and_evaluate"]

try:  # pyproject.toml's version, as installed (pip install . or -e .)
  __version__ = metadata.version("aa_flax")
except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
  __version__ = "0+unknown"


def __getattr__(name):
  # Lazy: the training system pulls in orbax, grain and friends only when asked for.
  if name in ("train_and_evaluate", "evaluate_checkpoint"):
    from aa_flax import trainer
    return getattr(trainer, name)
  raise AttributeError(f"module 'aa_flax' has no attribute {name!r}")
