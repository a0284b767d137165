"""Training system end to end: train_and_evaluate, sharding, multi-process, resume, errors."""

import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aa_flax
from aa_flax import optim, parallel, trainer
from aa_flax.config_utils import base_config, flatten, load_config
from aa_flax.data import load_splits
from aa_flax.errors import ConfigError
from aa_flax.models import list_models
from aa_flax.progress import Progress
from train_helpers import (REPO_ROOT, SHARED_DATA, assert_trees_equal, final_state, read_json,
                           read_jsonl, run_train_py, subprocess_env, tiny_config,
                           train_py_command)


pytestmark = pytest.mark.usefixtures("fast_compiles")


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):  # the library's lines (not those of orbax, jax, ...)
    if f"{os.sep}aa_flax{os.sep}" in record.pathname:
      self.records.append(record)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """One uninterrupted 12-step run of the tiny config on digits (8 devices), and the values of
  its console lines in order (a heartbeat line after every step and eval batch: interval 0)."""
  workdir = tmp_path_factory.mktemp("digits")
  console, absl_logger = _Records(), logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.addHandler(console)
  absl_logger.setLevel(logging.INFO)
  try:
    result = aa_flax.train_and_evaluate(tiny_config(), str(workdir),
                                        progress=Progress("log", interval_s=0))
  finally:
    absl_logger.removeHandler(console)
    absl_logger.setLevel(level)
  return workdir, result, [record.args for record in console.records]


def test_digits_end_to_end(digits_run):
  workdir, result, console = digits_run
  results = read_json(workdir / "eval_results.json")
  assert set(results) == {"step", "top1", "top5", "loss", "num_examples"}
  assert results["step"] == 12 and results["num_examples"] == 360
  assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
  assert results == {k: result[k] for k in results} and result["preempted"] is False
  # Digits counts are exact fractions of 360.
  assert abs(results["top1"] * 360 - round(results["top1"] * 360)) < 1e-9
  records = read_jsonl(workdir / "metrics.jsonl")
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [3, 6, 9, 12]
  assert train[-1]["loss"] < train[0]["loss"] - 0.1  # loss falls
  assert all(np.isfinite(r["loss"]) and r["learning_rate"] > 0 for r in train)
  assert [r for r in records if r["split"] == "eval"][-1]["top1"] == results["top1"]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert read_json(workdir / "config.json")["model"]["name"] == "aa_resnet_tiny"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]


def test_eval_only_reproduces_final_eval(digits_run, tmp_path):
  workdir, result, _ = digits_run
  config = tiny_config(eval_only=True, checkpoint_path=str(workdir / "checkpoints" / "12"))
  evaluated = aa_flax.train_and_evaluate(config, str(tmp_path))
  assert {k: evaluated[k] for k in ("step", "top1", "top5", "loss", "num_examples")} == \
      {k: result[k] for k in ("step", "top1", "top5", "loss", "num_examples")}
  written = read_json(tmp_path / "eval_only_results" / "step_000012_8px.json")
  assert written["top1"] == result["top1"] and not (tmp_path / "eval_results.json").exists()


def test_evaluate_checkpoint_takes_the_newest_step_of_the_workdir(digits_run, tmp_path):
  workdir, result, _ = digits_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  trained = (run / "eval_results.json").read_bytes()
  evaluated = aa_flax.evaluate_checkpoint(tiny_config(), str(run))  # eval_only not set
  assert evaluated["step"] == 12 and evaluated["top1"] == result["top1"]
  assert read_json(run / "eval_only_results" / "step_000012_8px.json")["checkpoint"] == \
      str(run / "checkpoints" / "12")
  assert (run / "eval_results.json").read_bytes() == trained
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["12", "6"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_middle_checkpoint_matches_uninterrupted(digits_run, tmp_path, num_workers):
  """Also when the resumed run reads (and evaluates) with worker processes."""
  workdir, result, _ = digits_run
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / "12")  # as if killed between steps 6 and 12
  (resumed_dir / "eval_results.json").unlink()
  config = tiny_config(**{"data.num_workers": num_workers})
  resumed = aa_flax.train_and_evaluate(config, str(resumed_dir))
  assert resumed == result
  assert_trees_equal(final_state(resumed_dir), final_state(workdir))
  assert read_jsonl(resumed_dir / "metrics.jsonl") == read_jsonl(workdir / "metrics.jsonl")


