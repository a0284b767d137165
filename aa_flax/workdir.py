"""The layout of a training workdir, on a local disk or cloud storage (``aa_flax.storage``).

    <workdir>/config.json                the run's config (written at the start)
              metrics.jsonl, metrics/    train and eval records (``metric_logging``)
              tensorboard/               TensorBoard events
              eval_results.json          the final eval of the training run
              eval_only_results/         eval-only results, one file per step and image size
              run_info.json              wall time and hardware per segment (``run_info``)
              run.lock                   held while a run works here (``workdir_lock``)
              checkpoints/<step>/        committed checkpoints (``checkpoint``)
              corrupt_checkpoints/       damaged steps moved out of the way

Readers here go through ``storage`` (``etils.epath``), so a ``gs://`` workdir works wherever
a local one does. Checkpoints are always read verified (``checkpoint``: digest first).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from aa_flax import storage
from aa_flax.errors import VariableMismatchError, WorkdirError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
METRICS_CHUNK_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"
EVAL_RESULTS_FILE = "eval_results.json"  # written only by the training run of the workdir
EVAL_ONLY_DIR = "eval_only_results"
RUN_INFO_FILE = "run_info.json"
LOCK_FILE = "run.lock"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


def eval_only_path(workdir: epath.Path, step: int, image_size: tuple[int, int]) -> epath.Path:
  """``<workdir>/eval_only_results/step_000030_32px.json`` (``32x48px`` if not square)."""
  height, width = image_size
  size = f"{height}px" if height == width else f"{height}x{width}px"
  return workdir / EVAL_ONLY_DIR / f"step_{step:06d}_{size}.json"


def read_json(file: epath.Path) -> dict[str, Any] | None:
  """The JSON object in ``file``, or ``None`` when there is no such file."""
  try:
    return json.loads(storage.read_text(file))
  except FileNotFoundError:
    return None


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
  """``<workdir>/config.json``; ``WorkdirError`` when it is missing."""
  file = storage.path(workdir) / CONFIG_FILE
  config = read_json(file)
  if config is None:
    raise WorkdirError(f"{file} not found: {workdir} has no {CONFIG_FILE}, so it is not a "
                       "training workdir (train.py writes one at the start).")
  return config


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The committed checkpoint steps of ``workdir``, ascending (orbax names a step directory
  by its step; one still being written has a suffix)."""
  directory = storage.path(workdir) / CHECKPOINT_DIR

  def listing() -> list[str]:
    return [entry.name for entry in directory.iterdir()] if directory.is_dir() else []
  return sorted(int(name) for name in storage.retrying(f"Listing {directory}", listing)
                if name.isdigit())


def newest_step_dir(workdir: str | os.PathLike,
                    hint: str = "train first, or pass a checkpoint step directory"
                    ) -> epath.Path:
  """``<workdir>/checkpoints/<newest step>``; ``WorkdirError`` ending in ``hint`` when there
  is none."""
  steps = checkpoint_steps(workdir)
  directory = storage.path(workdir) / CHECKPOINT_DIR
  if not steps:
    raise WorkdirError(f"No checkpoint in {directory}; {hint}.")
  return directory / str(steps[-1])


def workdir_of(step_dir: str | os.PathLike) -> epath.Path:
  """The workdir that holds checkpoint step directory ``<workdir>/checkpoints/<step>``."""
  return storage.path(step_dir).parent.parent


def load_variables(step_dir: str | os.PathLike, model_name: str, model, input_shape,
                   *, method: str, sharding):
  """The params and BN statistics of checkpoint ``step_dir`` for ``model`` at ``input_shape``
  (``[1, H, W, C]``): read verified with the shapes they were saved with
  (``checkpoint.restore_as_saved``, arrays placed with ``sharding``), then converted to
  ``input_shape`` by ``resolution.convert_variables(method=...)``.

  Returns ``(restored, variables)``. Raises ``VariableMismatchError`` for a checkpoint of
  another model (not ``model_name``, or variables that differ other than in size).
  """
  from aa_flax import checkpoint, resolution
  restored = checkpoint.restore_as_saved(os.fspath(step_dir), sharding)
  saved_name = restored.config.get("model", {}).get("name")
  if saved_name != model_name:
    raise VariableMismatchError(
        f"Checkpoint {restored.path} holds a {saved_name!r} model but config.model.name is "
        f"{model_name!r}; use the model the checkpoint was trained as.")
  variables = {name: restored.state[name] for name in ("params", "batch_stats")
               if restored.state.get(name)}
  try:
    converted = resolution.convert_variables(model, variables, tuple(input_shape),
                                             method=method)
  except VariableMismatchError as error:
    raise VariableMismatchError(f"Checkpoint {restored.path} does not fit config.model: "
                                f"{error}") from error
  return restored, converted
