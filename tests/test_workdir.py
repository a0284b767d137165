"""The workdir layout: the newest committed step, eval-only file names, config reading."""

import json

import pytest

from aa_flax import workdir
from aa_flax.errors import WorkdirError


def test_newest_step_skips_unfinished_and_foreign_entries(tmp_path):
  checkpoints = tmp_path / workdir.CHECKPOINT_DIR
  for name in ("2", "10", "9", "12.orbax-checkpoint-tmp-1700000000", "notes"):
    (checkpoints / name).mkdir(parents=True)
  assert workdir.checkpoint_steps(tmp_path) == [2, 9, 10]
  assert workdir.newest_step_dir(str(tmp_path)) == checkpoints / "10"
  assert workdir.workdir_of(checkpoints / "10") == tmp_path


def test_no_checkpoint_is_a_workdir_error_naming_the_folder(tmp_path):
  assert workdir.checkpoint_steps(tmp_path / "missing") == []
  (tmp_path / workdir.CHECKPOINT_DIR / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(WorkdirError, match=str(tmp_path / workdir.CHECKPOINT_DIR)):
    workdir.newest_step_dir(tmp_path)


def test_eval_only_path_names_step_and_size(tmp_path):
  assert workdir.eval_only_path(tmp_path, 30, (32, 32)) == \
      tmp_path / "eval_only_results" / "step_000030_32px.json"
  assert workdir.eval_only_path(tmp_path, 7, (32, 48)).name == "step_000007_32x48px.json"


def test_read_config_and_json(tmp_path):
  with pytest.raises(WorkdirError, match=str(tmp_path / "config.json")):
    workdir.read_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"seed": 3}))
  assert workdir.read_config(str(tmp_path)) == {"seed": 3}
  assert workdir.read_json(tmp_path / "eval_results.json") is None
