"""Model variables as shapes (``jax.eval_shape`` of init), traced once per test process.

Tracing a large model takes seconds, and the count, placement and shape tests of several
modules look at the same models.
"""

import functools

import jax
import jax.numpy as jnp

from aa_flax.models import create_model


@functools.cache
def abstract_variables(name, height, width, classes=1000, **overrides):
  """Variable shapes of ``create_model(name, classes, **overrides)`` on ``height x width``."""
  model = create_model(name, classes, **overrides)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
                        images)


def flat_params(name, size, classes=1000, **overrides):
  """``{"scope/.../name": shape}`` of the parameters on ``size x size`` images."""
  variables = abstract_variables(name, size, size, classes, **overrides)
  return {"/".join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])}
