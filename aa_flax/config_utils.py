"""The shape of every training config, its validation, and config comparison for resume.

Every config in ``configs/`` starts from ``base_config()``, so every key below exists in all
of them and ``--config.<key>=...`` works on top of any config; a key that does not exist
fails loudly in ``config_flags``, and assigning one from Python (``config.num_train_step =
30``) raises ``ConfigError`` naming the closest keys (the config is locked).
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

import ml_collections
from absl import logging
from ml_collections import config_dict

from aa_flax.errors import ConfigError, ConfigMismatchError

NONFINITE_POLICIES = ("stop", "skip")
# Keys that may change between a checkpoint and the run that resumes it: how a run is
# observed, saved, evaluated and fed, not what it trains. Every other key is part of the
# model, the data or the training recipe, and a change is refused (see check_resume_config).
RESUME_FREE_KEYS = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "async_checkpointing", "eval_only", "checkpoint_path", "eval_batch_size", "on_nonfinite",
    "max_skipped_fraction", "allow_config_mismatch", "storage_retry_s", "data.num_threads",
    "data.num_workers",
    "data.prefetch", "data.tfds_data_dir"})


class Config(ml_collections.ConfigDict):
  """A ``ConfigDict`` whose keys are fixed once locked (``base_config`` locks it): assigning
  a key that does not exist raises ``ConfigError`` naming the closest existing keys."""

  def __setitem__(self, key, value):
    if self.is_locked and key not in self:
      prefix = self.__dict__.get("_prefix", "")  # the section's dotted path, set by lock()
      keys = [str(k) for k in self.keys()]
      close = difflib.get_close_matches(str(key), keys, n=3, cutoff=0.6) or sorted(keys)[:8]
      raise ConfigError(f"config.{prefix}{key}: no such config key; closest: "
                        f"{', '.join(prefix + k for k in close)} (every key: docs/CONFIG.md).")
    super().__setitem__(key, value)

  def lock(self) -> "Config":
    super().lock()
    _set_prefixes(self, "")
    return self


def _set_prefixes(section: ml_collections.ConfigDict, prefix: str) -> None:
  object.__setattr__(section, "_prefix", prefix)
  for key, value in section.items():
    if isinstance(value, ml_collections.ConfigDict):
      _set_prefixes(value, f"{prefix}{key}.")


def base_config() -> ml_collections.ConfigDict:
  """Every key a training config has, with neutral defaults (all listed in docs/CONFIG.md);
  locked: assigning a key that does not exist raises ``ConfigError``."""
  config = Config()
  config.seed = 0

  config.model = model_section("resnet50")

  config.data = Config()
  config.data.name = "digits"
  config.data.train_files = ""  # npz: comma-separated paths or globs
  config.data.eval_files = ""
  config.data.tfds_data_dir = ""  # tfds datasets; empty: ~/tensorflow_datasets
  config.data.image_size = 0  # square side after preprocessing; 0: the stored size
  config.data.num_classes = 0  # 0: from the dataset
  config.data.augment = "none"  # none | flip | cifar | inception
  config.data.mean = ()  # per channel, 0..1 scale; empty: from the dataset
  config.data.std = ()
  config.data.num_threads = 4  # grain reader threads per process (shared among its workers)
  config.data.num_workers = -1  # worker processes; -1: auto (tfds datasets on multi-core hosts)
  config.data.prefetch = 8  # batches of look-ahead
  config.data.synthetic = Config()
  config.data.synthetic.channels = 3
  config.data.synthetic.num_classes = 10
  config.data.synthetic.num_train_examples = 10_000
  config.data.synthetic.num_eval_examples = 1_000

  config.batch_size = 256  # global, over all devices and processes
  config.eval_batch_size = 256
  config.num_epochs = 1.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.half_precision = False  # bf16 activations; f32 params, logits and loss
  config.label_smoothing = 0.0

  config.optimizer = Config()
  config.optimizer.name = "sgd"  # sgd | rmsprop
  config.optimizer.base_learning_rate = 0.1  # per 256 examples (scaled by batch/256)
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4  # on kernels only
  config.optimizer.warmup_epochs = 5.0
  config.optimizer.schedule = "cosine"  # cosine | exponential | constant
  config.optimizer.decay_rate = 0.97  # exponential
  config.optimizer.decay_epochs = 2.4
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.rmsprop_eps = 1e-3
  config.optimizer.grad_clip_norm = 0.0  # 0: off

  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: evaluate only at the end
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.async_checkpointing = True

  config.eval_only = False
  config.checkpoint_path = ""  # eval-only: a checkpoint step directory; empty: newest in workdir
  # A checkpoint step directory to start training from (its params and BN statistics, moved to
  # this run's image size; fresh optimizer state), used while the workdir has no checkpoint.
  config.init_from_checkpoint = ""
  config.resample_method = "interpolate"  # interpolate | extend: relative tables at a new size
  config.on_nonfinite = "stop"  # stop | skip (the step's update is dropped)
  config.max_skipped_fraction = 0.1  # skip: fail once more of the steps so far were skipped
  config.allow_config_mismatch = False  # resume despite model/data/recipe changes (warned)
  # Seconds a workdir read or write is retried through a storage outage (HTTP 5xx/429,
  # timeouts) before the run stops with exit status 75.
  config.storage_retry_s = 300.0
  return config.lock()


def model_section(name: str) -> ml_collections.ConfigDict:
  """``config.model``: the registry ``name`` plus a key for every model field and, under
  ``attention``, every attention setting. ``None`` (the default) keeps the model's own value;
  anything else is passed to ``create_model`` (see ``model_overrides``)."""
  from aa_flax.models import registry
  section = Config()
  section.name = name
  section.attention = Config(
      {key: config_dict.placeholder(kind) for key, kind in registry.attention_options().items()})
  for key, (kind, _) in registry.model_options().items():
    section[key] = config_dict.placeholder(kind)
  return section


def model_overrides(model_config) -> dict[str, Any]:
  """The ``create_model`` keyword arguments ``config.model`` sets (keys that are not None)."""
  settings = {key: value for key, value in model_config.items()
              if key not in ("name", "attention") and value is not None}
  settings.update({key: value for key, value in model_config.attention.items()
                   if value is not None})
  return {key: tuple(value) if isinstance(value, list) else value
          for key, value in settings.items()}


def imagenet_base_config(model_name: str) -> ml_collections.ConfigDict:
  """``base_config()`` with the ImageNet settings every ImageNet family shares: 224 px
  Inception crops, global batch 1024, bf16 compute, logging/checkpoint/eval cadence."""
  config = base_config()
  config.model.name = model_name
  config.data.name = "imagenet2012"
  config.data.image_size = 224
  config.data.augment = "inception"
  config.data.num_threads = 16
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.half_precision = True
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 12_510  # every ~10 epochs at batch 1024
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the first invalid value and the valid ones."""
  if config.on_nonfinite not in NONFINITE_POLICIES:
    raise ConfigError(f"Unknown config.on_nonfinite={config.on_nonfinite!r}; valid: "
                      f"{', '.join(NONFINITE_POLICIES)}.")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive.")
  if not config.storage_retry_s >= 0:
    raise ConfigError(f"config.storage_retry_s={config.storage_retry_s} must be >= 0 "
                      "(seconds to retry through a storage outage).")
  if config.eval_every_steps < 0:
    raise ConfigError(f"config.eval_every_steps={config.eval_every_steps} must be >= 0.")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(f"Set config.num_epochs (> 0) or config.num_train_steps (> 0); got "
                      f"{config.num_epochs} and {config.num_train_steps}.")
  if config.data.image_size < 0 or config.data.num_classes < 0:
    raise ConfigError("config.data.image_size and config.data.num_classes must be >= 0 "
                      f"(0: from the data); got {config.data.image_size}, "
                      f"{config.data.num_classes}.")
  from aa_flax.resolution import RESAMPLE_METHODS  # here: it imports jax, this module does not
  if config.resample_method not in RESAMPLE_METHODS:
    raise ConfigError(f"Unknown config.resample_method={config.resample_method!r}; valid: "
                      f"{', '.join(RESAMPLE_METHODS)}.")
  if config.eval_only and config.init_from_checkpoint:
    raise ConfigError("config.init_from_checkpoint starts training; to evaluate a checkpoint "
                      "set config.checkpoint_path instead.")
  _check_range("optimizer.base_learning_rate", config.optimizer.base_learning_rate, 0.0, None)
  _check_range("optimizer.weight_decay", config.optimizer.weight_decay, 0.0, None)
  _check_range("optimizer.grad_clip_norm", config.optimizer.grad_clip_norm, 0.0, None)
  _check_range("optimizer.momentum", config.optimizer.momentum, 0.0, 1.0)
  _check_range("optimizer.warmup_epochs", config.optimizer.warmup_epochs, 0.0, None)
  _check_range("label_smoothing", config.label_smoothing, 0.0, 1.0, upper_open=True)
  _check_range("max_skipped_fraction", config.max_skipped_fraction, 0.0, 1.0)
  for key in ("prefetch", "num_threads"):
    if config.data[key] < 0:
      raise ConfigError(f"config.data.{key}={config.data[key]} is invalid; it must be an "
                        "integer >= 0.")
  _check_normalisation(tuple(config.data.mean), tuple(config.data.std))


