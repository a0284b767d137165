"""Attention maps of an AAConv layer: per head, for chosen query pixels, over the input image.

    python -m aa_flax.visualize --workdir=/tmp/aa_default --dataset-index=0 \\
        --query=2,2 --query=5,6 --out=attention.png
    python -m aa_flax.visualize --model=aa_resnet_tiny --image=photo.jpg --image-size=32 \\
        --query=16,16 --layer=stage2_block1/conv1 --out=fresh.png

For notebooks: ``load_trained(workdir)`` or ``fresh_model(name, image_size)`` gives a
``LoadedModel``; ``attention_maps(loaded, image, queries)`` the maps; ``plot_attention`` the
figure (matplotlib). For each query pixel a row shows the input with the query marked and the
layer's attention grid drawn on it, then the N_h per-head maps of the layer (its softmax over
the ``L = h' x w'`` keys for the query's cell), one grid cell per block of colour (no
smoothing), all on one colour scale with a colour bar that marks the uniform level ``1/L``.
Strided and pooled layers attend over a coarser grid; the query pixel picks the grid cell
that covers it. The title gives the true class (when known) and the predicted one; fresh
weights are said so on the figure.
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

from aa_flax.errors import AAFlaxError, DataError, WorkdirError, exit_with_error
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
  ``image_size``. ``layers`` lists every AAConv of the model (call order). ``predicted``
  is the class the model gives the image.
  """
  layer: str
  layers: tuple[str, ...]
  queries: tuple[Query, ...]
  query_cells: tuple[Query, ...]
  image_size: tuple[int, int]
  maps: np.ndarray
  predicted: int

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(self.maps.shape[2:])

  @property
  def num_keys(self) -> int:
    """``L = h' * w'``: the keys each query attends over (uniform attention is ``1/L``)."""
    return self.grid[0] * self.grid[1]


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


def load_trained(workdir: Optional[str] = None, checkpoint: Optional[str] = None
                 ) -> LoadedModel:
  """The model of a training workdir with the weights of its newest checkpoint, or of
  ``checkpoint`` (``<workdir>/checkpoints/<step>``; the config is ``<workdir>/config.json``).
  Both may be local paths or cloud URLs (``gs://...``).

  Raises ``WorkdirError`` for a missing workdir, checkpoint or ``config.json``.
  The checkpoint's digest is verified first (``CorruptCheckpointError`` if it differs).
  """
  import ml_collections

  from aa_flax import storage
  from aa_flax import workdir as workdir_layout
  from aa_flax.checkpoint import read_state_arrays
  from aa_flax.trainer import build_model
  if (workdir is None) == (checkpoint is None):
    raise ValueError("pass exactly one of workdir or checkpoint")
  location = storage.path(workdir or checkpoint)
  if not storage.retrying(f"Reading {location}", location.is_dir):
    raise WorkdirError(f"{location} does not exist or is not a directory.")
  workdir = location if checkpoint is None else workdir_layout.workdir_of(location)
  config = ml_collections.ConfigDict(workdir_layout.read_config(workdir))
  step_dir = location if checkpoint is not None else workdir_layout.newest_step_dir(workdir)
  state = read_state_arrays(str(step_dir))
  heads = [leaf for path, leaf in flax.traverse_util.flatten_dict(state["params"]).items()
           if path[-2:] == ("head", "kernel")]
  if len(heads) != 1:
    raise ValueError(f"{step_dir}: expected one classifier 'head/kernel' among the params")
  model = build_model(config, int(heads[0].shape[-1]), jnp.float32)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  size, channels, mean, std = _input_spec(config.data, config.seed)
  return LoadedModel(model, variables, size, channels, mean, std,
                     f"{config.model.name}, trained: {workdir.name} "
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
  input size and converted to its channel count when ``loaded`` is given.

  Raises ``DataError`` for a file that is missing or not an image, or an index out of range.
  """
  return load_labelled_image(path, index, loaded, dataset_index)[0]


def load_labelled_image(path: Optional[str] = None, index: Optional[int] = None,
                        loaded: Optional[LoadedModel] = None,
                        dataset_index: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
  """``load_image`` and the image's class: from the run's eval split, or an ``.npz``'s
  ``labels`` array; ``None`` for an image file (its class is unknown)."""
  label = None
  if dataset_index is not None:
    if loaded is None or loaded.data_config is None:
      raise ValueError("dataset_index needs a trained model (its config names the data)")
    from aa_flax.data import load_splits
    split = load_splits(loaded.data_config, seed=0).eval
    example = split[_checked_index(dataset_index, len(split), "dataset_index", "eval split")]
    image, label = np.asarray(example["image"]), int(example["label"])
  elif path is not None and path.endswith(".npz"):
    if not os.path.isfile(path):
      raise DataError(f"image file {path} does not exist")
    with np.load(path, allow_pickle=False) as archive:
      if "images" not in archive.files:
        raise DataError(f"{path} has no 'images' array (found {archive.files})")
      position = _checked_index(0 if index is None else index, len(archive["images"]), "index",
                                f"'images' array of {path}")
      image = archive["images"][position]
      if "labels" in archive.files:
        label = int(archive["labels"][position])
  elif path is not None:
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
      raise DataError(f"image file {path} does not exist")
    try:
      with Image.open(path) as handle:
        image = np.asarray(handle.convert("RGB"))
    except UnidentifiedImageError:
      raise DataError(f"{path} is not an image file PIL can read (PNG, JPEG, ...) nor an .npz "
                      "with an 'images' array") from None
  else:
    raise ValueError("give an image path (file or .npz) or a dataset index")
  if image.ndim == 2:
    image = image[..., None]
  return (image if loaded is None else _fit(image, loaded)), label


def _checked_index(index: int, size: int, name: str, what: str) -> int:
  if not 0 <= index < size:
    raise DataError(f"{name}={index} is out of range: the {what} has {size} images "
                    f"(valid: 0 to {size - 1})")
  return index


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


def _normalise(image: np.ndarray, loaded: LoadedModel) -> jax.Array:
  """uint8 ``[H, W, C]`` -> float32 ``[1, H, W, C]`` as in training (``trainer.normalise``);
  fresh weights without data statistics use the image's own per-channel mean and std."""
  from aa_flax.trainer import normalise
  if loaded.mean is None:
    x = image.astype(np.float32) / 255.0
    mean, std = x.mean(axis=(0, 1)), np.maximum(x.std(axis=(0, 1)), 1e-3)
  else:
    mean, std = loaded.mean, loaded.std
  return normalise(image[None], mean, std, jnp.float32)


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
  images = _normalise(image, loaded)
  apply = jax.jit(lambda v, x: loaded.model.apply(
      v, x, train=False, mutable=["intermediates"], capture_intermediates=_is_aaconv_call))
  logits, state = apply(loaded.variables, images)
  state = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(state).get("intermediates", {}))
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
  return AttentionMaps(layer, layers, tuple(map(tuple, queries)), cells, (height, width), maps,
                       int(np.argmax(logits[0])))