def test_console_shows_the_time_waiting_for_data(digits_run):
  # The metric lines: step, steps, loss, accuracy, lr, img/s, data wait ms/step and %, ETA.
  metric_lines = [values for values in digits_run[2] if len(values) == 9]
  assert [values[:2] for values in metric_lines] == [(3, 12), (6, 12), (9, 12), (12, 12)]
  for values in metric_lines:
    assert values[6] >= 0 and 0 <= values[7] <= 100, values


def test_console_shows_what_runs_from_the_first_seconds(digits_run):
  """Before step 1: data, model, init and compilation; then a heartbeat after every step (interval
  0 here) and the evaluation's count of examples."""
  console = digits_run[2]
  data, model, initialising, compiling, first_step = console[:5]
  assert data == ("digits", 1437, 360, 10, "8x8x1")
  name, params_m, steps, batch, _, _, devices, attention = model
  assert (name, steps, batch, devices) == ("aa_resnet_tiny", 12, tiny_config().batch_size, 8)
  assert params_m > 0 and attention.endswith("stage2: 4x4 xla x1; stage3: 2x2 xla x1")
  assert initialising == compiling == ()  # events without values
  assert first_step[0] == 1 and first_step[1] > 0  # step 1 and its seconds
  # Heartbeats (step, steps, img/s, ETA): one per step, each naming the newest step the device
  # had finished: never decreasing.
  heartbeats = [values for values in console[5:] if len(values) == 4 and values[1] == 12]
  done = [values[0] for values in heartbeats]
  assert len(done) == 12 and done == sorted(done) and all(1 <= d <= 12 for d in done)
  assert all(re.fullmatch(r"[-:0-9]{8}", values[3]) for values in heartbeats)
  assert console[-1][-1] == 360 and (360, 360) in console  # the eval count reaches 360/360


def test_resume_on_another_device_count_is_allowed_and_logged(digits_run, tmp_path):
  workdir, result, _ = digits_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "12")
  (resumed / "eval_results.json").unlink()
  run = subprocess.run(train_py_command(resumed), env=subprocess_env(num_devices=4),
                       capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (f"Checkpoint {resumed / 'checkpoints' / '6'} was written on 8 devices and resumes on "
          "4: training continues correctly, but results are no longer bitwise equal to an "
          "uninterrupted run.") in run.stderr
  assert read_json(resumed / "eval_results.json")["step"] == result["step"]


@pytest.mark.long_running
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_npz_end_to_end_with_padded_eval(tmp_path):
  config = tiny_config(**{
      "data.name": "npz", "data.image_size": 16,
      "data.train_files": str(SHARED_DATA / "imagenette_64px_train_subset.npz"),
      "data.eval_files": str(SHARED_DATA / "imagenette_64px_val_subset.npz"),
      "data.augment": "flip", "batch_size": 32, "eval_batch_size": 64, "half_precision": True,
      "num_train_steps": 16, "log_every_steps": 4, "checkpoint_every_steps": 100,
      "optimizer.base_learning_rate": 2.0})
  result = aa_flax.train_and_evaluate(config, str(tmp_path))
  assert result["num_examples"] == 500  # 500 = 7 x 64 + 52: the last batch is padded
  assert read_json(tmp_path / "eval_results.json")["num_examples"] == 500
  train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  params = jax.tree.leaves(final_state(tmp_path)["params"])  # bf16 compute, f32 params
  assert params and all(p.dtype == np.float32 for p in params)


def test_one_device_and_eight_devices_agree():
  """The same 3 train steps of the tiny model on a mesh of 1 and of 8 devices."""
  assert jax.device_count() == 8
  config = tiny_config()
  splits = load_splits(config.data, seed=0)
  model = trainer.build_model(config, splits.num_classes, jnp.float32)
  schedule = optim.create_learning_rate_schedule(config.optimizer, 16, 10.0, 100)
  tx = optim.create_optimizer(config.optimizer, schedule)

  @jax.jit
  def initial_state():
    variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 1)), train=False)
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              opt_state=tx.init(variables["params"]))

  initial = jax.device_get(initial_state())
  train_step = trainer.make_train_step(model, tx, schedule, mean=splits.mean, std=splits.std,
                                       dtype=jnp.float32, label_smoothing=0.1, seed=0,
                                       skip_nonfinite=False)

  def losses_and_state(devices, steps=3):
    mesh = parallel.create_mesh(devices)
    sharding = jax.tree.map(lambda _: parallel.replicated(mesh), initial)
    state = jax.device_put(initial, sharding)
    step_fn = jax.jit(train_step, in_shardings=(sharding, parallel.batch_sharded(mesh)),
                      out_shardings=(sharding, parallel.replicated(mesh)), donate_argnums=0)
    losses = []
    for step in range(steps):
      rows = slice(16 * step, 16 * (step + 1))
      batch = parallel.global_batch({"image": splits.train.images[rows],
                                     "label": splits.train.labels[rows]}, mesh)
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)

  losses_1, state_1 = losses_and_state(jax.devices()[:1])
  losses_8, state_8 = losses_and_state(jax.devices())
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  # BatchNorm statistics are over the global batch on 8 devices too.
  assert_trees_equal(state_8.batch_stats, state_1.batch_stats, rtol=1e-4, atol=1e-6)
  assert_trees_equal(state_8.params, state_1.params, rtol=1e-4, atol=1e-6)


