"""Real-data evidence: a plain small ResNet vs the same network with attention augmentation.

Trains ``configs/cifar10_evidence.py:resnet_tiny`` and ``:aa_resnet_tiny`` under one recipe
and budget for every seed, on a class-balanced subset of a CIFAR-10 npz copy, evaluates each
on the whole test set every epoch, then writes the runs' records (config, eval results,
metrics, run info; no checkpoints) to ``<docs>/runs/cifar10_evidence/`` and regenerates
``<docs>/REPRODUCTION.md`` with its figures from every committed run record, plus an attention
map of the first augmented run.

  python -m experiments.cifar10_evidence --data-dir=<dir> --out=runs/cifar10_evidence

``<dir>`` holds ``cifar10_train_part0.npz``, ``cifar10_train_part1.npz`` (the 50,000
training images between them) and ``cifar10_test.npz`` (10,000), each with ``images`` (uint8
``[N, 32, 32, 3]``) and ``labels``; ``--data-note`` says what the data is in the report. The
defaults (16,000 training images, 5 epochs, seeds 0 and 1) are sized for about an hour on a
2-core CPU (estimated from the two models' training speed); a finished run is not trained
again, so rerunning only rebuilds the report. Runs alternate plain / augmented so that load on
a busy machine hits both alike.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional, Sequence

import numpy as np

from aa_flax import report, run_info, tables
from aa_flax.config_utils import load_config
from aa_flax.workdir import (CONFIG_FILE, EVAL_RESULTS_FILE, METRICS_FILE, RUN_INFO_FILE,
                             read_json)
from benchmarks import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "configs", "cifar10_evidence.py")
RECORD_FILES = (CONFIG_FILE, EVAL_RESULTS_FILE, METRICS_FILE, RUN_INFO_FILE)
TRAIN_FILES = ("cifar10_train_part0.npz", "cifar10_train_part1.npz")
TEST_FILE = "cifar10_test.npz"
GROUP = "cifar10_evidence"


def balanced_subset(images: np.ndarray, labels: np.ndarray, per_class: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The first ``per_class`` examples of each class, in their stored order."""
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
  keep.sort()
  if len(keep) != per_class * len(np.unique(labels)):
    raise ValueError(f"fewer than {per_class} examples in some class")
  return images[keep], labels[keep]


