"""Optimisers and learning-rate schedules from ``config.optimizer``.

* Peak LR = ``base_learning_rate * batch_size / 256``, reached by a linear warm-up from 0 over
  ``warmup_epochs`` (a run not longer than that warms up over a tenth of its steps), then ``schedule``: ``cosine`` (to 0 at the last step), ``exponential``
  (staircase, ``decay_rate`` every ``decay_epochs``, the MnasNet recipe) or ``constant``.
* ``sgd``: momentum (``nesterov`` optional). ``rmsprop``: TF-style RMSProp (``rmsprop_decay``,
  ``rmsprop_eps`` inside the root, momentum). Both add ``weight_decay * w`` to the gradient of
  every convolution/dense ``kernel`` (L2 regularisation; biases, BN and relative tables are
  not decayed). ``grad_clip_norm > 0`` clips the global gradient norm first.
"""

from __future__ import annotations

import optax
from absl import logging

from aa_flax.errors import ConfigError

OPTIMIZERS = ("sgd", "rmsprop")
SCHEDULES = ("cosine", "exponential", "constant")


def peak_learning_rate(opt_config, batch_size: int) -> float:
  return opt_config.base_learning_rate * batch_size / 256.0


def create_learning_rate_schedule(opt_config, batch_size: int, steps_per_epoch: float,
                                  total_steps: int) -> optax.Schedule:
  """``step -> learning rate`` for ``total_steps`` steps of ``batch_size`` examples."""
  if opt_config.schedule not in SCHEDULES:
    raise ConfigError(f"Unknown config.optimizer.schedule={opt_config.schedule!r}; valid: "
                      f"{', '.join(SCHEDULES)}.")
  peak = peak_learning_rate(opt_config, batch_size)
  warmup_steps = int(round(opt_config.warmup_epochs * steps_per_epoch))
  if warmup_steps and warmup_steps >= total_steps:  # e.g. a smoke run of a few steps
    shortened = total_steps // 10
    logging.warning("config.optimizer.warmup_epochs=%s (%d steps) is not shorter than training "
                    "(%d steps); warming up over %d steps (a tenth of training) for this run.",
                    opt_config.warmup_epochs, warmup_steps, total_steps, shortened)
    warmup_steps = shortened
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  if opt_config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))
  elif opt_config.schedule == "exponential":
    after = optax.exponential_decay(
        peak, transition_steps=max(int(round(opt_config.decay_epochs * steps_per_epoch)), 1),
        decay_rate=opt_config.decay_rate, staircase=True)
  else:
    after = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def _is_kernel(path, _) -> bool:
  return getattr(path[-1], "key", None) == "kernel"


def create_optimizer(opt_config, learning_rate: optax.Schedule) -> optax.GradientTransformation:
  """The ``optax`` chain for ``opt_config.name`` (see the module docstring)."""
  import jax
  if opt_config.name not in OPTIMIZERS:
    raise ConfigError(f"Unknown config.optimizer.name={opt_config.name!r}; valid: "
                      f"{', '.join(OPTIMIZERS)}.")
  chain = []
  if opt_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  if opt_config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(
        opt_config.weight_decay, mask=lambda params: jax.tree_util.tree_map_with_path(
            _is_kernel, params)))
  if opt_config.name == "sgd":
    chain.append(optax.sgd(learning_rate, momentum=opt_config.momentum,
                           nesterov=opt_config.nesterov))
  else:
    chain.append(optax.rmsprop(learning_rate, decay=opt_config.rmsprop_decay,
                               eps=opt_config.rmsprop_eps, momentum=opt_config.momentum,
                               eps_in_sqrt=True))
  return optax.chain(*chain)