def _check_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
  """``config.data.mean``/``std``: both set or both empty; finite; std > 0."""
  for key, values, other in (("mean", mean, "std"), ("std", std, "mean")):
    if values and not (mean and std):
      raise ConfigError(f"config.data.{key}={values} is set but config.data.{other} is not; "
                        "set both (per channel, on a 0..1 pixel scale) or neither (both "
                        "computed from the training images).")
  if not all(math.isfinite(value) for value in mean):
    raise ConfigError(f"config.data.mean={mean} is invalid; it must hold finite numbers (one "
                      "per channel, on a 0..1 pixel scale).")
  if not all(math.isfinite(value) and value > 0 for value in std):
    raise ConfigError(f"config.data.std={std} is invalid; it must hold positive finite "
                      "numbers (one per channel, on a 0..1 pixel scale).")


def _check_range(key: str, value: float, low: float, high: float | None,
                 upper_open: bool = False) -> None:
  """Raises ``ConfigError`` unless ``low <= value <= high`` (``< high`` if ``upper_open``)."""
  above = high is not None and (value >= high if upper_open else value > high)
  if not math.isfinite(value) or value < low or above:
    valid = (f"in [{low}, {high}{')' if upper_open else ']'}" if high is not None
             else f">= {low}")
    raise ConfigError(f"config.{key}={value} is invalid; it must be a finite number {valid}.")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': 1}} -> {'a.b': 1}``; sequences become lists."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  if isinstance(tree, dict):
    if not tree and prefix:
      return {prefix: {}}
    flat = {}
    for key, value in tree.items():
      flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
  if isinstance(tree, tuple):
    tree = list(tree)
  return {prefix: tree}


