"""Train-step throughput of any registry model on synthetic data, over all local devices.

A self-contained step (needs only jax, flax, optax, numpy): softmax cross-entropy, SGD with
momentum 0.9, ``jax.jit`` over a 1D ``data`` mesh with the batch sharded and the state
replicated and donated. The synthetic batch is created on the devices once, so the timed
loop does no host work. Reports compile time, step time, images/s and compiled memory
(plus the device's peak bytes in use where the backend reports it, e.g. GPU).

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

import argparse
import ast
import functools
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aa_flax.models import create_model
from benchmarks import common

COLUMNS = ("model", "overrides", "dtype", "batch", "image", "devices", "params_m", "compile_s",
           "step_ms", "img_per_s", "temp_mib", "peak_mib", "device_peak_mib", "loss")


def parse_override(text: str) -> tuple[str, Any]:
  """``name=value`` -> ``(name, value)``; value parsed as a Python literal, else a string."""
  if "=" not in text:
    raise ValueError(f"override {text!r} is not of the form name=value")
  name, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return name.strip(), value


def make_train_step(model, tx):
  """``(state, images, labels) -> (state, loss)``; state = params, batch_stats, opt_state."""
  def train_step(state, images, labels):
    def loss_fn(params):
      logits, new_vars = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                     images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
      return loss, new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

  return train_step


def device_peak_mib() -> Optional[float]:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / common.MIB


def measure(model_name: str, batch: int, image_size: int, dtype: str, steps: int,
            warmup: int, num_classes: int = 1000, overrides: Optional[dict] = None,
            seed: int = 0) -> dict:
  """Compiles and times ``steps`` train steps (after ``warmup``) of one model."""
  overrides = dict(overrides or {})
  devices = jax.local_devices()
  if batch % len(devices):
    raise ValueError(f"batch {batch} is not divisible by the {len(devices)} local devices")
  mesh = Mesh(np.array(devices), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  model = create_model(model_name, num_classes, dtype=jnp.dtype(dtype), **overrides)
  tx = optax.sgd(0.1, momentum=0.9)

  key_init, key_images, key_labels = jax.random.split(jax.random.key(seed), 3)
  sample = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  @jax.jit
  def init(key):
    variables = model.init({"params": key}, sample, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"])}

  state = jax.device_put(init(key_init), replicated)
  images = jax.jit(lambda k: jax.random.normal(k, (batch, image_size, image_size, 3),
                                               jnp.dtype(dtype)),
                   out_shardings=sharded)(key_images)
  labels = jax.jit(lambda k: jax.random.randint(k, (batch,), 0, num_classes),
                   out_shardings=sharded)(key_labels)

  step = jax.jit(make_train_step(model, tx), in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, images, labels).compile()
  compile_s = time.perf_counter() - start
  memory = common.compiled_memory(compiled)

  for _ in range(warmup):
    state, loss = compiled(state, images, labels)
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    state, loss = compiled(state, images, labels)
  jax.block_until_ready(loss)
  elapsed = time.perf_counter() - start
  params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return {
      "model": model_name,
      "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "-",
      "dtype": jnp.dtype(dtype).name, "batch": batch, "image": image_size,
      "devices": f"{len(devices)}x {devices[0].device_kind}", "params_m": params / 1e6,
      "compile_s": compile_s, "step_ms": 1e3 * elapsed / steps,
      "img_per_s": batch * steps / elapsed, "temp_mib": memory["temp_mib"],
      "peak_mib": memory["peak_mib"], "device_peak_mib": device_peak_mib(),
      "loss": float(loss),
  }


INPUT_GAP_COLUMNS = ("model", "feed", "batch", "image", "workers", "devices", "step_ms",
                     "gap_ms", "wait_ms", "img_per_s")


def measure_input_gap(model_name: str, batch: int, image_size: int, dtype: str, steps: int,
                      warmup: int, num_workers: int = 0, num_threads: int = 2,
                      num_images: int = 256, overrides: Optional[dict] = None,
                      seed: int = 0) -> list[dict]:
  """Step time of one model fed synthetic device data vs the real input pipeline."""
  import tempfile

  from aa_flax import parallel
  from aa_flax.config_utils import base_config
  from aa_flax.data import InputPipeline, load_splits
  from benchmarks import input_data

  devices = jax.local_devices()
  mesh = parallel.create_mesh(devices)
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  model = create_model(model_name, 1000, dtype=jnp.dtype(dtype), **dict(overrides or {}))
  tx = optax.sgd(0.1, momentum=0.9)
  sample = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(key):
    variables = model.init({"params": key}, sample, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"])}

  train_step = make_train_step(model, tx)

  def uint8_step(state, images, labels):
    return train_step(state, (images.astype(jnp.float32) / 255.0).astype(dtype), labels)

  key = jax.random.key(seed)
  state_shapes = jax.eval_shape(init, key)
  init = init.lower(key).compile()  # compiled once: every feed runs the same programs
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8, sharding=sharded)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharded)
  step = jax.jit(uint8_step, in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=0).lower(
                     state_shapes, images, labels).compile()

  def timed(next_batch, waited=lambda: 0.0) -> tuple[float, float]:
    state = init(key)
    for _ in range(warmup):
      batch_arrays = next_batch()
      state, loss = step(state, batch_arrays["image"], batch_arrays["label"])
    jax.block_until_ready(loss)
    wait_before, start = waited(), time.perf_counter()
    for _ in range(steps):
      batch_arrays = next_batch()
      state, loss = step(state, batch_arrays["image"], batch_arrays["label"])
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / steps, (waited() - wait_before) / steps

  rows = []

  def add(feed, seconds, wait_s):
    rows.append({"model": model_name, "feed": feed, "batch": batch, "image": image_size,
                 "workers": num_workers, "devices": f"{len(devices)}x {devices[0].device_kind}",
                 "step_ms": 1e3 * seconds, "wait_ms": 1e3 * wait_s,
                 "img_per_s": batch / seconds})
    rows[-1]["gap_ms"] = rows[-1]["step_ms"] - rows[0]["step_ms"]
    print(rows[-1], flush=True)

  synthetic = {"image": jax.device_put(np.random.default_rng(seed).integers(
                   0, 256, (batch, image_size, image_size, 3), np.uint8), sharded),
               "label": jax.device_put(np.zeros(batch, np.int32), sharded)}
  add("synthetic", *timed(lambda: synthetic))
  with tempfile.TemporaryDirectory() as data_dir:
    jpegs = input_data.jpeg_images(num_images, seed=seed)
    examples = [(jpeg, index % 1000) for index, jpeg in enumerate(jpegs)]
    input_data.write_tfds_imagenet(data_dir, {"train": examples, "validation": examples[:1]})
    config = base_config().data
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
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet50,aa_resnet50",
                      help="comma-separated registry names (aa_flax.models.list_models())")
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype; params stay f32")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--override", action="append", default=[],
                      help="name=value passed to create_model (repeatable)")
  parser.add_argument("--input-gap", action="store_true",
                      help="time the step fed synthetic data vs the real input pipeline")
  parser.add_argument("--workers", type=int, default=0, help="--input-gap: worker processes")
  parser.add_argument("--threads", type=int, default=2, help="--input-gap: reader threads")
  parser.add_argument("--name", default=None, help="results file name (default: "
                      "bench_train, or bench_train_input with --input-gap)")
  parser.add_argument("--out-dir", default=common.RESULTS_DIR)
  args = parser.parse_args(argv)
  overrides = dict(parse_override(o) for o in args.override)
  env = common.environment()
  rows = []
  if args.input_gap:
    for model_name in args.models.split(","):
      rows += measure_input_gap(model_name, args.batch, args.image_size, args.dtype,
                                args.steps, args.warmup, args.workers, args.threads,
                                overrides=overrides)
    common.save_results(args.name or "bench_train_input", rows, INPUT_GAP_COLUMNS, env,
                        args.out_dir)
    return rows
  for model_name in args.models.split(","):
    rows.append(measure(model_name, args.batch, args.image_size, args.dtype, args.steps,
                        args.warmup, args.num_classes, overrides))
    print(rows[-1], flush=True)
  common.save_results(args.name or "bench_train", rows, COLUMNS, env, args.out_dir)
  return rows


if __name__ == "__main__":
  main()
