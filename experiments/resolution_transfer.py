"""Accuracy of a 32 px attention-augmented model at other image sizes (relative tables moved
by each ``aa_flax.resolution`` method, re-initialised, or not converted at all).

1. Trains ``configs/cifar10_evidence.py:aa_resnet_tiny`` at 32x32 on a class-balanced subset
   of a CIFAR-10 npz copy with ``aa_flax.train_and_evaluate`` (a finished run is reused).
2. Evaluates its final checkpoint on a class-balanced test subset at every ``--sizes`` with
   the tables converted by each method, re-initialised at the new size (everything else
   trained), and as trained (which the model refuses at any other size: the error is
   recorded). Two input conditions: ``resized`` (the image resized to the size, bilinear, as
   the eval pipeline does) and ``canvas`` (the 32 px image pasted in the middle of a
   size x size canvas of the mean colour: same object scale, larger view; sizes > 32).
3. Fine-tunes at ``--finetune-size`` from that checkpoint (``config.init_from_checkpoint``),
   once per method, and evaluates at that size.

``--data-dir`` holds ``cifar10_train_part{0,1}.npz`` and ``cifar10_test.npz`` (as for
``experiments.cifar10_evidence``). Accuracy does not depend on machine load; wall times do.

  python -m experiments.resolution_transfer --data-dir=<dir> --workdir=/tmp/aa_resolution
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aa_flax import resolution
from benchmarks import common
from experiments import cifar10_evidence

TRAIN_SIZE = 32
COLUMNS = ("input", "size", "tables", "top1", "note")
# Config keys set for every run unless --set gives them: pooling the stage-2 attention (16x16
# -> 8x8) halves the training time on CPU.
DEFAULT_SETTINGS = ("model.attention_pool_stages=(1,)",)


def run_config(args, train_file: str, test_file: str, image_size: int, num_steps: int,
               learning_rate: float, warmup_epochs: float):
  """The CIFAR-10 evidence recipe for ``aa_resnet_tiny`` at ``image_size``, ``num_steps``."""
  from aa_flax.config_utils import load_config
  config = load_config(f"{cifar10_evidence.CONFIG}:aa_resnet_tiny")
  config.data.train_files = train_file
  config.data.eval_files = test_file
  config.data.image_size = image_size
  config.batch_size = args.batch
  config.eval_batch_size = args.eval_batch
  config.num_train_steps = num_steps
  config.optimizer.base_learning_rate = learning_rate
  config.optimizer.warmup_epochs = warmup_epochs
  config.log_every_steps = max(1, min(50, num_steps))
  config.checkpoint_every_steps = num_steps
  for key, value in args.set:
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def eval_images(images: np.ndarray, size: int, condition: str, mean) -> np.ndarray:
  """uint8 ``[N, 32, 32, C]`` -> ``[N, size, size, C]``: resized, or centred on a canvas."""
  from aa_flax.data.preprocess import resize
  if condition == "resized":
    return np.stack([resize(image, (size, size)) for image in images])
  canvas = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
  canvas[:] = np.round(np.asarray(mean) * 255).astype(np.uint8)
  top = (size - images.shape[1]) // 2
  left = (size - images.shape[2]) // 2
  canvas[:, top:top + images.shape[1], left:left + images.shape[2]] = images
  return canvas


def make_predict(model, mean, std):
  """Jitted ``(variables, uint8 images [B, H, W, C]) -> predicted classes [B]`` (normalised
  as in training)."""
  from aa_flax.trainer import normalise
  return jax.jit(lambda v, x: jnp.argmax(
      model.apply(v, normalise(x, mean, std, jnp.float32), train=False), -1))


def accuracy(predict, variables, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
  """Top-1 of ``predict`` over uint8 images, in batches."""
  correct = 0
  for start in range(0, len(images), batch):
    correct += int(np.sum(np.asarray(predict(variables, images[start:start + batch]))
                          == labels[start:start + batch]))
  return correct / len(images)


def table_variants(model, variables, input_shape, seed: int) -> dict[str, Any]:
  """Variables at ``input_shape`` per variant; an exception where the variant cannot run."""
  variants: dict[str, Any] = {}
  try:  # as trained: the model itself checks the table sizes
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                   jax.ShapeDtypeStruct(input_shape, jnp.float32))
    variants["as trained"] = variables
  except ValueError as error:
    variants["as trained"] = error
  for method in resolution.RESAMPLE_METHODS:
    variants[method] = resolution.convert_variables(model, variables, input_shape,
                                                    method=method)
  fresh = jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(
      jnp.zeros(input_shape, jnp.float32))
  variants["re-initialised"] = jax.tree_util.tree_map_with_path(
      lambda path, leaf, new: new if path[-1].key in resolution.TABLE_NAMES else leaf,
      variants[resolution.DEFAULT_METHOD], fresh)
  return variants


def relative_change(model, variables, seed: int, input_shape) -> dict[str, float]:
  """Mean |trained - initial| / mean |initial| of the relative tables and of the qkv kernels
  of the AAConvs, with the initial variables re-created as ``train_and_evaluate`` creates
  them (``model.init`` with ``jax.random.key(seed)`` for params and dropout)."""
  key = jax.random.key(seed)
  initial = jax.jit(lambda x: model.init({"params": key, "dropout": key}, x, train=False))(
      jnp.zeros(input_shape, jnp.float32))
  sums = {"tables": [0.0, 0.0], "qkv kernels": [0.0, 0.0]}
  initial_leaves = dict(resolution.leaves_by_path(initial["params"]))
  for path, leaf in resolution.leaves_by_path(variables["params"]):
    kind = ("tables" if path.rsplit("/", 1)[-1] in resolution.TABLE_NAMES
            else "qkv kernels" if path.endswith("qkv/kernel") else None)
    if kind:
      start = np.asarray(initial_leaves[path])
      sums[kind][0] += float(np.abs(np.asarray(leaf) - start).sum())
      sums[kind][1] += float(np.abs(start).sum())
  return {kind: change / size for kind, (change, size) in sums.items()}


def run(args) -> list[dict[str, Any]]:
  from aa_flax.checkpoint import read_state_arrays
  from aa_flax.data import load_splits
  from aa_flax.trainer import build_model
  from aa_flax.workdir import newest_step_dir

  train_file, test_file = cifar10_evidence.write_subsets(
      args.data_dir, os.path.join(args.workdir, "data"), args.train_examples,
      args.test_examples)
  steps = int(np.ceil(args.epochs * args.train_examples / args.batch))
  config = run_config(args, train_file, test_file, TRAIN_SIZE, steps, args.learning_rate,
                      warmup_epochs=min(0.5, args.epochs / 4))
  workdir = os.path.join(args.workdir, f"train{TRAIN_SIZE}")
  notes = [f"{args.data_note}: {args.train_examples:,} training images (class-balanced)"]
  cifar10_evidence.train(config, workdir, notes)
  checkpoint = str(newest_step_dir(workdir))
  state = read_state_arrays(checkpoint)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  splits = load_splits(config.data, seed=config.seed)
  model = build_model(config, splits.num_classes, jnp.float32)
  images, labels = splits.eval.images, splits.eval.labels
  predict = make_predict(model, splits.mean, splits.std)
  change = relative_change(model, variables, config.seed, (1, *images.shape[1:]))
  print(f"relative change from initialisation: {change}", flush=True)

  rows = []
  for condition in ("resized", "canvas"):
    for size in args.sizes:
      if condition == "canvas" and size <= TRAIN_SIZE:
        continue
      inputs = eval_images(images, size, condition, splits.mean)
      variants = table_variants(model, variables, (1, size, size, images.shape[-1]), args.seed)
      for name, fitted in variants.items():
        row = {"input": condition, "size": size, "tables": name}
        if isinstance(fitted, Exception):
          row["note"] = f"{type(fitted).__name__}: {str(fitted)[:60]}..."
        else:
          row["top1"] = accuracy(predict, fitted, inputs, labels, args.eval_batch)
        rows.append(row)
        print(row, flush=True)

  for method in resolution.RESAMPLE_METHODS if args.finetune_steps else ():
    config = run_config(args, train_file, test_file, args.finetune_size, args.finetune_steps,
                        args.finetune_learning_rate, warmup_epochs=0.0)
    config.init_from_checkpoint = checkpoint
    config.resample_method = method
    start = time.perf_counter()
    result = cifar10_evidence.train(
        config, os.path.join(args.workdir, f"finetune{args.finetune_size}_{method}"), notes)
    rows.append({"input": "resized", "size": args.finetune_size, "tables": method,
                 "top1": result["top1"],
                 "note": f"after {args.finetune_steps} fine-tuning steps at "
                         f"{args.finetune_size} px ({time.perf_counter() - start:.0f} s)"})
    print(rows[-1], flush=True)
  return rows, change


def main(argv=None):
  parser = common.argument_parser(__doc__, "resolution_transfer")
  parser.add_argument("--data-dir", required=True,
                      help="directory with cifar10_train_part{0,1}.npz and cifar10_test.npz")
  parser.add_argument("--data-note", default="CIFAR-10 (JPEG q75 copy, not bit-exact CIFAR-10)",
                      help="what the data is, saved with the results")
  parser.add_argument("--workdir", required=True, help="runs and data subsets go here")
  parser.add_argument("--train-examples", type=int, default=10_000,
                      help="class-balanced training subset (a multiple of 10)")
  parser.add_argument("--test-examples", type=int, default=2_000,
                      help="class-balanced test subset (a multiple of 10)")
  parser.add_argument("--epochs", type=float, default=4.0)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--eval-batch", type=int, default=400)
  parser.add_argument("--learning-rate", type=float, default=0.2, help="per 256 examples")
  parser.add_argument("--set", action="append", type=common.parse_override, default=[],
                      help="config key=value for every run, e.g. model.width=8 (repeatable; "
                           f"defaults: {' '.join(DEFAULT_SETTINGS)})")
  parser.add_argument("--sizes", type=int, nargs="+", default=[24, 32, 40, 48])
  parser.add_argument("--finetune-size", type=int, default=48)
  parser.add_argument("--finetune-steps", type=int, default=40)
  parser.add_argument("--finetune-learning-rate", type=float, default=0.04)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  given = {key for key, _ in args.set}
  args.set = [common.parse_override(s) for s in DEFAULT_SETTINGS
              if common.parse_override(s)[0] not in given] + args.set
  rows, change = run(args)
  extra = {key: value for key, value in vars(args).items() if key not in ("out_dir", "name")}
  extra["relative_change_from_init"] = change
  common.save_results(args.name, rows, COLUMNS, common.environment(), args.out_dir, extra)
  return rows


if __name__ == "__main__":
  main()
