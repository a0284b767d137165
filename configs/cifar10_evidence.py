"""Small CIFAR-10 experiment: a plain small ResNet against the same network with attention
augmentation, under one recipe and budget. The project's own real-data check, not a paper table.

Arg: ``resnet_tiny`` (3 basic-block stages, width 16, CIFAR stem) or ``aa_resnet_tiny`` (the
same with AAConv, 4 heads and relative position logits, in the 16x16 and 8x8 stages).

Data: npz files (``images`` uint8 NHWC, ``labels``) of CIFAR-10:
  python train.py --config=configs/cifar10_evidence.py:aa_resnet_tiny --workdir=/tmp/c10_aa \\
    --config.data.train_files='<dir>/cifar10_train_part*.npz' \\
    --config.data.eval_files=<dir>/cifar10_test.npz
Every run of the comparison, the report and its figures: ``python -m
experiments.cifar10_evidence`` (it sets the subset, epochs and seeds; see its docstring).

Recipe: batch 128, f32, SGD with Nesterov momentum 0.9, LR 0.1 (0.2 per 256) after a
half-epoch linear warm-up, cosine decay, weight decay 5e-4 on kernels, pad-4 crops and flips.
"""

from aa_flax.config_utils import base_config

MODELS = ("resnet_tiny", "aa_resnet_tiny")


def get_config(arg: str = "aa_resnet_tiny"):
  if arg not in MODELS:
    raise ValueError(f"configs/cifar10_evidence.py arg {arg!r}: valid: {', '.join(MODELS)}.")
  config = base_config()
  config.model.name = arg
  config.model.width = 16
  config.data.name = "npz"
  config.data.augment = "cifar"
  config.data.num_threads = 2
  config.batch_size = 128
  config.eval_batch_size = 400
  config.num_epochs = 5.0
  config.half_precision = False
  config.optimizer.name = "sgd"
  config.optimizer.nesterov = True
  config.optimizer.momentum = 0.9
  config.optimizer.base_learning_rate = 0.2
  config.optimizer.warmup_epochs = 0.5
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 1
  return config
