"""Training and evaluation: the train state, the jitted steps, the loop, ``train_and_evaluate``.

Data flow: config -> ``InputPipeline`` (per-process uint8 batches) -> ``parallel.global_batch``
(sharded on ``data``) -> jitted ``train_step`` (state replicated and donated) -> metrics,
checkpoints. Under ``jax.jit`` BatchNorm statistics are over the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from aa_flax import config_utils, optim, parallel, storage
from aa_flax import workdir as workdir_layout
from aa_flax.errors import ConfigError, NonFiniteError, WorkdirError
from aa_flax.layers import attention_paths_by_stage, recorded_attention_paths
from aa_flax.model_cost import num_elements
from aa_flax.preemption import PreemptionWatcher
from aa_flax.progress import Progress, hms
from aa_flax.workdir import CHECKPOINT_DIR, CONFIG_FILE, EVAL_RESULTS_FILE


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (all replicated over the mesh)."""
  step: jax.Array  # int32 []
  params: Any
  batch_stats: Any
  opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in f32. logits [B, K], labels int [B] -> [B]."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def normalise(images: jax.Array, mean, std, dtype) -> jax.Array:
  """uint8 [B, H, W, C] -> ``(x / 255 - mean) / std`` in ``dtype``; mean/std per channel."""
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    learning_rate: optax.Schedule, *, mean, std, dtype, label_smoothing: float,
                    seed: int, skip_nonfinite: bool, check_finite: bool = True) -> Callable:
  """``(state, batch) -> (state, metrics)`` for a batch ``{'image': uint8 [B,H,W,C],
  'label': int32 [B]}``. Metrics (f32 scalars): loss, accuracy, learning_rate, grad_norm,
  finite (1 if the loss, the gradients and everything a checkpoint saves after the update
  -- params, BN statistics, optimizer state -- are finite) and finite_update (1 if that
  updated state is). With ``skip_nonfinite`` a non-finite step leaves params, BN statistics
  and optimizer state unchanged (the step counter advances). ``check_finite=False`` drops the
  finiteness checks and both metrics (benchmarks use it to show what the checks cost)."""
  if skip_nonfinite and not check_finite:
    raise ValueError("skip_nonfinite=True needs check_finite=True")
  dropout_root = jax.random.key(seed + 1)

  def train_step(state: TrainState, batch):
    images = normalise(batch["image"], mean, std, dtype)
    labels = batch["label"]
    dropout_key = jax.random.fold_in(dropout_root, state.step)

    def loss_fn(params):
      logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": dropout_key})
      logits = logits.astype(jnp.float32)
      loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
      return loss, (logits, new_vars.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
        "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32),
        "grad_norm": _global_norm(grads),
    }
    if not check_finite:
      return new_state, metrics
    finite_update = _all_finite((new_state.params, new_state.batch_stats, new_state.opt_state))
    finite = jnp.isfinite(loss) & _all_finite(grads) & finite_update
    if skip_nonfinite:
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                          (new_state.params, new_state.batch_stats, new_state.opt_state),
                          (state.params, state.batch_stats, state.opt_state))
      new_state = new_state.replace(params=kept[0], batch_stats=kept[1], opt_state=kept[2])
    metrics["finite"] = finite.astype(jnp.float32)
    metrics["finite_update"] = finite_update.astype(jnp.float32)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_sharding, mesh) -> Callable:
  """``train_step`` jitted as a run uses it: the state in ``state_sharding`` and donated, the
  batch sharded on the mesh's ``data`` axis, the metrics replicated; traced with the mesh in
  context (the fused attention kernels run per device on their batch shard)."""
  return jax.jit(parallel.traced_on(mesh, train_step),
                 in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def make_eval_step(model: nn.Module, *, mean, std, dtype) -> Callable:
  """``(state, batch) -> sums`` over a padded batch with ``mask`` float32 [B] (1 = real).

  Returns f32 scalars ``loss``, ``top1``, ``top5`` (summed over real examples) and ``count``.
  """

  def eval_step(state: TrainState, batch):
    images = normalise(batch["image"], mean, std, dtype)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                         train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    in_top_k = jnp.any(top_k == labels[:, None], axis=-1)
    return {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "top1": jnp.sum((top_k[:, 0] == labels) * mask),
        "top5": jnp.sum(in_top_k * mask),
        "count": jnp.sum(mask),
    }

  return eval_step


def jit_eval_step(eval_step: Callable, state_sharding, mesh) -> Callable:
  """``eval_step`` jitted as a run uses it: the state in ``state_sharding``, the batch sharded
  on the mesh's ``data`` axis, the sums replicated; traced with the mesh in context."""
  return jax.jit(parallel.traced_on(mesh, eval_step),
                 in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def evaluate(eval_step: Callable, state: TrainState, pipeline, mesh,
             should_stop: Callable[[], bool] = lambda: False,
             progress: Progress | None = None) -> dict[str, float] | None:
  """One pass over the eval split, each example exactly once (padding masked, all hosts).

  Returns ``top1``, ``top5`` (fractions), ``loss`` (mean) and ``num_examples``, or ``None``
  if ``should_stop()`` (asked before every batch, on every process) turned true. ``progress``
  shows how many examples are done. Raises ``ConfigError`` naming ``config.eval_batch_size``
  when an eval batch does not fit in device memory.
  """
  totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
  batches = pipeline.eval_batches()
  if progress is not None:
    batches = progress.eval_batches(batches, pipeline.num_eval_examples,
                                    pipeline.eval_global_batch_size)
  for local_batch in batches:
    if should_stop():
      return None
    try:
      sums = jax.device_get(eval_step(state, parallel.global_batch(local_batch, mesh)))
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      raise ConfigError(
          f"An eval batch of config.eval_batch_size={pipeline.eval_global_batch_size} images "
          f"does not fit in device memory ({str(error).splitlines()[0]}); lower "
          "config.eval_batch_size (e.g. halve it; it must stay a multiple of the device "
          "count).") from error
    for key in totals:
      totals[key] += float(sums[key])
  count = totals["count"]
  return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
          "loss": totals["loss"] / count, "num_examples": int(round(count))}


class _MetricWindow:
  """Train metrics between two log lines, and the non-finite policy (checkpointed).

  ``add`` queues a step's device metrics; ``flush`` fetches them. A step whose ``finite``
  metric is 0 is counted in ``skipped`` and left out of the means under ``on_nonfinite=
  'skip'``; under ``'stop'`` ``flush`` returns it (the first one) and keeps nothing after it.
  """

  KEYS = ("loss", "accuracy", "grad_norm")

  def __init__(self, on_nonfinite: str, saved: dict[str, float] | None = None,
               skipped: int = 0):
    saved = saved or {}
    self.on_nonfinite = on_nonfinite
    self.skipped = skipped
    self.sums = {key: float(saved.get(key) or 0.0) for key in self.KEYS}
    self.count = int(saved.get("count", 0))
    self.learning_rate = float(saved.get("learning_rate") or 0.0)
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def completed_step(self, default: int) -> int:
    """The newest queued step the device has finished (without waiting), else ``default``."""
    for step, metrics in reversed(self._pending):
      if metrics["loss"].is_ready():
        return step
    return default

  def flush(self) -> tuple[int, dict[str, float]] | None:
    """Folds the queued steps into the sums; returns ``(step, metrics)`` of a non-finite
    step that must stop the run, else ``None``."""
    pending, self._pending = self._pending, []
    for step, metrics in jax.device_get(pending):
      if metrics["finite"] < 1:
        if self.on_nonfinite == "stop":
          return step, metrics
        self.skipped += 1
        logging.warning("Skipped the update of step %d: %s.", step, _nonfinite_cause(metrics))
      else:
        for key in self.KEYS:
          self.sums[key] += float(metrics[key])
        self.count += 1
      self.learning_rate = float(metrics["learning_rate"])
    return None

  def means(self) -> dict[str, float | None]:
    """Means over the kept steps (``None`` when every step was skipped), the last LR."""
    return {**{key: value / self.count if self.count else None
               for key, value in self.sums.items()},
            "learning_rate": self.learning_rate}

  def next_window(self) -> "_MetricWindow":
    """An empty window that carries on the skip count (call after ``flush``)."""
    return _MetricWindow(self.on_nonfinite, skipped=self.skipped)

  def state(self) -> dict[str, float]:
    return {**self.sums, "count": self.count, "learning_rate": self.learning_rate}


def _nonfinite_cause(metrics: dict[str, float]) -> str:
  finite_gradients = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
  if metrics["finite_update"] < 1 and finite_gradients:
    return ("the loss and gradients were finite but the updated parameters, BatchNorm "
            "statistics or optimizer state were not")
  return (f"non-finite loss or gradients (loss={metrics['loss']}, "
          f"grad_norm={metrics['grad_norm']})")


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the training loop reads and never rebinds."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  total_steps: int
  train_step: Callable
  eval_step: Callable
  pipeline: Any
  mesh: Any
  checkpointer: Any
  logger: Any
  config_dict: dict[str, Any]
  provenance: dict[str, Any]  # saved with every checkpoint: device count, data fingerprint
  is_main: bool
  progress: Progress
  confirm_lock: Callable[[str], None]  # raises WorkdirError once run.lock is not ours


def _num_train_steps(config, steps_per_epoch: float) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def _image_size(config, splits) -> tuple[int, int]:
  if config.data.image_size:
    return (config.data.image_size, config.data.image_size)
  height, width = splits.image_shape[:2]
  if height is None or width is None:
    raise ConfigError(f"Dataset {splits.name!r} has images of varying size; set "
                      "config.data.image_size (e.g. 224).")
  return (height, width)


def build_model(config, num_classes: int, dtype) -> nn.Module:
  """``aa_flax.models.create_model`` from ``config.model``; bad names raise ``ConfigError``."""
  from aa_flax.models import create_model, model_spec, registry
  overrides = config_utils.model_overrides(config.model)
  try:
    model_class = model_spec(config.model.name)[0].__name__
  except ValueError as error:
    raise ConfigError(f"config.model.name: {error}") from error
  options = registry.model_options()
  for key in overrides:
    if key in options and model_class not in options[key][1]:
      raise ConfigError(f"config.model.{key}={overrides[key]!r} does not apply to "
                        f"{config.model.name!r} (a {model_class}); it is a setting of "
                        f"{', '.join(options[key][1])} models.")
  try:
    return create_model(config.model.name, num_classes, dtype=dtype, **overrides)
  except (ValueError, TypeError) as error:
    raise ConfigError(f"config.model (name={config.model.name!r}, settings={overrides}): "
                      f"{error}") from error


# XLA settings for code that runs once per run (the variables' init) on CPU, where compiling
# it with the usual optimisations takes several times longer than running it unoptimised.
_CPU_QUICK_COMPILE = {"xla_backend_optimization_level": 0,
                      "xla_llvm_disable_expensive_passes": True}


def _run_once(function: Callable, *args, out_shardings) -> Any:
  """``jax.jit(function, out_shardings=...)(*args)``, compiled for a single call."""
  options = _CPU_QUICK_COMPILE if jax.default_backend() == "cpu" else {}
  lowered = jax.jit(function, out_shardings=out_shardings).lower(*args)
  return lowered.compile(compiler_options=options)(*args)


def _state_bytes(abstract_state) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def _check_batch_fits(config, splits) -> None:
  if config.batch_size > len(splits.train):
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than the training set "
                      f"({len(splits.train)} examples); use at most {len(splits.train)}.")


