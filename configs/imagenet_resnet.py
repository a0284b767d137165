"""ImageNet ResNets with and without attention augmentation (the paper's Tables 2, 3, 6, 7;
docs/SPECIFICATION.md §4).

Arg: ``<model>[,<position_encoding>]``.
  model: resnet34/50/101/152, aa_resnet34/50/101/152, se_resnet34/50/101/152 (Table 3),
         bam_, cbam_, gala_, ge_resnet34/50/101/152 (other attention modules, Table 2),
         fa_resnet50_0.25/0.5/0.75/1.0 (fully attentional ablation, Table 6).
  position_encoding (AA and FA models only; Table 7): relative (default) | none | sine |
         coordconv.

Commands (imagenet2012 prepared as ArrayRecord in ~/tensorflow_datasets, see
docs/TRAINING.md, "Data"):
  python train.py --config=configs/imagenet_resnet.py:aa_resnet50 --workdir=/tmp/aa_r50
  python train.py --config=configs/imagenet_resnet.py:aa_resnet34,sine --workdir=/tmp/aa_r34s
  python train.py --config=configs/imagenet_resnet.py:cbam_resnet50 --workdir=/tmp/cbam_r50

Recipe: the paper gives TPUv3, 100 epochs, SGD momentum 0.9, 5 warm-up epochs, 224x224
Inception crops; LR, weight decay, label smoothing and batch are [unsure], so this uses the
standard ResNet-50 recipe (docs/SPECIFICATION.md §3): Nesterov SGD, LR 0.1 x B/256 (batch 1024),
5 warm-up epochs then cosine, weight decay 1e-4 on kernels, bf16 compute. The BAM, CBAM,
GALA and GE models use the same recipe, so that Table 2 compares modules, not recipes.
Expected ImageNet top-1 / top-5 (Table 3): ResNet-34 73.6 / 91.5; AA-ResNet-34 74.7 / 92.0;
ResNet-50 76.4 / 93.1; SE-ResNet-50 77.5 / 93.7; AA-ResNet-50 77.7 / 93.8; ResNet-101 77.9 /
94.0; AA-ResNet-101 78.7 / 94.4; ResNet-152 78.4 / 94.2 [unsure top-5]; AA-ResNet-152 79.1 /
94.6 [unsure top-5]. Table 2, ResNet-50 top-1 (SE and AA [sure], the others [unsure]):
BAM 77.3, CBAM 77.4, GALA 77.3, GE 77.6. Table 6 (kappa=upsilon, all [unsure]): 0.25 77.7,
0.5 77.3, 0.75 76.7, 1.0 73.9. Table 7, AA-ResNet-50 [likely]: none 77.5, sine 77.5,
coordconv 77.5, relative 77.7. On 8 TPUv3 cores expect about a day for ResNet-50 (not
measured here).
"""

from aa_flax.config_utils import imagenet_base_config

DEPTHS = (34, 50, 101, 152)
PREFIXES = ("", "aa_", "se_", "bam_", "cbam_", "gala_", "ge_")
MODELS = tuple(f"{prefix}resnet{depth}" for prefix in PREFIXES for depth in DEPTHS) + \
    tuple(f"fa_resnet50_{ratio}" for ratio in ("0.25", "0.5", "0.75", "1.0"))
POSITION_ENCODINGS = ("relative", "none", "sine", "coordconv")


def get_config(arg: str = "aa_resnet50"):
  model, _, encoding = arg.partition(",")
  if model not in MODELS:
    raise ValueError(f"configs/imagenet_resnet.py arg {arg!r}: unknown model {model!r}; valid: "
                     f"{', '.join(MODELS)}.")
  if encoding and (encoding not in POSITION_ENCODINGS or not model.startswith(("aa_", "fa_"))):
    raise ValueError(f"configs/imagenet_resnet.py arg {arg!r}: position encoding must be one of "
                     f"{POSITION_ENCODINGS} and needs an aa_ or fa_ model.")
  config = imagenet_base_config(model)
  if encoding:
    config.model.attention.position_encoding = encoding
  config.num_epochs = 100.0
  config.optimizer.name = "sgd"
  config.optimizer.nesterov = True
  config.optimizer.base_learning_rate = 0.1
  config.optimizer.warmup_epochs = 5.0
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 1e-4
  return config