def plot_attention(image: np.ndarray, maps: AttentionMaps, title: str = "",
                   panel_px: int = 160, dpi: int = 100, label: Optional[int] = None):
  """The figure: one row per query, then a colour bar.

  Each row shows the input (nearest-neighbour pixels) with the query pixel marked and the
  layer's ``h' x w'`` attention grid drawn over it, then one panel per head: the head's map
  at the grid's own resolution, spread over the image's extent so that cell ``(i, j)`` sits
  over the pixels it covers, with the query's cell outlined. Every map of the figure shares
  one linear colour scale from 0 to the largest weight shown (viridis); the colour bar marks
  the uniform level ``1/L`` (``L = h' * w'`` keys), so a head at that level everywhere does
  not attend anywhere in particular. The title gives ``title`` (e.g. the model), the true
  class ``label`` (``None``: unknown) and the predicted class.

  Its size is ``(2 + N_h) * panel_px`` by ``Q * panel_px + 60`` pixels. Returns a
  matplotlib ``Figure``.
  """
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle
  num_queries, num_heads = maps.maps.shape[:2]
  header_px, colour_bar_px = 60, panel_px
  width_px = (1 + num_heads) * panel_px + colour_bar_px
  height_px = num_queries * panel_px + header_px
  figure = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
  top = 1 - header_px / height_px
  # The colour bar's column is a tenth of a panel; its tick labels and label use the rest.
  grid = figure.add_gridspec(num_queries, 2 + num_heads, left=0.01,
                             right=1 - 0.8 * colour_bar_px / width_px, bottom=0.01,
                             top=top - 0.01, wspace=0.05, hspace=0.15,
                             width_ratios=[1] * (1 + num_heads) + [0.1])
  height, width = maps.image_size
  grid_h, grid_w = maps.grid
  extent = (0, width, height, 0)  # image coordinates: pixel (y, x) covers [x, x+1] x [y, y+1]
  cell_h, cell_w = height / grid_h, width / grid_w
  uniform = 1.0 / maps.num_keys
  vmax = float(maps.maps.max())
  shown = image[..., 0] if image.shape[-1] == 1 else image
  heads_image = None
  for row, ((y, x), (cell_y, cell_x)) in enumerate(zip(maps.queries, maps.query_cells)):
    axis = figure.add_subplot(grid[row, 0])
    axis.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None, extent=extent,
                interpolation="nearest")
    axis.vlines([j * cell_w for j in range(1, grid_w)], 0, height, color="white",
                linewidth=0.5, alpha=0.6)
    axis.hlines([i * cell_h for i in range(1, grid_h)], 0, width, color="white",
                linewidth=0.5, alpha=0.6)
    axis.scatter([x + 0.5], [y + 0.5], marker="x", color="red", s=40)
    axis.set_title(f"query pixel (y={y}, x={x})", fontsize=7)
    axis.axis("off")
    for head in range(num_heads):
      axis = figure.add_subplot(grid[row, 1 + head])
      heads_image = axis.imshow(maps.maps[row, head], cmap="viridis", vmin=0.0, vmax=vmax,
                                extent=extent, interpolation="nearest")
      axis.add_patch(Rectangle((cell_x * cell_w, cell_y * cell_h), cell_w, cell_h, fill=False,
                               edgecolor="red", linewidth=1.2))
      axis.scatter([x + 0.5], [y + 0.5], marker="x", color="red", s=20)
      axis.set_title(f"head {head + 1}" if row == 0 else "", fontsize=7)
      axis.axis("off")
  colour_bar = figure.colorbar(heads_image, cax=figure.add_subplot(grid[:, -1]))
  colour_bar.ax.axhline(uniform, color="white", linewidth=1.5)
  colour_bar.ax.axhline(uniform, color="black", linewidth=0.8, linestyle="--")
  colour_bar.set_ticks([0.0, uniform, vmax],
                       labels=["0", f"1/{maps.num_keys}\nuniform", f"{vmax:.3g}\nmax"])
  colour_bar.set_label("attention weight", fontsize=7)
  colour_bar.ax.tick_params(labelsize=6)
  truth = "unknown" if label is None else str(label)
  figure.suptitle(f"{title} | true class {truth}, predicted class {maps.predicted}\n"
                  f"layer {maps.layer}: {num_heads} heads over a {grid_h}x{grid_w} grid "
                  f"(L={maps.num_keys} keys, uniform 1/{maps.num_keys} = {uniform:.3g}); "
                  "one colour scale; red box: the query's cell",
                  fontsize=8, y=1 - 0.1 * header_px / height_px, va="top")
  return figure