def write_subsets(data_dir: str, out_dir: str, train_examples: int,
                  test_examples: Optional[int]) -> tuple[str, str]:
  """npz files of the training subset and the test set (all of it unless ``test_examples``)."""
  def load(names):
    arrays = [np.load(os.path.join(data_dir, name)) for name in names]
    return (np.concatenate([a["images"] for a in arrays]),
            np.concatenate([a["labels"] for a in arrays]))

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for names, count, tag in ((TRAIN_FILES, train_examples, "train"),
                            ((TEST_FILE,), test_examples, "test")):
    images, labels = load(names)
    if count:
      images, labels = balanced_subset(images, labels, count // 10)
    path = os.path.join(out_dir, f"cifar10_{tag}_{len(labels)}.npz")
    if not os.path.exists(path):
      np.savez(path, images=images, labels=labels)
    paths.append(path)
  return paths[0], paths[1]


def run_config(model: str, seed: int, train_file: str, test_file: str, epochs: float,
               steps_per_epoch: int, batch_size: int, eval_batch_size: int):
  config = load_config(f"{CONFIG}:{model}")
  config.seed = seed
  config.data.train_files = train_file
  config.data.eval_files = test_file
  config.num_epochs = epochs
  config.batch_size = batch_size
  config.eval_batch_size = eval_batch_size
  config.eval_every_steps = steps_per_epoch
  config.checkpoint_every_steps = steps_per_epoch
  return config


def train(config, workdir: str, notes: Sequence[str]) -> dict:
  """Trains (or resumes) one run and appends its wall time to ``run_info.json``."""
  import aa_flax
  from aa_flax import storage
  finished = read_json(storage.path(workdir) / EVAL_RESULTS_FILE)
  if finished is not None:
    print(f"{workdir}: finished earlier, not trained again", flush=True)
    return finished
  start = time.perf_counter()
  result = aa_flax.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  run_info.record_segment(workdir, wall, result, notes)
  print(f"{workdir}: top-1 {100 * result['top1']:.2f}% in {wall:.0f} s", flush=True)
  return result


def copy_records(workdir: str, target: str) -> None:
  os.makedirs(target, exist_ok=True)
  for name in RECORD_FILES:
    shutil.copy2(os.path.join(workdir, name), os.path.join(target, name))


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = common.argument_parser(__doc__, None)
  parser.add_argument("--data-dir", required=True,
                      help="directory with cifar10_train_part{0,1}.npz and cifar10_test.npz")
  parser.add_argument("--data-note", default="CIFAR-10 (JPEG q75 copy, not bit-exact CIFAR-10)",
                      help="what the data is, printed with the results")
  parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", GROUP),
                      help="workdirs and the subset files go here")
  parser.add_argument("--docs", default=os.path.join(REPO_ROOT, "docs"),
                      help="REPRODUCTION.md, figures/ and runs/ are written here")
  parser.add_argument("--models", default="resnet_tiny,aa_resnet_tiny")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--train-examples", type=int, default=16_000,
                      help="class-balanced training subset (a multiple of 10)")
  parser.add_argument("--test-examples", type=int, default=0,
                      help="class-balanced test subset; 0 = all 10,000 test images")
  parser.add_argument("--epochs", type=float, default=5.0)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--eval-batch-size", type=int, default=400)
  parser.add_argument("--report-tables", type=tables.parse_table_numbers,
                      default="1,2,3,4,6,7", help="paper tables in the regenerated report")
  parser.add_argument("--no-flops", action="store_true", help="report without our GFLOPs")
  args = parser.parse_args(argv)
  if args.train_examples % 10 or args.test_examples % 10:
    parser.error("--train-examples and --test-examples must be multiples of 10")

  train_file, test_file = write_subsets(args.data_dir, os.path.join(args.out, "data"),
                                        args.train_examples, args.test_examples)
  steps_per_epoch = max(1, args.train_examples // args.batch_size)
  test_count = args.test_examples or 10_000
  notes = [f"{args.data_note}: training subset of "
           f"{args.train_examples:,} images ({args.train_examples // 10:,} per class, the first "
           f"of each class in {' + '.join(TRAIN_FILES)}); test: {test_count:,} images of "
           f"{TEST_FILE}; evaluated on them every {steps_per_epoch} steps (about an epoch)."]
  records_root = os.path.join(args.docs, "runs", GROUP)
  seeds = [int(s) for s in args.seeds.split(",")]
  models = args.models.split(",")
  for seed in seeds:
    for model in models:
      name = f"{model}_seed{seed}"
      workdir = os.path.join(args.out, name)
      config = run_config(model, seed, train_file, test_file, args.epochs, steps_per_epoch,
                          args.batch_size, args.eval_batch_size)
      train(config, workdir, notes)
      copy_records(workdir, os.path.join(records_root, name))

  extra = []
  augmented = [m for m in models if m.startswith("aa_")]
  if augmented:
    from aa_flax import visualize
    run_name = f"{augmented[0]}_seed{seeds[0]}"
    loaded = visualize.load_trained(os.path.join(args.out, run_name))
    image, label = visualize.load_labelled_image(loaded=loaded, dataset_index=0)
    figure = f"{GROUP}_attention.png"
    maps = visualize.save_attention_figure(loaded, image, [(8, 8), (16, 16), (24, 20)],
                                           os.path.join(args.docs, "figures", figure),
                                           label=label)
    extra = ["", f"Attention of the trained `{run_name}` (layer `{maps.layer}`, "
             f"{maps.grid[0]}x{maps.grid[1]} grid) on the first test image, per head, for three "
             "query pixels (`python -m aa_flax.visualize`):", "",
             f"![attention maps](figures/{figure})"]
  runs, skipped = report.find_runs(os.path.join(args.docs, "runs", "*", "*"))
  command = " ".join(["python -m experiments.cifar10_evidence",
                      *_portable(argv if argv is not None else sys.argv[1:])])
  report.build_report(runs, os.path.join(args.docs, "REPRODUCTION.md"),
                      args.report_tables, not args.no_flops,
                      skipped, command, extra)
  print(f"Wrote {os.path.join(args.docs, 'REPRODUCTION.md')} from {len(runs)} run record(s).")


def _portable(argv: Sequence[str]) -> list[str]:
  """``argv`` as a reader can rerun it: this machine's data folder becomes a placeholder."""
  placeholder = "<folder of the CIFAR-10 npz files>"
  portable, after_flag = [], False
  for arg in argv:
    if after_flag:
      arg, after_flag = placeholder, False
    elif arg == "--data-dir":
      after_flag = True
    elif arg.startswith("--data-dir="):
      arg = f"--data-dir={placeholder}"
    portable.append(arg)
  return portable


if __name__ == "__main__":
  main()