def resume_section(key: str) -> str:
  """What a (dotted) config key belongs to: ``model``, ``data`` or ``training recipe``."""
  head = key.split(".")[0]
  return head if head in ("model", "data") else "training recipe"


def resume_differences(saved: dict[str, Any], current: ml_collections.ConfigDict
                       ) -> list[tuple[str, Any, Any]]:
  """``(key, saved value, current value)`` for every key outside ``RESUME_FREE_KEYS`` that
  differs between a checkpoint's config and ``current``."""
  old = flatten(saved)
  new = flatten(config_to_dict(current))
  absent = "<absent>"
  return [(key, old.get(key, absent), new.get(key, absent))
          for key in sorted(set(old) | set(new))
          if key not in RESUME_FREE_KEYS and old.get(key, absent) != new.get(key, absent)]


def check_resume_config(differences: list[tuple[str, Any, Any]], allow_mismatch: bool) -> None:
  """Raises ``ConfigMismatchError`` listing ``differences`` (from ``resume_differences``,
  plus any the caller adds, e.g. changed data contents) by section with both values; with
  ``allow_mismatch`` logs them as warnings instead."""
  if not differences:
    return
  sections: dict[str, list[str]] = {}
  for key, old, new in differences:
    sections.setdefault(resume_section(key), []).append(
        f"    {key}: checkpoint {old!r} -> now {new!r}")
  lines = "\n".join(f"  {section}:\n" + "\n".join(entries)
                    for section, entries in sections.items())
  if allow_mismatch:
    for key, old, new in differences:
      logging.warning("Resuming despite a config change (allow_config_mismatch=True): %s: "
                      "checkpoint %r -> now %r", key, old, new)
    return
  raise ConfigMismatchError(
      "The workdir holds checkpoints of a run with a different config:\n"
      f"{lines}\nUse a new --workdir, or pass --config.allow_config_mismatch=True (from Python: "
      "config.allow_config_mismatch = True) to resume anyway (each difference is then logged "
      "as a warning).")


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-safe plain dict of ``config`` (tuples become lists)."""
  import json
  return json.loads(config.to_json_best_effort())


def shipped_configs_dir() -> str:
  """The folder of the configs that ship with aa_flax: ``aa_flax/configs`` in an installed
  package, the repository's ``configs/`` in a checkout (or an editable install)."""
  package_dir = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(package_dir, "configs")
  return installed if os.path.isdir(installed) else \
      os.path.join(os.path.dirname(package_dir), "configs")


