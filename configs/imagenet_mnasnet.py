"""ImageNet MnasNet-A1 with and without attention augmentation (the paper's Table 4;
docs/SPECIFICATION.md §4).

Arg: ``<model>[,<placement>]``.
  model: ``mnasnet_<width>`` or ``aa_mnasnet_<width>``, width in 0.75 | 1.0 | 1.25 | 1.4.
  placement (aa_ models only): ``first_stage`` (default: the first augmented stage pools its
         attention input by 2, leaving two layers attending at 28x28) | ``max14`` (every
         augmented layer pools its attention input to at most 14x14; see docs/TABLES.md).

Commands (imagenet2012 prepared as ArrayRecord, see docs/TRAINING.md, "Data"):
  python train.py --config=configs/imagenet_mnasnet.py:aa_mnasnet_1.0 --workdir=/tmp/aa_mnas
  python train.py --config=configs/imagenet_mnasnet.py:aa_mnasnet_1.0,max14 --workdir=/tmp/m14

Recipe (docs/SPECIFICATION.md §3, all [unsure]): the MnasNet recipe: RMSProp (decay 0.9, momentum
0.9, eps 1e-3), 350 epochs, LR 0.016 x B/256 with 5 warm-up epochs then staircase exponential
decay 0.97 every 2.4 epochs, weight decay 1e-5, label smoothing 0.1, Inception crops, bf16.
Augmented nets use half the peak LR, with the decay rate raised so that the final LR equals
the baseline's.
Expected ImageNet top-1 / top-5 (Table 4, all [unsure]): 0.75: 73.3 / 91.3 -> AA 73.9 / 91.6;
1.0: 75.2 / 92.4 -> AA 75.7 / 92.6; 1.25: 76.7 / 93.2 -> AA 77.2 / 93.6; 1.4: 77.2 / 93.5 ->
AA 77.7 / 93.8.
"""

import math

from aa_flax.config_utils import imagenet_base_config

WIDTHS = ("0.75", "1.0", "1.25", "1.4")
MODELS = tuple(f"{prefix}mnasnet_{width}" for prefix in ("", "aa_") for width in WIDTHS)
# Placement -> config.model keys (MnasNet fields).
PLACEMENTS = {"first_stage": {}, "max14": dict(attention_pool_stages=(), attention_max_size=14)}
EPOCHS, WARMUP_EPOCHS, DECAY_EPOCHS, DECAY_RATE = 350.0, 5.0, 2.4, 0.97


def get_config(arg: str = "aa_mnasnet_1.0"):
  model, _, placement = arg.partition(",")
  if model not in MODELS:
    raise ValueError(f"configs/imagenet_mnasnet.py arg {arg!r}: unknown model {model!r}; valid: "
                     f"{', '.join(MODELS)}.")
  augmented = model.startswith("aa_")
  if placement and (placement not in PLACEMENTS or not augmented):
    raise ValueError(f"configs/imagenet_mnasnet.py arg {arg!r}: placement must be one of "
                     f"{tuple(PLACEMENTS)} and needs an aa_ model.")
  config = imagenet_base_config(model)
  for key, value in PLACEMENTS[placement or "first_stage"].items():
    config.model[key] = value
  config.num_epochs = EPOCHS
  config.label_smoothing = 0.1
  config.optimizer.name = "rmsprop"
  config.optimizer.momentum = 0.9
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.rmsprop_eps = 1e-3
  config.optimizer.base_learning_rate = 0.016 * (0.5 if augmented else 1.0)
  config.optimizer.warmup_epochs = WARMUP_EPOCHS
  config.optimizer.schedule = "exponential"
  config.optimizer.decay_epochs = DECAY_EPOCHS
  num_decays = math.floor((EPOCHS - WARMUP_EPOCHS) / DECAY_EPOCHS)
  # Half the peak LR, same final LR: rate' ** n = 2 * rate ** n.
  config.optimizer.decay_rate = DECAY_RATE * (2.0 ** (1.0 / num_decays) if augmented else 1.0)
  config.optimizer.weight_decay = 1e-5
  return config
