"""aa_flax: Attention Augmented Convolutional Networks (Bello et al., ICCV 2019) in JAX/Flax."""

from aa_flax import attention, layers

__all__ = ["attention", "layers"]