def shipped_config_names() -> list[str]:
  """The file names of the shipped configs, e.g. ``['cifar.py', ..., 'default.py', ...]``."""
  folder = shipped_configs_dir()
  return sorted(name for name in os.listdir(folder)
                if name.endswith(".py") and not name.startswith("_")) \
      if os.path.isdir(folder) else []


def resolve_config_spec(spec: str) -> str:
  """``'<path>[:<arg>]'`` with the path made a file that exists: an existing path stays as it
  is; a bare file name (``'cifar.py:aa_wrn28_10'``) that is no file here names a shipped
  config. Raises ``ConfigError`` naming the shipped configs when neither exists."""
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  names = shipped_config_names()
  if os.path.basename(path) == path:
    if path in names:
      return os.path.join(shipped_configs_dir(), path) + sep + arg
    raise ConfigError(f"No config file {path!r} here and no shipped config of that name; "
                      f"shipped: {', '.join(names) or 'none'}.")
  siblings = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith(".py")) \
      if os.path.isdir(os.path.dirname(path)) else []
  hint = f" Files there: {', '.join(siblings)}." if siblings else ""
  raise ConfigError(f"Config file {path!r} does not exist.{hint} Or use one of the shipped "
                    f"configs by bare name (e.g. 'default.py'): {', '.join(names) or 'none'}.")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/cifar.py:aa_wrn28_10'`` -> that file's ``get_config('aa_wrn28_10')``.

  The Python counterpart of ``train.py --config=<path>[:<arg>]`` (for notebooks and tests).
  A bare file name such as ``'cifar.py:aa_wrn28_10'`` that is no file in the working
  directory names a shipped config (see ``resolve_config_spec``). A missing file or an
  argument the file rejects raises ``ConfigError``.
  """
  import importlib.util
  path, _, arg = resolve_config_spec(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError) as error:
    raise ConfigError(f"--config={spec}: {error}") from error
  return config.lock()  # a key that does not exist cannot be assigned


def check_override_keys(config: ml_collections.ConfigDict, keys: list[str]) -> None:
  """Raises ``ConfigError`` for the first dotted key that ``config`` lacks, naming the
  closest valid keys (``keys`` as in ``--config.<key>=...``)."""
  leaves = sorted(flatten(config))
  valid = set()
  for key in leaves:
    parts = key.split(".")
    valid.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  for key in keys:
    if key in valid:
      continue
    close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
    if not close:  # a typo in the leaf alone: compare with the keys of the same section
      section = key.rpartition(".")[0]
      close = [k for k in leaves if k.rpartition(".")[0] == section][:8]
    raise ConfigError(f"--config.{key}: no such config key; closest: "
                      f"{', '.join(close) or 'none'} (every key: docs/CONFIG.md).")
