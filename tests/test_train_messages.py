"""What a user is told around training: where the results are, errors without tracebacks,
nothing left behind by a failed run, and an eval batch too large for the device."""

import traceback
import types

import jax
import numpy as np
import pytest

import aa_flax
from aa_flax import parallel, trainer
from aa_flax.errors import ConfigError, ConfigMismatchError, WorkdirError
from train_helpers import run_train_py, tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A 12-step train.py run: its workdir and the run's stderr."""
  workdir = tmp_path_factory.mktemp("finished")
  result = run_train_py(workdir)
  assert result.returncode == 0, result.stderr
  return workdir, result.stderr


def test_last_line_says_where_the_results_are(finished):
  workdir, stderr = finished
  last = stderr.strip().splitlines()[-1]
  assert last.split("] ", 1)[1] == (
      f"Done: test top-1 {_read_top(workdir, 'top1')}, top-5 {_read_top(workdir, 'top5')} at "
      f"step 12; results in {workdir / 'eval_results.json'}; curves: tensorboard "
      f"--logdir={workdir / 'tensorboard'}")
  assert (workdir / "eval_results.json").is_file() and (workdir / "tensorboard").is_dir()


def _read_top(workdir, key):
  import json
  return f"{json.loads((workdir / 'eval_results.json').read_text())[key]:.4f}"


def test_resume_with_a_changed_recipe_is_one_error_line(finished):
  workdir, _ = finished
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  result = run_train_py(workdir, "--config.optimizer.base_learning_rate=0.3")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: ConfigMismatchError: The workdir holds checkpoints of a run with a " \
      "different config:" in result.stderr
  assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_state_that_does_not_fit_is_reported_without_orbax_internals(finished, tmp_path):
  """From Python the error carries no chained traceback of the checkpoint library's own."""
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(finished[0], workdir)
  config = tiny_config(**{"optimizer.name": "rmsprop"}, allow_config_mismatch=True)
  with pytest.raises(ConfigMismatchError, match="is intact") as error:
    aa_flax.train_and_evaluate(config, str(workdir), progress="none")
  printed = "".join(traceback.format_exception(error.value))
  assert printed.count("Traceback") == 1 and "site-packages/orbax" not in printed


@pytest.mark.parametrize("existed", [False, True])
def test_failed_eval_only_leaves_nothing_behind(tmp_path, existed):
  workdir = tmp_path / "evaluation"
  if existed:
    workdir.mkdir()
  with pytest.raises(WorkdirError, match="No checkpoint in"):
    aa_flax.train_and_evaluate(tiny_config(eval_only=True), str(workdir), progress="none")
  assert workdir.exists() == existed
  assert not existed or list(workdir.iterdir()) == []


def test_eval_batch_out_of_device_memory_names_the_setting_to_lower():
  mesh = parallel.create_mesh()
  batch = {"image": np.zeros((8, 2), np.float32)}
  pipeline = types.SimpleNamespace(eval_batches=lambda: iter([batch]), num_eval_examples=8,
                                   eval_global_batch_size=8)

  def out_of_memory(state, batch):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                     "allocate 9.00GiB.\nBuffer assignment details...")

  with pytest.raises(ConfigError, match=(
      r"^An eval batch of config.eval_batch_size=8 images does not fit in device memory "
      r"\(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB.\); lower "
      r"config.eval_batch_size \(e.g. halve it")):
    trainer.evaluate(out_of_memory, None, pipeline, mesh)

  def other_failure(state, batch):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    trainer.evaluate(other_failure, None, pipeline, mesh)
