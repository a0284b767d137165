"""CIFAR Wide-ResNet-28-10 with and without attention augmentation (the paper's Table 1;
docs/SPECIFICATION.md §4).

Arg: ``<model>[,<dataset>]`` with model in wrn28_10 | aa_wrn28_10 | se_wrn28_10 | ge_wrn28_10
(gather-excite, the parameter-free GE-θ⁻ variant) and dataset
in cifar100 (default, the paper's table) | cifar10.

Commands (tfds cifar100 prepared as ArrayRecord, see docs/TRAINING.md, "Data"):
  python train.py --config=configs/cifar.py:aa_wrn28_10 --workdir=/tmp/aa_wrn
  python train.py --config=configs/cifar.py:wrn28_10,cifar10 --workdir=/tmp/wrn_c10
With CIFAR-10 as npz files (``python -m aa_flax.data.convert cifar cifar-10-batches-py
data/cifar10``, see docs/TRAINING.md, "Data"):
  python train.py --config=configs/cifar.py:aa_wrn28_10,cifar10 --workdir=/tmp/aa_wrn_c10 \
    --config.data.name=npz --config.data.train_files=data/cifar10/train.npz \
    --config.data.eval_files=data/cifar10/test.npz

Recipe (docs/SPECIFICATION.md §3): 500 epochs, SGD momentum 0.9, LR warm-up from 0 to 0.2 x B/256
over the first 5% of training then cosine; flips and pad-4 crops [likely]. Batch 256 and
weight decay 5e-4 for augmented nets vs 1024 and 2e-4 for baselines [unsure]; SE- and
GE-WRN use the baseline settings.
Expected CIFAR-100 top-1 / top-5 (Table 1): WRN 80.3 / 95.0; GE-WRN 79.8 / 95.0;
SE-WRN 81.0 / 95.3; AA-WRN 81.6 / 95.2. No number has been measured with this code yet.
"""

from aa_flax.config_utils import base_config

MODELS = ("wrn28_10", "aa_wrn28_10", "se_wrn28_10", "ge_wrn28_10")
DATASETS = ("cifar100", "cifar10")
EPOCHS = 500


def get_config(arg: str = "aa_wrn28_10"):
  model, _, dataset = arg.partition(",")
  dataset = dataset or "cifar100"
  if model not in MODELS or dataset not in DATASETS:
    raise ValueError(f"configs/cifar.py arg {arg!r}: expected <model>[,<dataset>]; valid models "
                     f"{MODELS}, valid datasets {DATASETS}.")
  augmented = model == "aa_wrn28_10"
  config = base_config()
  config.model.name = model
  config.data.name = dataset
  config.data.augment = "cifar"
  from aa_flax.data.sources import TFDS_DATASETS
  _, _, config.data.mean, config.data.std = TFDS_DATASETS[dataset]
  config.batch_size = 256 if augmented else 1024
  config.eval_batch_size = 1024
  config.num_epochs = float(EPOCHS)
  config.optimizer.name = "sgd"
  config.optimizer.nesterov = False
  config.optimizer.base_learning_rate = 0.2
  config.optimizer.warmup_epochs = 0.05 * EPOCHS
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4 if augmented else 2e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  return config
