"""Train-step throughput of any registry model on synthetic data, over all local devices.

Times the step ``train.py`` runs: ``aa_flax.trainer.make_train_step`` (uint8 input
normalisation, the loss, the optimizer of the base config, the finiteness checks), jitted by
``aa_flax.trainer.jit_train_step`` (state replicated and donated, batch sharded on the ``data``
mesh). The synthetic uint8 batch is created on the devices once, so the timed loop does no host
work. ``--no-finite-checks`` drops the finiteness checks (``check_finite=False``), to show
what they cost. Reports compile time, step time, images/s and compiled memory (plus the
device's peak bytes in use where the backend reports it, e.g. GPU).

With ``--input-gap`` it times the same step fed three ways, to show what the input pipeline
costs: ``synthetic`` (one uint8 batch already on the devices), ``pipeline`` (ImageNet-like
JPEG photos through a tfds dataset, ``aa_flax.data.InputPipeline`` and
``aa_flax.parallel.DeviceBatches``, which reads and transfers the next batch while a step
runs) and ``pipeline_inline`` (the same batches read and transferred between the steps).
``gap_ms`` is the step time over ``synthetic``; ``wait_ms`` the time per step spent blocked
on data.

Examples:
  python -m benchmarks.bench_train --models resnet50,aa_resnet50 --batch 256 --dtype bfloat16
  python -m benchmarks.bench_train --models aa_resnet50 --batch 128 \\
      --override attention_stages='(0,1,2,3)' --override attention_pool_stages='()' \\
      --override attention_impl=pallas
  python -m benchmarks.bench_train --input-gap --models resnet_tiny --batch 32 \\
      --image-size 64 --dtype float32 --steps 30 --workers 0
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from aa_flax import config_utils, optim, parallel, trainer
from aa_flax.models import create_model
from benchmarks import common

COLUMNS = ("model", "overrides", "dtype", "batch", "image", "devices", "finite_checks",
           "params_m", "compile_s", "step_ms", "img_per_s", "temp_mib", "peak_mib",
           "device_peak_mib", "loss")
# Per-channel input statistics of the synthetic batches (ImageNet's, as ``train.py`` uses).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SyntheticTraining:
  """The train step ``train.py`` runs for one model, ready to time on a synthetic batch.

  ``train_step``: ``trainer.make_train_step``'s ``(state, batch) -> (state, metrics)``, not
  jitted; ``state``: the initial ``trainer.TrainState`` on the devices (``state_sharding``);
  ``batch``: ``{'image': uint8 [B, S, S, 3], 'label': int32 [B]}`` sharded over ``mesh``.
  """
  model: Any
  train_step: Callable
  state: trainer.TrainState
  batch: dict[str, jax.Array]
  mesh: Any
  state_sharding: Any

  def jitted(self) -> Callable:
    """The step jitted exactly as a run jits it (``trainer.jit_train_step``)."""
    return trainer.jit_train_step(self.train_step, self.state_sharding, self.mesh)


def synthetic_training(model_name: str, batch: int, image_size: int, dtype: str,
                       num_classes: int = 1000, overrides: Optional[dict] = None,
                       check_finite: bool = True, seed: int = 0,
                       devices: Optional[list] = None) -> SyntheticTraining:
  """Builds ``train.py``'s step for ``model_name`` over ``devices`` (default: all local ones;
  base config: optimizer, schedule, label smoothing, non-finite policy), its initial state and
  a random uint8 batch, all on the devices."""
  devices = jax.local_devices() if devices is None else devices
  if batch % len(devices):
    raise ValueError(f"batch {batch} is not divisible by the {len(devices)} local devices")
  config = config_utils.base_config()
  mesh = parallel.create_mesh(devices)
  dtype = jnp.dtype(dtype)
  model = create_model(model_name, num_classes, dtype=dtype, **dict(overrides or {}))
  steps_per_epoch, total_steps = 100.0, 10_000  # the schedule's shape only; timing ignores it
  learning_rate = optim.create_learning_rate_schedule(config.optimizer, batch, steps_per_epoch,
                                                      total_steps)
  tx = optim.create_optimizer(config.optimizer, learning_rate)
  train_step = trainer.make_train_step(
      model, tx, learning_rate, mean=MEAN, std=STD, dtype=dtype,
      label_smoothing=config.label_smoothing, seed=seed,
      skip_nonfinite=check_finite and config.on_nonfinite == "skip", check_finite=check_finite)

  def init(key):
    variables = model.init({"params": key, "dropout": key},
                           jnp.zeros((1, image_size, image_size, 3), dtype), train=False)
    params = variables["params"]
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats=variables.get("batch_stats", {}),
                              opt_state=tx.init(params))

  key_init, key_images, key_labels = jax.random.split(jax.random.key(seed), 3)
  state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh),
                                jax.eval_shape(init, key_init))
  state = jax.jit(init, out_shardings=state_sharding)(key_init)
  sharded = parallel.batch_sharded(mesh)
  images = jax.jit(lambda k: jax.random.randint(k, (batch, image_size, image_size, 3), 0, 256,
                                                jnp.int32).astype(jnp.uint8),
                   out_shardings=sharded)(key_images)
  labels = jax.jit(lambda k: jax.random.randint(k, (batch,), 0, num_classes),
                   out_shardings=sharded)(key_labels)
  return SyntheticTraining(model, train_step, state, {"image": images, "label": labels}, mesh,
                           state_sharding)


def device_peak_mib() -> Optional[float]:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / common.MIB


def measure(model_name: str, batch: int, image_size: int, dtype: str, steps: int,
            warmup: int, num_classes: int = 1000, overrides: Optional[dict] = None,
            check_finite: bool = True, seed: int = 0) -> dict:
  """Compiles and times ``steps`` train steps (after ``warmup``) of one model."""
  overrides = dict(overrides or {})
  setup = synthetic_training(model_name, batch, image_size, dtype, num_classes, overrides,
                             check_finite, seed)
  state, device_batch = setup.state, setup.batch
  start = time.perf_counter()
  compiled = setup.jitted().lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  memory = common.compiled_memory(compiled)
  params = sum(x.size for x in jax.tree.leaves(state.params))

  for _ in range(warmup):
    state, metrics = compiled(state, device_batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, device_batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  devices = jax.local_devices()
  return {
      "model": model_name,
      "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "-",
      "dtype": jnp.dtype(dtype).name, "batch": batch, "image": image_size,
      "devices": f"{len(devices)}x {devices[0].device_kind}",
      "finite_checks": "on" if check_finite else "off", "params_m": params / 1e6,
      "compile_s": compile_s, "step_ms": 1e3 * elapsed / steps,
      "img_per_s": batch * steps / elapsed, "temp_mib": memory["temp_mib"],
      "peak_mib": memory["peak_mib"], "device_peak_mib": device_peak_mib(),
      "loss": float(metrics["loss"]),
  }


INPUT_GAP_COLUMNS = ("model", "feed", "batch", "image", "workers", "devices", "step_ms",
                     "gap_ms", "wait_ms", "img_per_s")


def measure_input_gap(model_name: str, batch: int, image_size: int, dtype: str, steps: int,
                      warmup: int, num_workers: int = 0, num_threads: int = 2,
                      num_images: int = 256, overrides: Optional[dict] = None,
                      seed: int = 0) -> list[dict]:
  """Step time of one model fed synthetic device data vs the real input pipeline."""
  import tempfile

  from aa_flax.data import InputPipeline, load_splits
  from benchmarks import input_data

  setup = synthetic_training(model_name, batch, image_size, dtype, overrides=overrides,
                             seed=seed)
  mesh, devices = setup.mesh, jax.local_devices()
  step = setup.jitted().lower(setup.state, setup.batch).compile()  # every feed runs it

  def timed(next_batch, waited=lambda: 0.0) -> tuple[float, float]:
    state = jax.tree.map(jnp.copy, setup.state)  # the step donates its state
    for _ in range(warmup):
      state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    wait_before, start = waited(), time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, (waited() - wait_before) / steps

  rows = []

  def add(feed, seconds, wait_s):
    rows.append({"model": model_name, "feed": feed, "batch": batch, "image": image_size,
                 "workers": num_workers, "devices": f"{len(devices)}x {devices[0].device_kind}",
                 "step_ms": 1e3 * seconds, "wait_ms": 1e3 * wait_s,
                 "img_per_s": batch / seconds})
    rows[-1]["gap_ms"] = rows[-1]["step_ms"] - rows[0]["step_ms"]
    print(rows[-1], flush=True)

  add("synthetic", *timed(lambda: setup.batch))
  with tempfile.TemporaryDirectory() as data_dir:
    jpegs = input_data.jpeg_images(num_images, seed=seed)
    examples = [(jpeg, index % 1000) for index, jpeg in enumerate(jpegs)]
    input_data.write_tfds_imagenet(data_dir, {"train": examples, "validation": examples[:1]})
    config = config_utils.base_config().data
    config.name, config.tfds_data_dir = "imagenet2012", data_dir
    pipeline = InputPipeline(load_splits(config, seed=seed), global_batch_size=batch,
                             eval_global_batch_size=batch, image_size=(image_size, image_size),
                             augment="inception", seed=seed, num_threads=num_threads,
                             num_workers=num_workers)
    with parallel.DeviceBatches(pipeline.train_iterator(), mesh) as device_batches:
      add("pipeline", *timed(lambda: next(device_batches),
                             lambda: device_batches.wait_seconds))
    with pipeline.train_iterator() as host:
      clock = {"wait": 0.0}

      def inline_batch():
        start = time.perf_counter()
        local = next(host)
        clock["wait"] += time.perf_counter() - start
        return parallel.global_batch(local, mesh)

      add("pipeline_inline", *timed(inline_batch, lambda: clock["wait"]))
  return rows


def main(argv=None):
  parser = common.argument_parser(__doc__, "bench_train")
  parser.add_argument("--models", default="resnet50,aa_resnet50",
                      help="comma-separated registry names (aa_flax.models.list_models())")
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype; params stay f32")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--num-classes", type=int, default=1000)
  common.add_override_argument(parser)
  parser.add_argument("--no-finite-checks", action="store_true",
                      help="drop the step's finiteness checks (what they cost)")
  parser.add_argument("--input-gap", action="store_true",
                      help="time the step fed synthetic data vs the real input pipeline "
                           "(results: <name>_input)")
  parser.add_argument("--workers", type=int, default=0, help="--input-gap: worker processes")
  parser.add_argument("--threads", type=int, default=2, help="--input-gap: reader threads")
  args = parser.parse_args(argv)
  overrides = dict(args.override)
  env = common.environment()
  rows = []
  if args.input_gap:
    for model_name in args.models.split(","):
      rows += measure_input_gap(model_name, args.batch, args.image_size, args.dtype,
                                args.steps, args.warmup, args.workers, args.threads,
                                overrides=overrides)
    common.save_results(f"{args.name}_input", rows, INPUT_GAP_COLUMNS, env, args.out_dir)
    return rows
  for model_name in args.models.split(","):
    rows.append(measure(model_name, args.batch, args.image_size, args.dtype, args.steps,
                        args.warmup, args.num_classes, overrides,
                        check_finite=not args.no_finite_checks))
    print(rows[-1], flush=True)
  common.save_results(args.name, rows, COLUMNS, env, args.out_dir)
  return rows


if __name__ == "__main__":
  main()