_MULTI_PROCESS_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)
    port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    import aa_flax
    from train_helpers import tiny_config
    result = aa_flax.train_and_evaluate(tiny_config(num_train_steps=6), workdir)
    print("RESULT", json.dumps(result))
""")


@pytest.mark.long_running
def test_two_processes_match_one_process(tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_MULTI_PROCESS_WORKER)
  env = subprocess_env(num_devices=4)
  env["PYTHONPATH"] = f"{REPO_ROOT / 'tests'}:{env['PYTHONPATH']}"
  workers = [subprocess.Popen([sys.executable, str(script), str(port), str(i),
                               str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
  single = aa_flax.train_and_evaluate(tiny_config(num_train_steps=6), str(tmp_path / "one"))
  outputs = [w.communicate(timeout=300)[0] for w in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  results = [json.loads(line.split("RESULT ", 1)[1])
             for output in outputs for line in output.splitlines() if line.startswith("RESULT")]
  assert len(results) == 2 and results[0] == results[1]
  assert results[0]["num_examples"] == single["num_examples"] == 360
  assert results[0]["loss"] == pytest.approx(single["loss"], rel=1e-4)
  assert results[0]["top1"] == pytest.approx(single["top1"], abs=1 / 360 + 1e-9)
  assert_trees_equal(final_state(tmp_path / "two")["params"],
                     final_state(tmp_path / "one")["params"], rtol=1e-3, atol=1e-5)


def test_unknown_model_and_dataset_and_bad_batch_size(tmp_path):
  with pytest.raises(ConfigError, match="unknown model 'aa_resnet9'; closest: aa_resnet50"):
    aa_flax.train_and_evaluate(tiny_config(**{"model.name": "aa_resnet9"}), str(tmp_path))
  with pytest.raises(ConfigError, match="position_encoding 'learned' is not one of"):
    aa_flax.train_and_evaluate(
        tiny_config(**{"model.attention.position_encoding": "learned"}), str(tmp_path))
  with pytest.raises(ConfigError, match="Unknown dataset config.data.name='mnist'"):
    aa_flax.train_and_evaluate(tiny_config(**{"data.name": "mnist"}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"config.batch_size=12 must be a positive multiple of "
                                        r"the number of devices \(8"):
    aa_flax.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))
  with pytest.raises(ConfigError, match="config.eval_batch_size=100"):
    aa_flax.train_and_evaluate(tiny_config(eval_batch_size=100), str(tmp_path))
  with pytest.raises(ConfigError, match=r"config.batch_size=1440 is larger than the training "
                                        r"set \(1437 examples\); use at most 1437"):
    aa_flax.train_and_evaluate(tiny_config(batch_size=1440), str(tmp_path))
  for key, value, valid in [
      ("optimizer.base_learning_rate", -0.1, ">= 0.0"),
      ("optimizer.base_learning_rate", float("nan"), ">= 0.0"),
      ("optimizer.warmup_epochs", -1.0, ">= 0.0"),
      ("label_smoothing", 1.0, r"in \[0.0, 1.0\)"),
      ("label_smoothing", -0.1, r"in \[0.0, 1.0\)"),
      ("max_skipped_fraction", 1.5, r"in \[0.0, 1.0\]")]:
    with pytest.raises(ConfigError, match=rf"^config.{re.escape(key)}={value} is invalid; it "
                                          rf"must be a finite number {valid}.$"):
      aa_flax.train_and_evaluate(tiny_config(**{key: value}), str(tmp_path))
  assert not any(tmp_path.iterdir())  # nothing written before the config is known good


def test_train_py_missing_imagenet_exits_with_instructions(tmp_path):
  run = run_train_py(tmp_path / "w", "--config.data.name=imagenet2012",
                     "--config.data.image_size=32", "--config.data.augment=inception",
                     f"--config.data.tfds_data_dir={tmp_path / 'tfds'}")
  assert run.returncode == 1
  assert "DatasetNotFoundError" in run.stderr and "downloads/manual" in run.stderr
  assert "ILSVRC2012_img_val.tar" in run.stderr
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_load_config_matches_train_py_syntax():
  config = load_config(str(REPO_ROOT / "configs" / "cifar.py:se_wrn28_10,cifar10"))
  assert (config.model.name, config.data.name) == ("se_wrn28_10", "cifar10")
  assert load_config(str(REPO_ROOT / "configs" / "default.py")).model.name == "aa_resnet_tiny"
  with pytest.raises(ConfigError, match="does not exist"):
    load_config("configs/nope.py:x")


@pytest.mark.parametrize("name", ["cifar", "imagenet_resnet", "imagenet_mnasnet"])
def test_every_family_config_builds_its_models(name):
  module = _load_config_module(name)
  args = list(module.MODELS)
  if name == "cifar":
    args += [f"{m},cifar10" for m in module.MODELS]
  if name == "imagenet_resnet":
    args += [f"aa_resnet{d},{e}" for d in (34, 50) for e in module.POSITION_ENCODINGS]
  if name == "imagenet_mnasnet":
    args += [f"aa_mnasnet_1.0,{p}" for p in module.PLACEMENTS]
  for arg in args:
    config = module.get_config(arg)
    assert set(flatten(config)) == set(flatten(base_config()))  # every key in every config
    assert config.model.name in list_models()
    trainer.build_model(config, 10, jnp.float32)
    assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0
  assert module.__doc__.count("python train.py --config=configs/") >= 1
  with pytest.raises(ValueError, match="valid"):
    module.get_config("resnet9000")


def test_mnasnet_configs_share_the_final_learning_rate():
  module = _load_config_module("imagenet_mnasnet")
  finals = []
  for arg in ("mnasnet_1.0", "aa_mnasnet_1.0"):
    config = module.get_config(arg)
    schedule = optim.create_learning_rate_schedule(config.optimizer, 1024, 1251.0, 350 * 1251)
    finals.append(float(schedule(350 * 1251 - 1)))
    peak = optim.peak_learning_rate(config.optimizer, 1024)
    assert float(schedule(5 * 1251)) == pytest.approx(peak, rel=1e-5)
  assert finals[1] == pytest.approx(finals[0], rel=1e-3)
  assert module.get_config("aa_mnasnet_1.0").optimizer.base_learning_rate == 0.008


def test_learning_rate_schedule_and_weight_decay_mask():
  config = base_config().optimizer
  schedule = optim.create_learning_rate_schedule(config, batch_size=512, steps_per_epoch=10,
                                                 total_steps=100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(25)) == pytest.approx(0.1)  # half-way through the 5-epoch warm-up
  assert float(schedule(50)) == pytest.approx(0.2)  # peak 0.1 x 512 / 256
  assert float(schedule(75)) == pytest.approx(0.1, rel=1e-5)  # cosine midpoint
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
  config.momentum, config.nesterov = 0.0, False
  tx = optim.create_optimizer(config, lambda _: 1.0)
  params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
            "bn": {"scale": jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -1e-4)  # decayed
  np.testing.assert_allclose(updates["conv"]["bias"], 0.0)  # not decayed
  np.testing.assert_allclose(updates["bn"]["scale"], 0.0)
  with pytest.raises(ConfigError, match="Unknown config.optimizer.name='adam'.*sgd, rmsprop"):
    config.name = "adam"
    optim.create_optimizer(config, lambda _: 1.0)


@pytest.mark.parametrize("overrides,match", [
    ({"data.mean": (0.5,)}, r"config.data.mean=\(0.5,\) is set but config.data.std is not"),
    ({"data.std": (0.2,)}, r"config.data.std=\(0.2,\) is set but config.data.mean is not"),
    ({"data.mean": (0.5,), "data.std": (0.0,)}, r"config.data.std=\(0.0,\) .*positive"),
    ({"data.mean": (float("nan"),), "data.std": (0.2,)}, r"config.data.mean=\(nan,\) .*finite"),
    ({"optimizer.weight_decay": -1e-4}, r"config.optimizer.weight_decay=-0.0001 is invalid"),
    ({"optimizer.grad_clip_norm": -1.0}, r"config.optimizer.grad_clip_norm=-1.0 is invalid"),
    ({"optimizer.momentum": float("nan")}, r"config.optimizer.momentum=nan is invalid"),
    ({"optimizer.momentum": float("inf")}, r"config.optimizer.momentum=inf is invalid"),
    ({"data.prefetch": -1}, r"config.data.prefetch=-1 .*>= 0"),
    ({"data.num_threads": -1}, r"config.data.num_threads=-1 .*>= 0"),
])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(tmp_path, overrides,
                                                                       match):
  with pytest.raises(ConfigError, match=rf"^{match}[^\n]*$"):
    aa_flax.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_an_unsupported_workdir_scheme_is_refused_in_one_line():
  from aa_flax.errors import WorkdirError
  with pytest.raises(WorkdirError, match=r"^memory://run: unsupported scheme 'memory://'; "
                                         r"use a local path, gs://[^\n]*$"):
    aa_flax.train_and_evaluate(tiny_config(), "memory://run")


def test_train_py_negative_prefetch_prints_one_line_and_writes_nothing(tmp_path):
  run = run_train_py(tmp_path / "w", "--config.data.prefetch=-1", timeout=120)
  assert run.returncode == 1
  lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "config.data.prefetch=-1" in lines[0], run.stderr[-2000:]
  assert "Traceback" not in run.stderr and not (tmp_path / "w").exists()


def test_a_smoke_run_shorter_than_the_warm_up_shortens_it_with_a_warning(caplog):
  config = base_config().optimizer  # warm-up 5 epochs = 50 steps
  with caplog.at_level(logging.WARNING):
    schedule = optim.create_learning_rate_schedule(config, batch_size=512, steps_per_epoch=10,
                                                   total_steps=5)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "(50 steps)" in warnings[0] and "training (5 steps)" in warnings[0]
  assert float(schedule(0)) == pytest.approx(0.2)  # no warm-up left: the peak at once
  assert float(schedule(5)) == pytest.approx(0.0, abs=1e-7)
  with caplog.at_level(logging.WARNING):
    schedule = optim.create_learning_rate_schedule(config, batch_size=512, steps_per_epoch=10,
                                                   total_steps=40)
  assert "warming up over 4 steps" in caplog.records[-1].getMessage()
  assert float(schedule(0)) == 0.0 and float(schedule(4)) == pytest.approx(0.2)
