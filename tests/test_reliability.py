"""Reliability: preemption (SIGTERM), SIGKILL at random points, corrupt checkpoints, exact
resume, non-finite steps, config changes on resume, bad workdirs.

The subprocess runs use ``train.py`` with the tiny digits config (``train_helpers``)
for 90 steps; resumed runs must end bitwise identical to the uninterrupted one.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aa_flax
from aa_flax import storage
from aa_flax.data import InputPipeline, load_splits
from aa_flax.errors import ConfigError, ConfigMismatchError, NonFiniteError, WorkdirError
from aa_flax.integrity import DigestMismatchError, verify_digest
from aa_flax.preemption import EXIT_PREEMPTED
from aa_flax.workdir_lock import STALE_AFTER_S, WorkdirLock
from train_helpers import (REPO_ROOT, assert_trees_equal, built_once, final_state, read_json,
                           read_jsonl, run_train_py, subprocess_env, tiny_config,
                           train_py_command)

pytestmark = pytest.mark.usefixtures("fast_compiles")

STEPS = 90
CHECKPOINT_EVERY = 30
LONG_RUN = [f"--config.num_train_steps={STEPS}", "--config.log_every_steps=5",
            f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
            "--config.keep_checkpoints=2", "--config.eval_every_steps=20"]


def _start(workdir, *flags) -> subprocess.Popen:
  return subprocess.Popen(train_py_command(workdir, *LONG_RUN, *flags), env=subprocess_env(),
                          cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _logged_step(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return -1
  steps = [line.split(",", 1)[0] for line in path.read_text().splitlines() if line.strip()]
  return max((int(s.split(":")[1]) for s in steps if s.startswith('{"step"')), default=-1)


def _wait_for_step(process: subprocess.Popen, workdir: Path, step: int, timeout=240) -> bool:
  """Waits until ``metrics.jsonl`` shows ``step``; False if the run ended first."""
  deadline = time.monotonic() + timeout
  while _logged_step(workdir) < step:
    if process.poll() is not None:
      return False
    assert time.monotonic() < deadline, "timed out waiting for training to reach a step"
    time.sleep(0.005)
  return True


def _assert_same_run(workdir: Path, reference: Path) -> None:
  assert read_json(workdir / "eval_results.json") == read_json(reference / "eval_results.json")
  assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")
  assert_trees_equal(final_state(workdir), final_state(reference))  # bitwise
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
  assert not leftovers, f"temporary checkpoint directories left behind: {leftovers}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
  """The uninterrupted run, built once however many worker processes run these tests."""
  def train(workdir):
    run = run_train_py(workdir, *LONG_RUN)
    assert run.returncode == 0, run.stderr[-3000:]
  return built_once(tmp_path_factory, "reliability_reference_run", train)


@pytest.mark.long_running
def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(reference_run, tmp_path):
  process = _start(tmp_path)
  reached = _wait_for_step(process, tmp_path, 15)  # a chosen step, between two checkpoints
  assert reached, f"run ended early: {process.stderr.read()[-3000:]}"
  process.send_signal(signal.SIGSTOP)  # holds the lock, alive, until SIGCONT
  with pytest.raises(WorkdirError, match=rf"is in use by another run \(host .*, pid "
                                         rf"{process.pid},"):  # one run per workdir
    aa_flax.train_and_evaluate(tiny_config(), str(tmp_path))
  process.send_signal(signal.SIGCONT)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert "Preempted: checkpoint of step" in stderr
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert 15 <= steps[-1] < STEPS and steps[-1] % CHECKPOINT_EVERY != 0  # the preemption checkpoint
  assert not (tmp_path / "eval_results.json").exists()
  run = run_train_py(tmp_path, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(steps[-1])}" in run.stderr
  _assert_same_run(tmp_path, reference_run)


@pytest.mark.long_running
def test_sigkill_and_sigterm_at_random_points_resume_bitwise(reference_run, tmp_path):
  """Kills land anywhere, saves included (a checkpoint every 5 steps, async)."""
  rng = random.Random(1234)
  took_over = []  # did a run that followed a SIGKILL take over the lock the killed run left?
  previous_killed = False
  for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
    process = _start(tmp_path, "--config.checkpoint_every_steps=5")
    # The run has started training once it logs past what earlier runs logged.
    if _wait_for_step(process, tmp_path, _logged_step(tmp_path) + 1):
      time.sleep(rng.uniform(0.0, 0.5))
    if process.poll() is None:
      process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode in (-signal.SIGKILL, EXIT_PREEMPTED, 0), process.returncode
    if previous_killed:
      took_over.append("Taking over the lock" in stderr and "no longer exists" in stderr)
    previous_killed = process.returncode == -signal.SIGKILL
  assert took_over and all(took_over)
  run = run_train_py(tmp_path, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  _assert_same_run(tmp_path, reference_run)


def test_rerunning_a_finished_run_changes_nothing(reference_run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  evals = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [20, 40, 60, 80, STEPS]
  run = run_train_py(workdir, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  _assert_same_run(workdir, reference_run)


def _flip_one_bit(path: Path, byte: int) -> None:
  data = bytearray(path.read_bytes())
  data[byte] ^= 0x10
  path.write_bytes(bytes(data))


def _damage_newest(workdir: Path, damage: str) -> Path:
  """Damages the largest array file of the newest step; returns that step's directory.
  ``flip_one_bit_no_digest`` also deletes the step's digest."""
  newest = workdir / "checkpoints" / str(STEPS)
  data_files = sorted((f for f in (newest / "state").rglob("*") if f.is_file()),
                      key=lambda f: f.stat().st_size)
  victim = data_files[-1]
  if damage == "truncate":
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  else:  # still parses: only the digest can tell
    _flip_one_bit(victim, victim.stat().st_size // 2)
  if damage == "flip_one_bit_no_digest":
    (newest / "aa_flax_digest.json").unlink()
  return newest


@pytest.mark.parametrize("damage", ["truncate", "flip_one_bit", "flip_one_bit_no_digest"])
def test_damaged_newest_checkpoint_falls_back_to_previous(reference_run, tmp_path, damage):
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  (workdir / "eval_results.json").unlink()
  _damage_newest(workdir, damage)
  run = run_train_py(workdir, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Checkpoint step {STEPS} is unreadable" in run.stderr
  assert f"Resumed from {workdir / 'checkpoints' / str(STEPS - CHECKPOINT_EVERY)}" in run.stderr
  quarantined = list((workdir / "corrupt_checkpoints").iterdir())
  assert [p.name.split("-")[0] for p in quarantined] == [str(STEPS)]
  assert "DigestMismatchError" in (quarantined[0] / "aa_flax_quarantine_reason.txt").read_text()
  _assert_same_run(workdir, reference_run)


def test_every_reader_refuses_a_damaged_checkpoint_with_one_line(reference_run, tmp_path):
  """A flipped bit and no digest: eval-only, fine-tuning from it and the attention figure
  each stop with one line naming the step (no result, no figure); nothing is moved."""
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  newest = _damage_newest(workdir, "flip_one_bit_no_digest")
  for run in (run_train_py(tmp_path / "eval", "--config.eval_only=True",
                           f"--config.checkpoint_path={newest}"),
              run_train_py(tmp_path / "finetune", f"--config.init_from_checkpoint={newest}")):
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: CorruptCheckpointError: Checkpoint {newest} is corrupt: {newest} has no "
        "aa_flax_digest.json"), run.stderr[-3000:]
  assert not (tmp_path / "eval" / "eval_results.json").exists()
  assert not (tmp_path / "finetune" / "checkpoints").exists() or not any(
      (tmp_path / "finetune" / "checkpoints").iterdir())
  figure = tmp_path / "attention.png"
  run = subprocess.run([sys.executable, "-m", "aa_flax.visualize", f"--checkpoint={newest}",
                        "--dataset-index=0", f"--out={figure}"], env=subprocess_env(),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1 and not figure.exists(), run.stderr[-3000:]
  assert run.stderr.strip().splitlines() == [
      line for line in run.stderr.strip().splitlines() if line.startswith("error: ")]
  assert run.stderr.startswith(f"error: CorruptCheckpointError: Checkpoint {newest} is corrupt")
  assert not (workdir / "corrupt_checkpoints").exists()


def test_corrupt_checkpoints_path_that_is_a_file_gives_one_line(reference_run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  _damage_newest(workdir, "flip_one_bit")
  (workdir / "corrupt_checkpoints").write_text("")
  run = run_train_py(workdir, *LONG_RUN)
  assert run.returncode == 1, run.stderr[-3000:]
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: WorkdirError: {workdir / 'corrupt_checkpoints'} exists but is not a directory; "
      "damaged checkpoints are moved there: move that file away and rerun.")
  assert _checkpoint_steps(workdir) == [STEPS - CHECKPOINT_EVERY, STEPS]


def test_one_flipped_bit_in_any_checkpoint_file_is_caught(reference_run, tmp_path):
  step_dir = tmp_path / "step"
  shutil.copytree(reference_run / "checkpoints" / str(STEPS), step_dir)
  assert verify_digest(storage.path(step_dir))
  files = sorted(str(f.relative_to(step_dir)) for f in step_dir.rglob("*") if f.is_file())
  covered = [f for f in files if f.rsplit("/", 1)[-1] not in
             ("commit_success.txt", "_CHECKPOINT_METADATA", "aa_flax_digest.json")]
  assert len(covered) >= 10 and any(f.startswith("state/ocdbt.process_0/d/") for f in covered)
  assert set(files) - set(covered) == {"_CHECKPOINT_METADATA", "aa_flax_digest.json"} | {
      f for f in files if f.endswith("commit_success.txt")}
  rng = random.Random(0)
  for name in covered:
    original = (step_dir / name).read_bytes()
    _flip_one_bit(step_dir / name, rng.randrange(len(original)))
    with pytest.raises(DigestMismatchError, match=re.escape(name)):
      verify_digest(storage.path(step_dir))
    (step_dir / name).write_bytes(original)
  assert verify_digest(storage.path(step_dir))


class _MarkerModel(nn.Module):
  """Linear classifier that breaks on any batch holding an all-white image: its logits turn
  NaN (``breaks='logits'``), or only a running statistic does (``breaks='batch_stats'``:
  loss and gradients stay finite)."""
  num_classes: int = 4
  breaks: str = "logits"

  @nn.compact
  def __call__(self, images, train: bool = False):
    flat = images.reshape(images.shape[0], -1)
    marker = jnp.any(jnp.all(flat > 5.0, axis=-1))  # white = (1 - 0.2) / 0.1 = 8 after norm
    logits = nn.Dense(self.num_classes)(flat)
    if self.breaks == "logits":
      return jnp.where(marker, jnp.nan, logits)
    count = self.variable("batch_stats", "batches_seen", jnp.zeros, ())
    if train:
      count.value = jnp.where(marker, jnp.nan, count.value + 1.0)
    return logits


class _UnusedParameterModel(nn.Module):
  """Linear classifier plus a parameter the loss never reads (its gradient is exactly 0)."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    self.param("unused", nn.initializers.zeros, (3,))
    return nn.Dense(4)(images.reshape(images.shape[0], -1))


def _marker_data(tmp_path, num_markers=2):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 60, (62, 4, 4, 1), np.uint8)
  images = np.concatenate([images, np.full((num_markers, 4, 4, 1), 255, np.uint8)])
  labels = rng.integers(0, 4, len(images))
  np.savez(tmp_path / "train.npz", images=images, labels=labels)
  np.savez(tmp_path / "eval.npz", images=images[:20], labels=labels[:20])


def _marker_config(tmp_path, **overrides):
  return tiny_config(**{
      "data.name": "npz", "data.train_files": str(tmp_path / "train.npz"),
      "data.eval_files": str(tmp_path / "eval.npz"), "data.mean": (0.2,), "data.std": (0.1,),
      "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 24, "log_every_steps": 4,
      "checkpoint_every_steps": 2, "keep_checkpoints": 30, **overrides})


def _marker_steps(config) -> list[int]:
  """Training steps (1-based) whose batch holds a marker image."""
  splits = load_splits(config.data, seed=config.seed)
  dataset = InputPipeline(splits, global_batch_size=config.batch_size,
                          eval_global_batch_size=config.eval_batch_size, image_size=(4, 4),
                          augment="none", seed=config.seed).train_dataset()
  return [b + 1 for b in range(config.num_train_steps)
          if (dataset[b]["image"] == 255).all(axis=(1, 2, 3)).any()]


def _strict_json(text: str):
  def reject(constant):
    raise ValueError(f"non-standard JSON constant {constant}")
  return json.loads(text, parse_constant=reject)


def _checkpoint_steps(workdir: Path) -> list[int]:
  """Steps saved in ``workdir``; a failed run removes a ``checkpoints/`` it left empty."""
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
      if directory.exists() else []


@pytest.mark.parametrize("breaks", ["logits", "batch_stats"])
def test_nonfinite_step_stops_and_every_checkpoint_is_finite(tmp_path, breaks):
  _marker_data(tmp_path)
  config = _marker_config(tmp_path)
  bad_step = _marker_steps(config)[0]
  assert bad_step > 2, "choose data whose first marker comes after the first checkpoint"
  workdir = tmp_path / "run"
  with pytest.raises(NonFiniteError) as error:
    aa_flax.train_and_evaluate(config, str(workdir), model=_MarkerModel(breaks=breaks))
  last_good = (bad_step - 1) // 2 * 2
  message = str(error.value)
  assert f"Step {bad_step}: " in message
  assert f"Last good checkpoint: {workdir / 'checkpoints' / str(last_good)}" in message
  steps = _checkpoint_steps(workdir)
  assert steps[-1] == last_good  # nothing at or after the bad step was saved
  for step in steps:  # params, batch statistics and optimizer state
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_state(workdir, step)))


def test_nonfinite_update_of_finite_gradients_stops_before_any_checkpoint(tmp_path):
  _marker_data(tmp_path, num_markers=0)
  # RMSProp without epsilon divides the zero gradient of the unused parameter by 0.
  config = _marker_config(tmp_path, **{"optimizer.name": "rmsprop",
                                       "optimizer.rmsprop_eps": 0.0})
  workdir = tmp_path / "run"
  with pytest.raises(NonFiniteError) as error:
    aa_flax.train_and_evaluate(config, str(workdir), model=_UnusedParameterModel())
  assert str(error.value).startswith(
      "Step 1: the loss and gradients were finite but the updated parameters, BatchNorm "
      "statistics or optimizer state were not. Last good checkpoint: none")
  assert _checkpoint_steps(workdir) == []


def test_nonfinite_steps_are_skipped_when_asked(tmp_path):
  _marker_data(tmp_path)
  config = _marker_config(tmp_path, on_nonfinite="skip", max_skipped_fraction=0.5)
  bad_steps = _marker_steps(config)
  assert bad_steps
  result = aa_flax.train_and_evaluate(config, str(tmp_path / "run"), model=_MarkerModel())
  assert np.isfinite(result["loss"]) and result["num_examples"] == 20
  train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
  assert train[-1]["skipped_steps"] == len(bad_steps)
  assert all(np.isfinite(r["loss"]) for r in train)  # skipped steps stay out of the means
  state = final_state(tmp_path / "run")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_skip_mode_logs_null_for_skipped_windows_writes_strict_json_and_has_a_limit(tmp_path):
  _marker_data(tmp_path)
  config = _marker_config(tmp_path, on_nonfinite="skip", log_every_steps=1,
                          max_skipped_fraction=1.0,
                          **{"data.eval_files": str(tmp_path / "train.npz")})  # NaN eval loss
  bad_steps = _marker_steps(config)
  workdir = tmp_path / "run"
  aa_flax.train_and_evaluate(config, str(workdir), model=_MarkerModel())
  records = [_strict_json(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r for r in records if r["split"] == "train"}
  for step, record in train.items():
    if step in bad_steps:  # a window whose only step was skipped has no loss, not 0.0
      assert [record[k] for k in ("loss", "accuracy", "grad_norm")] == [None] * 3
      assert record["learning_rate"] > 0
    else:
      assert record["loss"] > 0
  results = _strict_json((workdir / "eval_results.json").read_text())
  assert results["loss"] is None and results["num_examples"] == 64
  _strict_json((workdir / "config.json").read_text())
  limited = _marker_config(tmp_path, on_nonfinite="skip", max_skipped_fraction=0.01)
  first_log = -(-bad_steps[0] // 4) * 4  # the first log step (every 4) after a skipped step
  skipped = sum(step <= first_log for step in bad_steps)
  with pytest.raises(NonFiniteError, match=rf"{skipped} of the first {first_log} steps were "
                                           r"skipped as non-finite, more than "
                                           r"config.max_skipped_fraction=0.01"):
    aa_flax.train_and_evaluate(limited, str(tmp_path / "limited"), model=_MarkerModel())


def test_resume_refuses_model_data_and_recipe_changes_listing_both_values(tmp_path, caplog):
  _marker_data(tmp_path, num_markers=0)
  workdir = str(tmp_path / "run")
  aa_flax.train_and_evaluate(_marker_config(tmp_path, num_train_steps=4), workdir,
                             model=_MarkerModel())
  changed = _marker_config(tmp_path, num_train_steps=8, seed=3, label_smoothing=0.1,
                           log_every_steps=2, **{
                               "data.augment": "flip", "model.name": "resnet50",
                               "optimizer.base_learning_rate": 0.2,
                               "optimizer.schedule": "constant"})
  with pytest.raises(ConfigMismatchError) as error:
    aa_flax.train_and_evaluate(changed, workdir, model=_MarkerModel())
  message = str(error.value)
  for section, line in [
      ("model", "model.name: checkpoint 'aa_resnet_tiny' -> now 'resnet50'"),
      ("data", "data.augment: checkpoint 'none' -> now 'flip'"),
      ("training recipe", "num_train_steps: checkpoint 4 -> now 8"),
      ("training recipe", "seed: checkpoint 0 -> now 3"),
      ("training recipe", "label_smoothing: checkpoint 0.0 -> now 0.1"),
      ("training recipe", "optimizer.base_learning_rate: checkpoint 0.4 -> now 0.2"),
      ("training recipe", "optimizer.schedule: checkpoint 'cosine' -> now 'constant'")]:
    assert f"  {section}:\n" in message and f"    {line}\n" in message
  assert "allow_config_mismatch" in message and "log_every_steps" not in message
  changed.allow_config_mismatch = True
  with caplog.at_level("WARNING"):
    assert aa_flax.train_and_evaluate(changed, workdir, model=_MarkerModel())["step"] == 8
  assert "allow_config_mismatch=True): seed: checkpoint 0 -> now 3" in caplog.text
  # Other contents behind the same npz path.
  with np.load(tmp_path / "train.npz") as data:
    np.savez(tmp_path / "train.npz", images=data["images"], labels=(data["labels"] + 1) % 4)
  changed.allow_config_mismatch = False
  with pytest.raises(ConfigMismatchError, match=r"  data:\n    data.npz_contents: checkpoint "
                                                r"'[0-9a-f]{16}' -> now '[0-9a-f]{16}'\n"):
    aa_flax.train_and_evaluate(changed, workdir, model=_MarkerModel())
  # A changed optimizer: named as such, also when allowed; the checkpoints stay put.
  other_optimizer = _marker_config(tmp_path, num_train_steps=8, **{"optimizer.name": "rmsprop"})
  with pytest.raises(ConfigMismatchError, match="optimizer.name: checkpoint 'sgd' -> now "
                                                "'rmsprop'"):
    aa_flax.train_and_evaluate(other_optimizer, workdir, model=_MarkerModel())
  other_optimizer.allow_config_mismatch = True
  with pytest.raises(ConfigMismatchError, match=r"is intact \(its files match their digest\) "
                                                r"but its train state does not fit"):
    aa_flax.train_and_evaluate(other_optimizer, workdir, model=_MarkerModel())
  shorter = _marker_config(tmp_path, num_train_steps=6, allow_config_mismatch=True)
  with pytest.raises(ConfigError, match="is at step 8, past the 6 steps this config trains"):
    aa_flax.train_and_evaluate(shorter, workdir, model=_MarkerModel())
  assert _checkpoint_steps(tmp_path / "run") == [2, 4, 6, 8]
  assert not (tmp_path / "run" / "corrupt_checkpoints").exists()


def test_resume_with_another_batch_size_continues_at_the_same_example(tmp_path):
  _marker_data(tmp_path, num_markers=0)
  workdir = tmp_path / "run"
  aa_flax.train_and_evaluate(_marker_config(tmp_path, num_train_steps=4), str(workdir),
                             model=_MarkerModel())
  larger = _marker_config(tmp_path, num_train_steps=6, batch_size=16,
                          allow_config_mismatch=True)
  aa_flax.train_and_evaluate(larger, str(workdir), model=_MarkerModel())
  positions = {step: read_json(workdir / "checkpoints" / str(step) / "extra" / "metadata")[
      "data_position"] for step in (2, 4, 6)}
  assert positions == {2: 16, 4: 32, 6: 32 + 2 * 16}  # examples, whatever the batch size


def test_unwritable_workdir_and_full_disk_fail_before_training(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(WorkdirError, match="is not writable"):
    aa_flax.train_and_evaluate(tiny_config(), str(blocker / "workdir"))
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))
  with pytest.raises(WorkdirError, match=r"has 0.0 MiB free but the checkpoints need about"):
    aa_flax.train_and_evaluate(tiny_config(), str(tmp_path / "full"))
  assert not (tmp_path / "full" / "checkpoints").exists()


def test_lock_names_a_live_holder_and_takes_over_stale_ones(tmp_path):
  lock_file = tmp_path / "run.lock"
  gone = subprocess.Popen(["true"])
  gone.wait()  # its pid no longer runs
  here = socket.gethostname()
  for host, pid, age, live in [
      ("other-host", 4242, 30, True),  # another machine, refreshed recently
      ("other-host", 4242, STALE_AFTER_S + 60, False),  # ... that stopped refreshing it
      (here, os.getppid(), 30, True),  # a live process on this machine
      (here, gone.pid, 30, False)]:  # a killed run on this machine
    lock_file.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs",
                                     "refreshed": time.time() - age}))
    lock = WorkdirLock(storage.path(tmp_path))
    if live:
      with pytest.raises(WorkdirError, match=rf"in use by another run \(host {host}, pid {pid},"):
        lock.acquire()
      assert json.loads(lock_file.read_text())["token"] == "theirs"
    else:
      with lock:
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
      assert not lock_file.exists()


_DISK_FULL = textwrap.dedent("""
    # Runs as root of a new user and mount namespace: a 4 MiB tmpfs that fills up after the
    # first checkpoint (a filler file leaves 96 KiB: room for logs, not for a checkpoint).
    import json, os, shutil, subprocess, sys, time
    mount, command = sys.argv[1], sys.argv[2:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount], check=True)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    checkpoints = os.path.join(mount, "w", "checkpoints")
    while not os.path.isdir(os.path.join(checkpoints, "10")) and process.poll() is None:
      time.sleep(0.002)
    with open(os.path.join(mount, "filler"), "wb") as handle:
      handle.write(bytes(max(shutil.disk_usage(mount).free - 96 * 1024, 0)))
    stderr = process.communicate()[1]
    with open(os.path.join(mount, "w", "metrics.jsonl")) as handle:
      metrics = handle.read()
    print(json.dumps({"returncode": process.returncode, "stderr": stderr, "metrics": metrics,
                      "checkpoints": sorted(os.listdir(checkpoints))}))
""")


def test_disk_full_during_a_save_stops_with_one_line_naming_the_last_checkpoint(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  helper = tmp_path / "disk_full.py"
  helper.write_text(_DISK_FULL)
  command = train_py_command(disk / "w", "--config.num_train_steps=40",
                             "--config.log_every_steps=1", "--config.checkpoint_every_steps=10")
  namespace = ["unshare", "--user", "--map-root-user", "--mount"]
  if shutil.which("unshare") is None or subprocess.run(
      [*namespace, "true"], capture_output=True).returncode != 0:
    pytest.skip("no unprivileged user namespaces here to mount a small tmpfs in")
  run = subprocess.run([*namespace, sys.executable, str(helper), str(disk), *command],
                       env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(run.stdout.splitlines()[-1])
  assert report["returncode"] == 1, report["stderr"][-3000:]
  checkpoints = disk / "w" / "checkpoints"
  assert report["stderr"].strip().splitlines()[-1] == (  # the last line, and the only one
      f"error: WorkdirError: Saving checkpoint step 20 in {checkpoints} failed (no space left "
      f"on device). Last complete checkpoint: {checkpoints / '10'}. Fix the cause (e.g. free "
      "space) and rerun to resume from it.")
  assert report["stderr"].count("error: WorkdirError") == 1
  assert "Traceback" not in report["stderr"], report["stderr"][-6000:]
  records = [json.loads(line) for line in report["metrics"].splitlines()]
  assert max(r["step"] for r in records) < 30  # stopped before the next save, not after it
  assert all(r["split"] == "train" for r in records)
  assert [name for name in report["checkpoints"] if name.isdigit()] == ["10"]


@pytest.mark.long_running
def test_sigterm_during_an_evaluation_stops_it_and_the_resumed_run_redoes_it(tmp_path):
  """1,200 eval images in batches of 8 make each evaluation last a second or more; a SIGTERM
  right after a train log line lands in the evaluation at that step: the mid-run one, then
  the final one."""
  rng = np.random.default_rng(0)
  for split, size in (("train", 64), ("eval", 1200)):
    np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (size, 8, 8, 1), np.uint8),
             labels=rng.integers(0, 10, size))
  flags = ["--config.data.name=npz", f"--config.data.train_files={tmp_path / 'train.npz'}",
           f"--config.data.eval_files={tmp_path / 'eval.npz'}", "--config.batch_size=16",
           "--config.eval_batch_size=8", "--config.num_train_steps=8",
           "--config.log_every_steps=4", "--config.eval_every_steps=4",
           "--config.checkpoint_every_steps=100"]
  workdir = tmp_path / "run"
  for stop_at in (4, 8):
    process = subprocess.Popen(train_py_command(workdir, *flags), env=subprocess_env(),
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    assert _wait_for_step(process, workdir, stop_at), process.stderr.read()[-3000:]
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert f"Preemption notice during the evaluation at step {stop_at}: stopping it" in stderr
    assert _checkpoint_steps(workdir)[-1] == stop_at
    assert not (workdir / "eval_results.json").exists()
  run = run_train_py(workdir, *flags)
  assert run.returncode == 0, run.stderr[-3000:]
  records = read_jsonl(workdir / "metrics.jsonl")
  assert [(r["step"], r["split"]) for r in records] == [(4, "train"), (4, "eval"),
                                                        (8, "train"), (8, "eval")]
  assert read_json(workdir / "eval_results.json")["num_examples"] == 1200


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


MULTI_STEPS = 30


def _start_two_processes(workdir: Path, *flags) -> list[subprocess.Popen]:
  """``train.py`` as 2 processes x 1 CPU device (gloo collectives, localhost coordinator).

  One device per process: what is tested here is the agreement between processes, and a gloo
  step then takes ~0.14 s on two cores instead of ~0.5 s with 4 devices each (several devices
  per process are tested in ``test_train.py``)."""
  env = subprocess_env(num_devices=1)
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  port = _free_port()
  return [subprocess.Popen(
      train_py_command(workdir, *LONG_RUN, f"--config.num_train_steps={MULTI_STEPS}", *flags,
                       f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}"),
      env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


@pytest.mark.long_running
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes(tmp_path):
  processes = _start_two_processes(tmp_path)
  assert _wait_for_step(processes[0], tmp_path, 5), processes[0].stderr.read()[-3000:]
  processes[1].send_signal(signal.SIGTERM)  # only one host hears of the preemption
  outputs = [p.communicate(timeout=120)[1] for p in processes]
  assert [p.returncode for p in processes] == [EXIT_PREEMPTED] * 2, outputs[1][-3000:]
  stop_steps = {line.split("checkpoint of step ")[1].split(" ")[0]
                for out in outputs for line in out.splitlines() if "Preempted:" in line}
  assert len(stop_steps) == 1  # both processes stopped after the same step
  stop = int(stop_steps.pop())
  assert stop % 5 == 0 and stop < MULTI_STEPS  # agreed at a log step
  assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == stop
  resumed = _start_two_processes(tmp_path)
  outputs = [p.communicate(timeout=300)[1] for p in resumed]
  assert [p.returncode for p in resumed] == [0, 0], outputs[0][-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(stop)}" in outputs[0]
  results = read_json(tmp_path / "eval_results.json")
  assert results["step"] == MULTI_STEPS and results["num_examples"] == 360
