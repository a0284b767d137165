"""Checkpoints at another image size through the trainer: evaluation and fine-tuning."""

import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aa_flax
from aa_flax import resolution, trainer
from aa_flax.checkpoint import read_state_arrays
from aa_flax.data import load_splits, preprocess
from aa_flax.errors import (ConfigError, ConfigMismatchError, CorruptCheckpointError,
                            VariableMismatchError, WorkdirError)
from aa_flax.models import create_model
from train_helpers import (assert_trees_equal, final_state, read_json, run_train_py,
                           tiny_config)

NEW_SIZE = 12  # the digits are 8x8


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The final checkpoint of a 6-step tiny run at the digits' own 8x8 size."""
  workdir = tmp_path_factory.mktemp("trained8")
  aa_flax.train_and_evaluate(tiny_config(num_train_steps=6), str(workdir))
  return workdir / "checkpoints" / "6"


def _fingerprint(directory):
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _converted(checkpoint, method):
  state = read_state_arrays(str(checkpoint))
  model = create_model("aa_resnet_tiny", 10, width=8)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return model, resolution.convert_variables(model, variables, (1, NEW_SIZE, NEW_SIZE, 1),
                                             method=method)


@pytest.mark.parametrize("method", resolution.RESAMPLE_METHODS)
def test_eval_only_at_a_new_size_is_conversion_plus_apply(checkpoint, tmp_path, method):
  before = _fingerprint(checkpoint)
  config = tiny_config(eval_only=True, checkpoint_path=str(checkpoint), resample_method=method,
                       data__image_size=NEW_SIZE)
  result = aa_flax.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 6 and result["num_examples"] == 360
  assert _fingerprint(checkpoint) == before  # only read
  # The same by hand: converted variables applied to the eval images resized to 12x12.
  model, variables = _converted(checkpoint, method)
  splits = load_splits(config.data, seed=0)
  images = np.stack([preprocess.resize(image, (NEW_SIZE, NEW_SIZE))
                     for image in splits.eval.images])
  logits = jax.jit(model.apply)(variables, trainer.normalise(images, splits.mean, splits.std,
                                                             jnp.float32))
  expected = np.mean(np.argmax(np.asarray(logits), -1) == splits.eval.labels)
  assert result["top1"] == pytest.approx(expected, abs=1e-9)


def test_eval_only_without_a_path_converts_the_workdirs_newest_checkpoint(checkpoint, tmp_path):
  workdir = tmp_path / "trained"
  shutil.copytree(checkpoint.parent.parent, workdir)
  explicit = tiny_config(eval_only=True, checkpoint_path=str(checkpoint),
                         data__image_size=NEW_SIZE)
  newest = tiny_config(eval_only=True, data__image_size=NEW_SIZE)
  assert (aa_flax.train_and_evaluate(newest, str(workdir))
          == aa_flax.train_and_evaluate(explicit, str(tmp_path / "eval")))


def test_finetune_starts_from_the_converted_checkpoint_and_resumes_exactly(checkpoint,
                                                                          tmp_path):
  """With a zero learning rate the parameters stay exactly the converted ones, while BN
  statistics, the optimizer state (fresh at the start) and the data position move; a run
  killed between its checkpoints resumes from its own checkpoint, bitwise, and not from
  another starting checkpoint."""
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=2,
                       init_from_checkpoint=str(checkpoint), data__image_size=NEW_SIZE,
                       optimizer__base_learning_rate=0.0, optimizer__warmup_epochs=0.0)
  whole = tmp_path / "whole"
  result = aa_flax.train_and_evaluate(config, str(whole))
  assert result["step"] == 4
  state = final_state(whole)
  assert_trees_equal(state["params"], jax.device_get(_converted(checkpoint,
                                                                "interpolate")[1]["params"]))
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
            if "count" in jax.tree_util.keystr(path)]
  assert counts and all(int(count) == 4 for count in counts)  # a fresh optimizer: 4 updates
  assert read_json(whole / "config.json")["init_from_checkpoint"] == str(checkpoint)
  resumed = tmp_path / "resumed"
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed between steps 2 and 4
  (resumed / "eval_results.json").unlink()
  assert aa_flax.train_and_evaluate(config, str(resumed)) == result
  assert_trees_equal(final_state(resumed), state)
  # The starting point is part of the recipe: resuming with another one is refused.
  config.init_from_checkpoint = str(checkpoint.parent / "3")
  with pytest.raises(ConfigMismatchError, match="init_from_checkpoint: checkpoint"):
    aa_flax.train_and_evaluate(config, str(resumed))