@contextlib.contextmanager
def _disk_full_is_a_workdir_error(workdir) -> Iterator[None]:
  try:
    yield
  except OSError as error:
    if error.errno != errno.ENOSPC:
      raise
    raise WorkdirError(f"No space left on the device of {workdir} ({error}). Free space and "
                       "rerun to resume from the last complete checkpoint.") from error


def _missing_local_folders(*folders: epath.Path) -> list[epath.Path]:
  """Those of the local ``folders`` that do not exist yet (cloud folders are not tracked)."""
  return [folder for folder in folders
          if not storage.is_remote(folder) and not folder.exists()]


@contextlib.contextmanager
def _removed_if_left_empty(new_folders: list[epath.Path]) -> Iterator[None]:
  """When the body raises, removes those of ``new_folders`` (not there before this run) that
  it left empty."""
  try:
    yield
  except BaseException:
    for folder in new_folders:
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    raise


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None,
                       progress: str | Progress = "auto") -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint; without one,
  starting from ``config.init_from_checkpoint`` if set) and evaluates. With
  ``config.eval_only`` it is ``evaluate_checkpoint``.

  Args:
    config: a config built on ``aa_flax.config_utils.base_config()`` (see ``configs/``).
    workdir: a local path or a cloud URL (``gs://bucket/run``; see ``aa_flax.storage``).
      Checkpoints, ``metrics.jsonl``, ``eval_results.json``, ``config.json`` and TensorBoard
      events go here (the layout: ``aa_flax.workdir``); ``run.lock`` keeps a second run out
      while this one runs.
    model: optional flax module to train instead of ``config.model`` (same call convention
      as the registry's models); ``config.model`` is then only recorded.
    progress: where progress goes (``aa_flax.progress``): ``"auto"`` (bars in a notebook,
      lines on stderr elsewhere), ``"log"`` (absl logging; ``train.py``), ``"print"``,
      ``"bar"``, ``"none"``, or a ``Progress``. Only process 0 reports.

  Returns:
    The final eval metrics (``step``, ``top1``, ``top5``, ``loss``, ``num_examples``) plus
    ``preempted``: ``True`` when a SIGTERM stopped the run after a checkpoint (rerun the
    same call to continue; ``train.py`` exits with ``preemption.EXIT_PREEMPTED``).

  Raises:
    ConfigError, DataError, DatasetNotFoundError, ConfigMismatchError, WorkdirError,
    StorageUnavailableError, NonFiniteError (see ``aa_flax.errors``).
  """
  from aa_flax.checkpoint import Checkpointer
  from aa_flax.metric_logging import MetricLogger

  config_utils.validate_config(config)
  if config.eval_only:
    return evaluate_checkpoint(config, workdir, model=model, progress=progress)
  setup = _set_up(config, workdir, model, progress)
  with _working_in(setup) as confirm_lock, contextlib.closing(Checkpointer(
      setup.workdir, max_to_keep=config.keep_checkpoints,
      async_save=config.async_checkpointing)) as checkpointer:
    state, extra, start_step = _restore_or_initialise(setup, checkpointer)
    config_dict = config_utils.config_to_dict(config)
    if setup.is_main:
      storage.write_json(setup.workdir / CONFIG_FILE, config_dict)
    train_step = jit_train_step(
        make_train_step(setup.model, setup.tx, setup.learning_rate,
                        label_smoothing=config.label_smoothing, seed=config.seed,
                        skip_nonfinite=config.on_nonfinite == "skip", **setup.norm),
        setup.state_sharding, setup.mesh)
    with contextlib.closing(MetricLogger(setup.workdir, enabled=setup.is_main,
                                         resume_step=start_step)) as logger:
      # A run resumed at the last step redoes its final eval, so that eval's record goes too.
      logger.truncate_after(start_step, keep_evals_at_step=start_step < setup.total_steps)
      run = _Run(config=config, workdir=setup.workdir, total_steps=setup.total_steps,
                 train_step=train_step, eval_step=setup.eval_step, pipeline=setup.pipeline,
                 mesh=setup.mesh, checkpointer=checkpointer, logger=logger,
                 config_dict=config_dict,
                 provenance={"num_devices": jax.device_count(),
                             "data_fingerprint": setup.splits.fingerprint},
                 is_main=setup.is_main, progress=setup.progress, confirm_lock=confirm_lock)
      return _train_loop(run, state, start_step, extra)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        model: nn.Module | None = None,
                        progress: str | Progress = "auto") -> dict[str, Any]:
  """Evaluates ``config.checkpoint_path`` (else the newest checkpoint of ``workdir``) at the
  configured image size (its variables converted by ``config.resample_method``); the
  checkpoint itself is only read. The results (with the image size and the checkpoint) go
  to ``aa_flax.workdir.eval_only_path``, never to a training run's ``eval_results.json``.

  Arguments as ``train_and_evaluate``. Returns ``step``, ``top1``, ``top5``, ``loss``,
  ``num_examples`` and ``preempted`` (``True``, with only ``step``, when a SIGTERM cut the
  evaluation short: rerun to evaluate). Raises as ``train_and_evaluate``.
  """
  config_utils.validate_config(config)
  setup = _set_up(config, workdir, model, progress)
  progress = setup.progress
  with _working_in(setup):
    location = config.checkpoint_path or str(workdir_layout.newest_step_dir(
        setup.workdir, "config.eval_only needs one: set config.checkpoint_path to a "
        "checkpoint step directory"))
    restored, state = setup.checkpoint_state(location)
    with PreemptionWatcher() as watcher:
      metrics = evaluate(setup.eval_step, state, setup.pipeline, setup.mesh,
                         watcher.should_stop, progress)
    if metrics is None:
      logging.warning("Preempted during the evaluation of %s; rerun to evaluate.",
                      restored.path)
      return {"step": restored.step, "preempted": True}
    results = {"step": restored.step, **metrics}
    progress.line("Eval of %s: top1 %.4f top5 %.4f loss %.4f (%d examples)", restored.path,
                  results["top1"], results["top5"], results["loss"], results["num_examples"])
    if setup.is_main:
      image_size = tuple(setup.pipeline.image_shape[:2])
      target = workdir_layout.eval_only_path(setup.workdir, restored.step, image_size)
      target.parent.mkdir(parents=True, exist_ok=True)
      storage.write_json(target, {**results, "image_size": list(image_size),
                                  "checkpoint": str(restored.path)})
      progress.line("Eval-only results: %s", target)
    return {**results, "preempted": False}


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What training and eval-only build from the config before reading any checkpoint."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  new_workdir: list[epath.Path]  # local folders this run creates: removed if a failure
  new_checkpoints: list[epath.Path]  # leaves them empty
  is_main: bool
  progress: Progress
  mesh: Any
  splits: Any
  pipeline: Any
  model: nn.Module
  dtype: Any
  total_steps: int
  learning_rate: optax.Schedule
  tx: optax.GradientTransformation
  init_state: Callable[[jax.Array], TrainState]  # key -> the freshly initialised state
  state_sharding: Any
  abstract_state: Any  # the TrainState as jax.ShapeDtypeStruct leaves with shardings
  eval_step: Callable

  @property
  def norm(self) -> dict[str, Any]:
    return dict(mean=self.splits.mean, std=self.splits.std, dtype=self.dtype)

  def checkpoint_state(self, location: str, step: int | None = None):
    """(restored checkpoint, its state at this run's image size; step: its own or ``step``)."""
    restored, variables = workdir_layout.load_variables(
        location, self.config.model.name, self.model, (1, *self.pipeline.image_shape),
        method=self.config.resample_method, sharding=parallel.replicated(self.mesh))
    step = restored.step if step is None else step
    return restored, _run_once(functools.partial(_state_from, self.tx), variables,
                               jnp.asarray(step, jnp.int32), out_shardings=self.state_sharding)


def _state_from(tx: optax.GradientTransformation, variables, step) -> TrainState:
  """A train state of ``variables`` at ``step`` with a fresh optimizer state."""
  params = variables["params"]
  return TrainState(step=step, params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def _init_state(model: nn.Module, tx: optax.GradientTransformation, image_shape, dtype,
                key) -> TrainState:
  """The freshly initialised train state (``image_shape``: ``(H, W, C)``) at step 0."""
  images = jnp.zeros((1, *image_shape), dtype)
  variables = model.init({"params": key, "dropout": key}, images, train=False)
  return _state_from(tx, variables, jnp.zeros((), jnp.int32))


def _set_up(config, workdir: str, model: nn.Module | None, progress: str | Progress) -> _Setup:
  """Mesh, data, input pipeline, model, optimizer and the train state's shapes; checks the
  workdir can hold the checkpoints. Fails before anything but the workdir is written."""
  from aa_flax.data import InputPipeline, load_splits, resolve_num_workers

  workdir = storage.path(workdir)  # an unsupported scheme fails here, before any work
  storage.set_retry_seconds(config.storage_retry_s)
  is_main = jax.process_index() == 0
  if not isinstance(progress, Progress):
    progress = Progress(progress if is_main else "none")
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  splits = load_splits(config.data, seed=config.seed)  # fails before anything is written
  _check_batch_fits(config, splits)
  image_size = _image_size(config, splits)
  progress.line("Data %s: %d training and %d eval examples, %d classes, images %s.",
                splits.name, len(splits.train), len(splits.eval), splits.num_classes,
                "x".join(str(d) for d in (*image_size, splits.image_shape[-1])))
  pipeline = InputPipeline(
      splits, global_batch_size=config.batch_size, eval_global_batch_size=config.eval_batch_size,
      image_size=image_size, augment=config.data.augment, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads, prefetch=config.data.prefetch,
      num_workers=resolve_num_workers(config.data.num_workers, splits.name))
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  model_name = config.model.name if model is None else type(model).__name__
  if model is None:
    model = build_model(config, splits.num_classes, dtype)
  total_steps = _num_train_steps(config, pipeline.steps_per_epoch)
  learning_rate = optim.create_learning_rate_schedule(
      config.optimizer, config.batch_size, pipeline.steps_per_epoch, total_steps)
  tx = optim.create_optimizer(config.optimizer, learning_rate)
  init_state = functools.partial(_init_state, model, tx, pipeline.image_shape, dtype)
  try:
    with recorded_attention_paths() as attention_paths:
      abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
  except ValueError as error:  # settings the model only checks when it sees the images
    raise ConfigError(f"config.model (name={config.model.name!r}, settings="
                      f"{config_utils.model_overrides(config.model)}) at image shape "
                      f"{pipeline.image_shape}: {error}") from error
  epochs = total_steps / pipeline.steps_per_epoch
  progress.line("Model %s: %.2fM parameters; %d steps of global batch %d (%.3g epoch%s) on %d "
                "device(s)%s.", model_name, num_elements(abstract_state.params) / 1e6,
                total_steps, config.batch_size, epochs, "" if epochs == 1 else "s",
                jax.device_count(), f"; attention path per stage: "
                f"{attention_paths_by_stage(attention_paths)}" if attention_paths else "")
  state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
  abstract_state = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, state_sharding)
  new_workdir = _missing_local_folders(workdir)
  new_checkpoints = _missing_local_folders(workdir / CHECKPOINT_DIR)
  storage.check_workdir(workdir, _state_bytes(abstract_state) * (config.keep_checkpoints + 1))
  eval_step = jit_eval_step(make_eval_step(model, mean=splits.mean, std=splits.std,
                                           dtype=dtype), state_sharding, mesh)
  return _Setup(config=config, workdir=workdir, new_workdir=new_workdir,
                new_checkpoints=new_checkpoints, is_main=is_main, progress=progress, mesh=mesh,
                splits=splits, pipeline=pipeline, model=model, dtype=dtype,
                total_steps=total_steps, learning_rate=learning_rate, tx=tx,
                init_state=init_state, state_sharding=state_sharding,
                abstract_state=abstract_state, eval_step=eval_step)


@contextlib.contextmanager
def _working_in(setup: _Setup) -> Iterator[Callable[[str], None]]:
  """The workdir locked for this run (yields ``confirm_lock``, see ``_Run``), with a lost
  peer, a full disk and empty folders this run created handled on failure."""
  from aa_flax.workdir_lock import workdir_lock
  # A failed run leaves no empty folder it created (the checkpoints' only while locked).
  with parallel.peer_loss_is_an_error(), _removed_if_left_empty(setup.new_workdir), \
      workdir_lock(setup.workdir) as confirm_lock, \
      _removed_if_left_empty(setup.new_checkpoints), \
      _disk_full_is_a_workdir_error(setup.workdir), setup.progress.heartbeat():
    yield confirm_lock


def _restore_or_initialise(setup: _Setup, checkpointer) -> tuple[TrainState, dict[str, Any],
                                                                  int]:
  """``(state, extra, step)`` to train from: the workdir's newest usable checkpoint, else
  the variables of ``config.init_from_checkpoint`` at step 0, else freshly initialised ones."""
  config, progress = setup.config, setup.progress
  restored = _resume(config, setup.splits.fingerprint, checkpointer, setup.abstract_state,
                     setup.total_steps, progress)
  if restored is not None:
    return restored.state, restored.extra, restored.step
  if config.init_from_checkpoint:
    source, state = setup.checkpoint_state(config.init_from_checkpoint, step=0)
    progress.line("Starting from the params and BN statistics of %s (step %d) at image "
                  "shape %s, with a fresh optimizer state.", source.path, source.step,
                  setup.pipeline.image_shape)
    return state, {}, 0
  progress.line("Initialising the model's variables (compiles its init)...")
  state = _run_once(setup.init_state, jax.random.key(config.seed),
                    out_shardings=setup.state_sharding)
  return state, {}, 0


def _resume(config, data_fingerprint: str, checkpointer, abstract_state, total_steps: int,
            progress: Progress):
  """The newest usable checkpoint (``checkpoint.Restored``) once its config, data and step
  fit this run, or ``None`` to start afresh. Its ``extra`` has ``data_position``, the
  examples of the training stream consumed (``_save``)."""

  def check(saved_config: dict[str, Any], saved_extra: dict[str, Any]) -> None:
    differences = config_utils.resume_differences(saved_config, config)
    saved_fingerprint = saved_extra.get("data_fingerprint", "")
    if saved_fingerprint and saved_fingerprint != data_fingerprint:
      differences.append(("data.npz_contents", saved_fingerprint, data_fingerprint))
    config_utils.check_resume_config(differences, config.allow_config_mismatch)

  restored = checkpointer.restore_latest(abstract_state, check_resume=check)
  if restored is None:
    return None
  if restored.step > total_steps:
    raise ConfigError(f"Checkpoint {restored.path} is at step {restored.step}, past the "
                      f"{total_steps} steps this config trains for; a run cannot resume "
                      "beyond its end. Evaluate it with config.eval_only=True, or use a new "
                      "--workdir.")
  saved_devices = restored.extra.get("num_devices")
  if saved_devices and saved_devices != jax.device_count():
    logging.warning("Checkpoint %s was written on %d devices and resumes on %d: training "
                    "continues correctly, but results are no longer bitwise equal to an "
                    "uninterrupted run.", restored.path, saved_devices, jax.device_count())
  progress.line("Resumed from %s (step %d).", restored.path, restored.step)
  return restored


def _train_loop(run: _Run, state: TrainState, start_step: int,
                extra: dict[str, Any]) -> dict[str, Any]:
  """Steps from ``start_step`` to ``run.total_steps``: logs, evals, checkpoints, and stops
  after a checkpoint on SIGTERM, also during an evaluation (``preempted: True``)."""
  config, progress = run.config, run.progress
  position = int(extra.get("data_position", 0))  # examples of the training stream consumed
  window = _MetricWindow(config.on_nonfinite, extra.get("metric_window"),
                         int(extra.get("skipped_steps", 0)))
  last_saved = run.checkpointer.latest_step()
  step = start_step
  # Batches are read and transferred ahead while a step runs; the position above counts the
  # batches taken, so those in flight never affect a resume.
  with parallel.DeviceBatches(run.pipeline.train_iterator(position), run.mesh) as batches, \
      PreemptionWatcher() as watcher:
    timer = _Timer.start(step, batches)
    if extra.get("pending_eval") and step < run.total_steps:  # a preemption cut it short
      if _evaluate_and_log(run, step, state, watcher) is None:
        return _preempted(run, step)
    progress.start_training(step, run.total_steps)
    if step < run.total_steps:
      progress.line("Compiling the train step (the first step includes it)...")
    while step < run.total_steps:
      state, metrics = run.train_step(state, next(batches))
      step += 1
      position += config.batch_size
      window.add(step, metrics)
      if step == start_step + 1:  # keep compilation out of img/s and the ETA
        jax.block_until_ready(metrics)
        progress.line("Step %d done in %.1f s (compilation included); training.", step,
                      time.perf_counter() - timer.time)
        timer = _Timer.start(step, batches)
        progress.reset_rate(step)
      progress.train_step(step, run.total_steps, config.batch_size,
                          completed=lambda: window.completed_step(timer.step))
      if step % config.log_every_steps == 0 or step == run.total_steps:
        _flush(run, window)
        _check_skipped_fraction(run, step, window)
        _log_train(run, step, window, timer, batches)
        window = window.next_window()
        timer = _Timer.start(step, batches)
      # Eval before save: a run killed in between redoes both after resuming.
      if config.eval_every_steps and step % config.eval_every_steps == 0 and \
          step < run.total_steps:
        if _evaluate_and_log(run, step, state, watcher) is None:
          _save(run, step, state, position, window, pending_eval=True)
          return _preempted(run, step)
      if step % config.checkpoint_every_steps == 0 or step == run.total_steps:
        last_saved = _save(run, step, state, position, window)
      # Several processes must agree on the stop step and on a failed background save:
      # host all-gathers, done at log steps (already a sync point); a single process checks
      # after every step.
      check_stop = jax.process_count() == 1 or step % config.log_every_steps == 0
      if check_stop:
        run.checkpointer.check_for_errors()
      if step < run.total_steps and check_stop and watcher.should_stop():
        if last_saved != step:
          _save(run, step, state, position, window)
        return _preempted(run, step)
    progress.end_training(step)
    _flush(run, window)
    if last_saved != step:
      _save(run, step, state, position, window)
    run.checkpointer.wait()  # the final checkpoint is on disk before the final eval
    results = _evaluate_and_log(run, step, state, watcher)
    if results is None:
      return _preempted(run, step)
  if run.is_main:
    storage.write_json(run.workdir / EVAL_RESULTS_FILE, results)
  return {**results, "preempted": False}


def _preempted(run: _Run, step: int) -> dict[str, Any]:
  run.progress.end_training(step)
  run.checkpointer.wait()
  logging.warning("Preempted: checkpoint of step %d is on disk; rerun to resume.", step)
  return {"step": step, "preempted": True}


def _last_good_checkpoint(run: _Run) -> str:
  run.checkpointer.wait()
  last = run.checkpointer.latest_step()
  return str(run.checkpointer.step_path(last)) if last is not None else "none"


def _flush(run: _Run, window: _MetricWindow) -> None:
  """Fetches the window's queued metrics; raises ``NonFiniteError`` under the stop policy."""
  bad = window.flush()
  if bad is None:
    return
  step, metrics = bad
  raise NonFiniteError(
      f"Step {step}: {_nonfinite_cause(metrics)}. Last good checkpoint: "
      f"{_last_good_checkpoint(run)} (every saved checkpoint holds finite values); nothing "
      "after it was saved. Lower the learning rate, or set config.on_nonfinite='skip' to "
      "drop such steps.")


def _check_skipped_fraction(run: _Run, step: int, window: _MetricWindow) -> None:
  limit = run.config.max_skipped_fraction
  if window.skipped > limit * step:
    raise NonFiniteError(
        f"{window.skipped} of the first {step} steps were skipped as non-finite, more than "
        f"config.max_skipped_fraction={limit}. Last good checkpoint: "
        f"{_last_good_checkpoint(run)}. Lower the learning rate (or raise the limit).")


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"


@dataclasses.dataclass(frozen=True)
class _Timer:
  """Wall time, step and time spent waiting for data at the start of a measured span."""
  time: float
  step: int
  data_wait: float

  @classmethod
  def start(cls, step: int, batches: parallel.DeviceBatches) -> "_Timer":
    return cls(time.perf_counter(), step, batches.wait_seconds)


def _log_train(run: _Run, step: int, window: _MetricWindow, timer: _Timer,
               batches: parallel.DeviceBatches) -> None:
  """Writes the window's means and prints them with img/s, the time the loop waited for
  input batches (when that nears the step time, the input pipeline bounds training) and the
  ETA since ``timer``. The data wait stays out of metrics.jsonl, which is a function of the
  config alone."""
  means = window.means()
  elapsed, steps_done = time.perf_counter() - timer.time, max(step - timer.step, 1)
  images_per_s = steps_done * run.config.batch_size / max(elapsed, 1e-9)
  eta_s = (run.total_steps - step) * elapsed / steps_done
  wait = batches.wait_seconds - timer.data_wait
  run.logger.write(step, "train", {**means, "skipped_steps": window.skipped})
  run.progress.line("step %d/%d loss %s acc %s lr %.4g %.0f img/s, waiting for data %.1f "
                    "ms/step (%.0f%%) ETA %s", step, run.total_steps, _fmt(means["loss"]),
                    _fmt(means["accuracy"]), means["learning_rate"], images_per_s,
                    1e3 * wait / steps_done, 100 * min(1.0, wait / max(elapsed, 1e-9)),
                    hms(eta_s))


def _save(run: _Run, step: int, state: TrainState, position: int, window: _MetricWindow,
          pending_eval: bool = False) -> int:
  """Checks the lock and the queued steps, stores the metric records so far, then starts
  saving ``step``; returns ``step``."""
  run.confirm_lock(f"not saving checkpoint step {step}")
  _flush(run, window)
  run.logger.flush()  # a resume from this checkpoint finds every record up to it
  run.checkpointer.save(step, state, {
      "data_position": position, "metric_window": window.state(),
      "skipped_steps": window.skipped, "pending_eval": pending_eval, **run.provenance},
      run.config_dict)
  return step


def _evaluate_and_log(run: _Run, step: int, state: TrainState, watcher) -> dict[str, Any] | None:
  """Evaluates ``state`` and logs it; ``None`` if a preemption notice cut the pass short."""
  run.progress.line("Evaluating at step %d (%d examples)...", step,
                    run.pipeline.num_eval_examples)
  metrics = evaluate(run.eval_step, state, run.pipeline, run.mesh, watcher.should_stop,
                     run.progress)
  if metrics is None:
    logging.warning("Preemption notice during the evaluation at step %d: stopping it.", step)
    return None
  results = {"step": step, **metrics}
  run.logger.write(step, "eval", metrics)
  run.progress.line("eval step %d: top1 %.4f top5 %.4f loss %.4f (%d examples)", step,
                    results["top1"], results["top5"], results["loss"], results["num_examples"])
  return results
