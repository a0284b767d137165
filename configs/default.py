"""Embedded default: a small AA-ResNet on scikit-learn's 8x8 digits (no download).

Command:  python train.py --workdir=/tmp/aa_default
Model:    aa_resnet_tiny (3 basic-block stages, width 16, CIFAR stem; AAConv with 4 heads and
          relative position encodings in stages 2 and 3).
Data:     digits, 1,437 train / 360 test images of 8x8x1, no augmentation.
Expected: >= 97% test top-1 in under 3 minutes on a 2-core CPU (measured: see docs/TRAINING.md).
"""

from aa_flax.config_utils import base_config


def get_config():
  config = base_config()
  config.model.name = "aa_resnet_tiny"
  config.data.name = "digits"
  config.data.num_threads = 2
  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_epochs = 30.0
  config.optimizer.base_learning_rate = 0.4  # 0.1 at batch 64
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 300
  return config