def save_attention_figure(loaded: LoadedModel, image: np.ndarray, queries: Sequence[Query],
                          out_path: str, layer: Optional[str] = None,
                          panel_px: int = 160, label: Optional[int] = None) -> AttentionMaps:
  """``attention_maps`` + ``plot_attention`` written as a PNG; returns the maps. ``label``:
  the image's true class, if known."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  maps = attention_maps(loaded, image, queries, layer)
  figure = plot_attention(image, maps, loaded.description, panel_px, label=label)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  try:
    figure.savefig(out_path, dpi=figure.dpi)
  finally:
    plt.close(figure)
  return maps


def _parse_query(text: str) -> Query:
  try:
    y, x = (int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"query must be 'y,x' (pixel row, column), got {text!r}")
  return y, x


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line; a mistake (bad workdir, image, index, size...) exits with one
  ``error:`` line on stderr and writes nothing."""
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
  try:
    for flag in ("image_size", "channels", "panel_px"):
      if getattr(args, flag) <= 0:
        raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be a "
                         "positive integer")
    if args.dataset_index is None and args.image is None:
      raise ValueError("give --image or --dataset-index")
    if args.model:
      loaded = fresh_model(args.model, args.image_size, args.channels)
    else:
      loaded = load_trained(args.workdir, args.checkpoint)
    image, label = load_labelled_image(args.image, args.index, loaded, args.dataset_index)
    queries = args.query or [(loaded.image_size[0] // 2, loaded.image_size[1] // 2)]
    maps = save_attention_figure(loaded, image, queries, args.out, args.layer, args.panel_px,
                                 label)
  except (AAFlaxError, ValueError, OSError) as error:
    exit_with_error(error)
  print(f"Wrote {args.out}: layer {maps.layer}, {maps.maps.shape[1]} heads over a "
        f"{maps.grid[0]}x{maps.grid[1]} grid, query pixels {queries}, true class "
        f"{'unknown' if label is None else label}, predicted {maps.predicted} "
        f"({loaded.description}).")


if __name__ == "__main__":
  main()
