"""Attention maps of an AAConv layer: per head, for chosen query pixels, over the input image.

    python -m aa_flax.visualize --workdir=/tmp/aa_default --dataset-index=0 \\
        --query=2,2 --query=5,6 --out=attention.png
    python -m aa_flax.visualize --model=aa_resnet_tiny --image=photo.jpg --image-size=32 \\
        --query=16,16 --layer=stage2_block1/conv1 --out=fresh.png

For notebooks: ``load_trained(workdir)`` or ``fresh_model(name, image_size)`` gives a
``LoadedModel``; ``attention_maps(loaded, image, queries)`` the maps; ``plot_attention`` the
figure (matplotlib). For each query pixel a row shows the input with the query marked and the
N_h per-head maps of the layer (its softmax over keys for the query's cell), upsampled to the
image and overlaid. Strided and pooled layers attend over a coarser grid; the query pixel
picks the grid cell that covers it, and each map is stretched over the whole image.
Fresh weights are said so on the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aa_flax.layers import AAConv

Query = tuple[int, int]


@dataclasses.dataclass
class LoadedModel:
  """A model, its variables and the input it expects.

  ``image_size`` is ``(H, W)``; ``mean``/``std`` per channel on a 0..1 scale (``None``: each
  image is normalised by its own statistics, for fresh weights without data).
  """
  model: nn.Module
  variables: Any
  image_size: tuple[int, int]
  channels: int
  mean: Optional[tuple[float, ...]]
  std: Optional[tuple[float, ...]]
  description: str
  fresh: bool
  data_config: Any = None  # the run's config.data, for dataset images


@dataclasses.dataclass
class AttentionMaps:
  """Per-head attention of one layer for some query pixels.

  ``maps``: float32 ``[Q, N_h, h', w']``, each map a softmax over the layer's ``h' x w'``
  keys (sums to 1), for the grid cell holding query pixel ``queries[i]`` of an image of
  ``image_size``. ``layers`` lists every AAConv of the model (call order).
  """
  layer: str
  layers: tuple[str, ...]
  queries: tuple[Query, ...]
  query_cells: tuple[Query, ...]
  image_size: tuple[int, int]
  maps: np.ndarray

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(self.maps.shape[2:])

  def upsampled(self) -> np.ndarray:
    """``[Q, N_h, H, W]``: every map bilinearly resized to the image (covers all of it)."""
    queries, heads = self.maps.shape[:2]
    resized = jax.image.resize(jnp.asarray(self.maps),
                               (queries, heads, *self.image_size), "linear")
    return np.asarray(resized)


def fresh_model(model_name: str, image_size: int | tuple[int, int], channels: int = 3,
                num_classes: int = 10, seed: int = 0, **overrides) -> LoadedModel:
  """A registry model with freshly initialised (untrained) weights."""
  from aa_flax.models import create_model
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  model = create_model(model_name, num_classes, **overrides)
  variables = jax.jit(lambda key: model.init({"params": key},
                                             jnp.zeros((1, *size, channels)), train=False))(
                                                 jax.random.key(seed))
  return LoadedModel(model, variables, size, channels, None, None,
                     f"{model_name}, FRESH (untrained) weights", fresh=True)


def _newest_step_dir(workdir: str) -> str:
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(p) for p in os.listdir(directory) if p.isdigit()) \
      if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint under {directory}.")
  return os.path.join(directory, str(steps[-1]))


def load_trained(workdir: Optional[str] = None, checkpoint: Optional[str] = None
                 ) -> LoadedModel:
  """The model of a training workdir with the weights of its newest checkpoint, or of
  ``checkpoint`` (``<workdir>/checkpoints/<step>``; the config is ``<workdir>/config.json``).
  The checkpoint's digest is verified first (``CorruptCheckpointError`` if it differs).
  """
  import json

  import ml_collections

  from aa_flax.checkpoint import read_state_arrays
  from aa_flax.trainer import build_model
  if (workdir is None) == (checkpoint is None):
    raise ValueError("pass exactly one of workdir or checkpoint")
  step_dir = checkpoint or _newest_step_dir(workdir)
  workdir = workdir or os.path.dirname(os.path.dirname(os.path.normpath(checkpoint)))
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found; the model's config is read from the "
                            "workdir that holds the checkpoint.")
  with open(config_path) as handle:
    config = ml_collections.ConfigDict(json.load(handle))
  state = read_state_arrays(step_dir)
  heads = [leaf for path, leaf in flax.traverse_util.flatten_dict(state["params"]).items()
           if path[-2:] == ("head", "kernel")]
  if len(heads) != 1:
    raise ValueError(f"{step_dir}: expected one classifier 'head/kernel' among the params")
  model = build_model(config, int(heads[0].shape[-1]), jnp.float32)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  size, channels, mean, std = _input_spec(config.data, config.seed)
  return LoadedModel(model, variables, size, channels, mean, std,
                     f"{config.model.name}, trained: {os.path.basename(workdir)} "
                     f"step {int(state['step'])}", fresh=False, data_config=config.data)


def _input_spec(data_config, seed: int):
  """(H, W), channels, mean, std as the training run saw them."""
  if data_config.image_size and data_config.mean and data_config.std:
    channels = len(data_config.mean)
    return ((data_config.image_size,) * 2, channels, tuple(data_config.mean),
            tuple(data_config.std))
  from aa_flax.data import load_splits
  splits = load_splits(data_config, seed=seed)
  height, width, channels = splits.image_shape
  size = (data_config.image_size,) * 2 if data_config.image_size else (height, width)
  return size, channels, tuple(splits.mean), tuple(splits.std)


def load_image(path: Optional[str] = None, index: Optional[int] = None,
               loaded: Optional[LoadedModel] = None,
               dataset_index: Optional[int] = None) -> np.ndarray:
  """uint8 ``[H, W, C]`` from an image file, ``images[index]`` of an ``.npz``, or the
  ``dataset_index``-th eval image of the run ``loaded`` came from; resized to the model's
  input size and converted to its channel count when ``loaded`` is given."""
  if dataset_index is not None:
    if loaded is None or loaded.data_config is None:
      raise ValueError("dataset_index needs a trained model (its config names the data)")
    from aa_flax.data import load_splits
    image = np.asarray(load_splits(loaded.data_config, seed=0).eval[dataset_index]["image"])
  elif path is not None and path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as archive:
      if "images" not in archive.files:
        raise ValueError(f"{path} has no 'images' array (found {archive.files})")
      image = archive["images"][0 if index is None else index]
  elif path is not None:
    from PIL import Image
    with Image.open(path) as handle:
      image = np.asarray(handle.convert("RGB"))
  else:
    raise ValueError("give an image path (file or .npz) or a dataset index")
  if image.ndim == 2:
    image = image[..., None]
  return image if loaded is None else _fit(image, loaded)


def _fit(image: np.ndarray, loaded: LoadedModel) -> np.ndarray:
  from PIL import Image
  if image.shape[-1] != loaded.channels:
    if loaded.channels == 1:
      image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
    elif image.shape[-1] == 1:
      image = np.repeat(image, loaded.channels, axis=-1)
    else:
      raise ValueError(f"image has {image.shape[-1]} channels; the model expects "
                       f"{loaded.channels}")
  height, width = loaded.image_size
  if image.shape[:2] != (height, width):
    squeezed = image[..., 0] if image.shape[-1] == 1 else image
    resized = Image.fromarray(squeezed).resize((width, height), Image.BILINEAR)
    image = np.asarray(resized).reshape(height, width, -1)
  return image.astype(np.uint8)


def _normalise(image: np.ndarray, loaded: LoadedModel) -> np.ndarray:
  x = image.astype(np.float32) / 255.0
  if loaded.mean is None:
    mean, std = x.mean(axis=(0, 1)), np.maximum(x.std(axis=(0, 1)), 1e-3)
  else:
    mean, std = np.asarray(loaded.mean, np.float32), np.asarray(loaded.std, np.float32)
  return (x - mean) / std


def _is_aaconv_call(module: nn.Module, method_name: str) -> bool:
  return isinstance(module, AAConv) and method_name == "__call__"


def _attention_grid(output_hw: tuple[int, int], length: int) -> tuple[int, int]:
  """The grid ``(h', w')`` a layer attends over, from its output size and ``h' * w'``.

  Pooling by p gives ``ceil(H/p) x ceil(W/p)``; both factors fall with p, so the first p whose
  product is ``length`` gives the grid.
  """
  height, width = output_hw
  for pool in range(1, max(height, width) + 1):
    grid = (math.ceil(height / pool), math.ceil(width / pool))
    if grid[0] * grid[1] == length:
      return grid
  raise ValueError(f"cannot place {length} attention positions on a {height}x{width} output")


def attention_maps(loaded: LoadedModel, image: np.ndarray, queries: Sequence[Query],
                   layer: Optional[str] = None) -> AttentionMaps:
  """Per-head attention maps of ``layer`` (default: the last AAConv) for query pixels.

  Args:
    loaded: from ``load_trained`` or ``fresh_model``.
    image: uint8 ``[H, W, C]`` at the model's input size (``load_image`` fits it).
    queries: ``(y, x)`` pixels of the image.
    layer: an AAConv path such as ``'stage3_block1/conv1'``.

  Raises:
    ValueError: unknown layer (the message lists the AA layers), a query outside the image,
      or a model without AAConv layers.
  """
  height, width = loaded.image_size
  if image.shape[:2] != (height, width):
    raise ValueError(f"image is {image.shape[:2]}; the model expects {(height, width)} "
                     "(load_image(..., loaded=...) resizes)")
  for y, x in queries:
    if not (0 <= y < height and 0 <= x < width):
      raise ValueError(f"query pixel (y={y}, x={x}) is outside the {height}x{width} image")
  images = jnp.asarray(_normalise(image, loaded))[None]
  apply = jax.jit(lambda v, x: loaded.model.apply(
      v, x, train=False, mutable=["intermediates"], capture_intermediates=_is_aaconv_call)[1])
  state = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(apply(loaded.variables, images)).get("intermediates", {}))
  weights = {"/".join(path[:-1]): value[0] for path, value in state.items()
             if path[-1] == "attention_weights"}
  if not weights:
    raise ValueError(f"{loaded.description} has no AAConv layer, so there is no attention "
                     "to draw; use an aa_ or fa_ model")
  layers = tuple(weights)
  layer = layer or layers[-1]
  if layer not in weights:
    raise ValueError(f"unknown layer {layer!r}; AA layers of this model: {', '.join(layers)}")
  output = state[(*layer.split("/"), "__call__")][0]
  layer_weights = np.asarray(weights[layer][0], np.float32)  # [N_h, h'w', h'w'] of image 0
  grid_h, grid_w = _attention_grid(output.shape[1:3], layer_weights.shape[-1])
  cells = tuple((min(grid_h - 1, y * grid_h // height), min(grid_w - 1, x * grid_w // width))
                for y, x in queries)
  maps = np.stack([layer_weights[:, cy * grid_w + cx].reshape(-1, grid_h, grid_w)
                   for cy, cx in cells])
  return AttentionMaps(layer, layers, tuple(map(tuple, queries)), cells, (height, width), maps)


def plot_attention(image: np.ndarray, maps: AttentionMaps, title: str = "",
                   panel_px: int = 160, dpi: int = 100):
  """The figure: one row per query (input with the query marked, then one panel per head,
  each map's colours scaled to its own range).

  Its size is ``(1 + N_h) * panel_px`` by ``Q * panel_px + 40`` pixels. Returns a
  matplotlib ``Figure``.
  """
  import matplotlib.pyplot as plt
  num_queries, num_heads = maps.maps.shape[:2]
  header_px = 40
  width_px, height_px = (1 + num_heads) * panel_px, num_queries * panel_px + header_px
  figure = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
  top = 1 - header_px / height_px
  grid = figure.add_gridspec(num_queries, 1 + num_heads, left=0.01, right=0.99, bottom=0.01,
                             top=top - 0.01, wspace=0.05, hspace=0.15)
  height, width = maps.image_size
  extent = (0, width, height, 0)  # every map stretched over the whole image
  shown = image[..., 0] if image.shape[-1] == 1 else image
  gray = image.mean(axis=-1)
  upsampled = maps.upsampled()
  for row, (y, x) in enumerate(maps.queries):
    axis = figure.add_subplot(grid[row, 0])
    axis.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None, extent=extent,
                interpolation="nearest")
    axis.scatter([x + 0.5], [y + 0.5], marker="x", color="red", s=40)
    axis.set_title(f"query (y={y}, x={x})", fontsize=7)
    axis.axis("off")
    for head in range(num_heads):
      axis = figure.add_subplot(grid[row, 1 + head])
      axis.imshow(gray, cmap="gray", extent=extent, interpolation="nearest")
      axis.imshow(upsampled[row, head], cmap="jet", alpha=0.55, extent=extent,
                  interpolation="bilinear")
      axis.scatter([x + 0.5], [y + 0.5], marker="x", color="white", s=25)
      if row == 0:
        axis.set_title(f"head {head + 1}", fontsize=7)
      axis.axis("off")
  grid_h, grid_w = maps.grid
  figure.suptitle(f"{title} | layer {maps.layer} ({grid_h}x{grid_w} attention grid; "
                  "colours scaled per map)",
                  fontsize=8, y=1 - 0.35 * header_px / height_px)
  return figure


def save_attention_figure(loaded: LoadedModel, image: np.ndarray, queries: Sequence[Query],
                          out_path: str, layer: Optional[str] = None,
                          panel_px: int = 160) -> AttentionMaps:
  """``attention_maps`` + ``plot_attention`` written as a PNG; returns the maps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  maps = attention_maps(loaded, image, queries, layer)
  figure = plot_attention(image, maps, loaded.description, panel_px)
  directory = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(directory, exist_ok=True)
  figure.savefig(out_path, dpi=figure.dpi)
  plt.close(figure)
  return maps


def _parse_query(text: str) -> Query:
  try:
    y, x = (int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"query must be 'y,x' (pixel row, column), got {text!r}")
  return y, x


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training workdir (newest checkpoint)")
  source.add_argument("--checkpoint", help="a checkpoint step dir <workdir>/checkpoints/<step>")
  source.add_argument("--model", help="registry name: fresh (untrained) weights")
  parser.add_argument("--image-size", type=int, default=32, help="with --model: input side")
  parser.add_argument("--channels", type=int, default=3, help="with --model: input channels")
  parser.add_argument("--image", help="image file (PNG, JPEG, ...) or .npz with 'images'")
  parser.add_argument("--index", type=int, default=0, help="with an .npz --image: which image")
  parser.add_argument("--dataset-index", type=int,
                      help="with --workdir/--checkpoint: that eval image of the run's data")
  parser.add_argument("--layer", help="AAConv path, e.g. stage3_block1/conv1 (default: last)")
  parser.add_argument("--query", type=_parse_query, action="append",
                      help="query pixel 'y,x' in the model's input (repeatable; default: centre)")
  parser.add_argument("--panel-px", type=int, default=160, help="pixels per panel")
  parser.add_argument("--out", default="attention.png", help="PNG to write")
  args = parser.parse_args(argv)
  if args.model:
    loaded = fresh_model(args.model, args.image_size, args.channels)
  else:
    from aa_flax.errors import AAFlaxError
    try:
      loaded = load_trained(args.workdir, args.checkpoint)
    except AAFlaxError as error:  # e.g. a checkpoint whose files differ from its digest
      raise SystemExit(f"error: {type(error).__name__}: {error}") from None
  if args.dataset_index is None and args.image is None:
    parser.error("give --image or --dataset-index")
  image = load_image(args.image, args.index, loaded, args.dataset_index)
  queries = args.query or [(loaded.image_size[0] // 2, loaded.image_size[1] // 2)]
  try:
    maps = save_attention_figure(loaded, image, queries, args.out, args.layer, args.panel_px)
  except ValueError as error:
    parser.error(str(error))
  print(f"Wrote {args.out}: layer {maps.layer}, {maps.maps.shape[1]} heads over a "
        f"{maps.grid[0]}x{maps.grid[1]} grid, query pixels {queries} ({loaded.description}).")


if __name__ == "__main__":
  main()