@pytest.mark.parametrize("overrides,error,match", [
    (dict(model__name="resnet_tiny"), VariableMismatchError,
     "holds a 'aa_resnet_tiny' model but config.model.name is 'resnet_tiny'"),
    (dict(model__width=4), VariableMismatchError,
     "does not fit config.model: the variables belong to another model"),
    (dict(model__attention__num_heads=2), VariableMismatchError,
     r"does not fit config.model: .*qkv/kernel has shape"),
    (dict(resample_method="nearest"), ConfigError, "resample_method='nearest'; valid: "
                                                   "interpolate, extend"),
    (dict(eval_only=True), ConfigError, "set config.checkpoint_path instead"),
])
def test_impossible_requests_are_refused(checkpoint, tmp_path, overrides, error, match):
  config = tiny_config(init_from_checkpoint=str(checkpoint), data__image_size=NEW_SIZE,
                       **overrides)
  with pytest.raises(error, match=match):
    aa_flax.train_and_evaluate(config, str(tmp_path))
  assert not list(tmp_path.glob("checkpoints/*")) and not (tmp_path / "eval_results.json").exists()


def test_not_a_checkpoint_is_refused(tmp_path):
  config = tiny_config(init_from_checkpoint=str(tmp_path / "nothing"))
  with pytest.raises(WorkdirError, match="nothing is not a checkpoint step directory"):
    aa_flax.train_and_evaluate(config, str(tmp_path / "run"))
  (tmp_path / "broken" / "7" / "state").mkdir(parents=True)
  config = tiny_config(init_from_checkpoint=str(tmp_path / "broken" / "7"))
  with pytest.raises(CorruptCheckpointError, match="7 has no aa_flax_digest.json"):
    aa_flax.train_and_evaluate(config, str(tmp_path / "run"))


def test_train_py_evaluates_a_checkpoint_at_a_new_size_in_one_command(checkpoint, tmp_path):
  run = run_train_py(tmp_path, "--config.eval_only=True", f"--config.data.image_size={NEW_SIZE}",
                     f"--config.checkpoint_path={checkpoint}")
  assert run.returncode == 0, run.stderr[-3000:]
  results = read_json(tmp_path / "eval_only_results" / f"step_000006_{NEW_SIZE}px.json")
  assert results["step"] == 6 and results["num_examples"] == 360
  run = run_train_py(tmp_path / "other", "--config.eval_only=True", "--config.model.width=4",
                     f"--config.checkpoint_path={checkpoint}")
  assert run.returncode == 1 and "VariableMismatchError: Checkpoint" in run.stderr


def test_eval_only_in_a_training_workdir_keeps_the_training_result(checkpoint, tmp_path):
  """Eval-only at another size writes its own file (step and size in its name); the training
  run's eval_results.json, and what the report lists for the run, stay the training ones."""
  from aa_flax import report
  workdir = tmp_path / "trained"
  shutil.copytree(checkpoint.parent.parent, workdir)
  trained = (workdir / "eval_results.json").read_bytes()
  result = aa_flax.train_and_evaluate(
      tiny_config(num_train_steps=6, eval_only=True, data__image_size=NEW_SIZE), str(workdir))
  assert (workdir / "eval_results.json").read_bytes() == trained
  written = read_json(workdir / "eval_only_results" / f"step_000006_{NEW_SIZE}px.json")
  assert {k: written[k] for k in ("step", "top1", "top5", "loss", "num_examples")} == \
      {k: result[k] for k in ("step", "top1", "top5", "loss", "num_examples")}
  assert written["image_size"] == [NEW_SIZE, NEW_SIZE]
  assert written["checkpoint"] == str(workdir / "checkpoints" / "6")
  assert report.load_run(str(workdir)).results == json.loads(trained)
