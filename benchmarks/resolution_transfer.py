"""Accuracy of a 32 px attention-augmented model at other image sizes (relative tables moved
by each ``aa_flax.resolution`` method, re-initialised, or not converted at all).

1. Trains ``aa_resnet_tiny`` at 32x32 on a subset of a CIFAR-10 npz copy with
   ``aa_flax.train_and_evaluate`` (rerunning with the same ``--workdir`` reuses the run).
2. Evaluates its final checkpoint on the first ``--eval-examples`` test images at every
   ``--sizes`` with the tables converted by each method, re-initialised at the new size
   (everything else trained), and as trained (which the model refuses at any other size: the
   error is recorded). Two input conditions: ``resized`` (the image resized to the size,
   bilinear, as the eval pipeline does) and ``canvas`` (the 32 px image pasted in the middle
   of a size x size canvas of the mean colour: same object scale, larger view; sizes > 32).
3. Fine-tunes at ``--finetune-size`` from that checkpoint (``config.init_from_checkpoint``),
   once per method, and evaluates at that size.

Accuracy does not depend on machine load; wall times printed do.

Example (the table in docs/RESOLUTION.md):
  python -m benchmarks.resolution_transfer --data-dir ../shared/data --workdir /tmp/aa_res
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aa_flax import resolution
from benchmarks import common
from benchmarks.bench_train import parse_override

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SIZE = 32
COLUMNS = ("input", "size", "tables", "top1", "note")
# Config keys set for every run unless --set gives them: the pooled stage-2 attention halves
# the training time on CPU.
DEFAULT_SETTINGS = ("model.width=16", "model.attention_pool_stages=(1,)")


def write_subsets(data_dir: str, out_dir: str, train_examples: int,
                  eval_examples: int) -> tuple[str, str]:
  """The first examples of ``cifar10_train_part0.npz`` / ``cifar10_test.npz`` as npz files."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for source, count, name in (("cifar10_train_part0.npz", train_examples, "train.npz"),
                              ("cifar10_test.npz", eval_examples, "eval.npz")):
    path = os.path.join(out_dir, name)
    with np.load(os.path.join(data_dir, source)) as data:
      images, labels = data["images"], data["labels"]
    if count > len(images):
      raise ValueError(f"{source} has {len(images)} images, fewer than the {count} asked for")
    np.savez(path, images=images[:count], labels=labels[:count])
    paths.append(path)
  return paths[0], paths[1]


def run_config(args, train_file: str, eval_file: str, image_size: int, num_steps: int,
               learning_rate: float, warmup_epochs: float):
  """``configs/default.py`` (aa_resnet_tiny) on the npz subset at ``image_size``."""
  from aa_flax.config_utils import load_config
  config = load_config(os.path.join(REPO_ROOT, "configs", "default.py"))
  config.data.name = "npz"
  config.data.train_files = train_file
  config.data.eval_files = eval_file
  config.data.augment = "cifar"
  config.data.image_size = image_size
  config.data.num_threads = 2
  config.batch_size = args.batch
  config.eval_batch_size = args.eval_batch
  config.num_train_steps = num_steps
  config.optimizer.base_learning_rate = learning_rate
  config.optimizer.warmup_epochs = warmup_epochs
  config.log_every_steps = max(1, min(50, num_steps))
  config.checkpoint_every_steps = num_steps
  config.keep_checkpoints = 1
  for key, value in args.set:
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def latest_step_dir(workdir: str) -> str:
  steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
           if os.path.basename(p).isdigit()]
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  return os.path.join(workdir, "checkpoints", str(max(steps)))


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


def run(args) -> list[dict[str, Any]]:
  import aa_flax
  from aa_flax.checkpoint import read_state_arrays
  from aa_flax.data import load_splits
  from aa_flax.trainer import build_model

  train_file, eval_file = write_subsets(args.data_dir, os.path.join(args.workdir, "data"),
                                        args.train_examples, args.eval_examples)
  steps = int(np.ceil(args.epochs * args.train_examples / args.batch))
  config = run_config(args, train_file, eval_file, TRAIN_SIZE, steps, args.learning_rate,
                      warmup_epochs=min(1.0, args.epochs / 4))
  start = time.perf_counter()
  trained = aa_flax.train_and_evaluate(config, os.path.join(args.workdir, f"train{TRAIN_SIZE}"))
  print(f"trained {steps} steps at {TRAIN_SIZE} px in {time.perf_counter() - start:.0f} s: "
        f"top1 {trained['top1']:.4f}", flush=True)
  checkpoint = latest_step_dir(os.path.join(args.workdir, f"train{TRAIN_SIZE}"))
  state = read_state_arrays(checkpoint)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  splits = load_splits(config.data, seed=config.seed)
  model = build_model(config, splits.num_classes, jnp.float32)
  images, labels = splits.eval.images, splits.eval.labels
  predict = make_predict(model, splits.mean, splits.std)

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
    config = run_config(args, train_file, eval_file, args.finetune_size, args.finetune_steps,
                        args.finetune_learning_rate, warmup_epochs=0.0)
    config.init_from_checkpoint = checkpoint
    config.resample_method = method
    start = time.perf_counter()
    result = aa_flax.train_and_evaluate(
        config, os.path.join(args.workdir, f"finetune{args.finetune_size}_{method}"))
    rows.append({"input": "resized", "size": args.finetune_size, "tables": method,
                 "top1": result["top1"],
                 "note": f"after {args.finetune_steps} fine-tuning steps at "
                         f"{args.finetune_size} px ({time.perf_counter() - start:.0f} s)"})
    print(rows[-1], flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-dir", default=os.path.join(REPO_ROOT, "..", "shared", "data"),
                      help="holds cifar10_train_part0.npz and cifar10_test.npz")
  parser.add_argument("--workdir", required=True, help="runs and data subsets go here")
  parser.add_argument("--train-examples", type=int, default=10_000)
  parser.add_argument("--eval-examples", type=int, default=2_000)
  parser.add_argument("--epochs", type=float, default=4.0)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--eval-batch", type=int, default=500)
  parser.add_argument("--learning-rate", type=float, default=0.4, help="per 256 examples")
  parser.add_argument("--set", action="append", type=parse_override, default=[],
                      help="config key=value for every run, e.g. model.width=8 (repeatable; "
                           f"defaults: {' '.join(DEFAULT_SETTINGS)})")
  parser.add_argument("--sizes", type=int, nargs="+", default=[24, 32, 40, 48])
  parser.add_argument("--finetune-size", type=int, default=48)
  parser.add_argument("--finetune-steps", type=int, default=40)
  parser.add_argument("--finetune-learning-rate", type=float, default=0.04)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--name", default="resolution_transfer")
  parser.add_argument("--out-dir", default=common.RESULTS_DIR)
  args = parser.parse_args(argv)
  given = {key for key, _ in args.set}
  args.set = [parse_override(s) for s in DEFAULT_SETTINGS
              if parse_override(s)[0] not in given] + args.set
  rows = run(args)
  extra = {key: value for key, value in vars(args).items() if key not in ("out_dir", "name")}
  common.save_results(args.name, rows, COLUMNS, common.environment(), args.out_dir, extra)
  return rows


if __name__ == "__main__":
  main()
