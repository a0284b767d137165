"""Attention-map figures: the right layer, the right query cell and orientation, the PNG (one
scale, a colour bar, maps at their own resolution), and one-line command-line errors."""

import subprocess
import sys

import flax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aa_flax import visualize
from train_helpers import subprocess_env, tiny_config

IMAGE_HW = (28, 20)  # H != W; stage 2 strides to 14x10 and pools its attention to 7x5


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def loaded():
  return visualize.fresh_model("aa_resnet_tiny", IMAGE_HW, channels=3, width=8,
                               attention_pool_stages=(1,))


def steer(loaded, layer):
  """Weights of ``layer`` such that every query attends to the key one row up and one column
  right: q, k, v are the qkv bias only (kernel 0) and only the relative offsets
  (dy, dx) = (-1, +1) have non-zero table rows."""
  params = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded.variables["params"]))
  prefix = tuple(layer.split("/"))
  key_depth = params[(*prefix, "rel_width")].shape[1] * 4  # 4 heads
  kernel = params[(*prefix, "qkv", "kernel")]
  bias = np.zeros(kernel.shape[-1], np.float32)
  bias[:key_depth] = 1.0  # q = 1, k = v = 0
  params[(*prefix, "qkv", "kernel")] = jnp.zeros_like(kernel)
  params[(*prefix, "qkv", "bias")] = jnp.asarray(bias)
  for name, offset in (("rel_height", -1), ("rel_width", +1)):
    table = np.zeros(params[(*prefix, name)].shape, np.float32)
    table[offset + (table.shape[0] - 1) // 2] = 40.0
    params[(*prefix, name)] = jnp.asarray(table)
  variables = {**loaded.variables, "params": flax.traverse_util.unflatten_dict(params)}
  return visualize.LoadedModel(**{**vars(loaded), "variables": variables})


def image():
  return np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


@pytest.mark.parametrize("layer", ["stage2_block1/conv1", "stage3_block1/conv1"])
def test_maps_follow_the_query_cell_on_strided_and_pooled_layers(loaded, layer):
  steered = steer(loaded, layer)
  queries = [(13, 5), (27, 0), (4, 15)]
  maps = visualize.attention_maps(steered, image(), queries, layer)
  assert maps.layers == ("stage2_block1/conv1", "stage3_block1/conv1")
  assert maps.grid == (7, 5) and maps.maps.shape == (3, 4, 7, 5)
  np.testing.assert_allclose(maps.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  # Pixel (y, x) of a 28x20 image lies in cell (y // 4, x // 4) of the 7x5 grid.
  assert maps.query_cells == ((3, 1), (6, 0), (1, 3))
  # Each head's peak is one row up and one column right of the query cell.
  for (cell_y, cell_x), per_head in zip(maps.query_cells, maps.maps):
    for head_map in per_head:
      peak = np.unravel_index(np.argmax(head_map), head_map.shape)
      assert peak == (cell_y - 1, cell_x + 1), (layer, cell_y, cell_x, peak)


def test_figure_png_size_and_default_layer(loaded, tmp_path):
  out = tmp_path / "maps.png"
  maps = visualize.save_attention_figure(loaded, image(), [(0, 0), (14, 10)], str(out),
                                         panel_px=100)
  assert maps.layer == "stage3_block1/conv1"  # the last AA layer
  with Image.open(out) as png:
    assert png.size == ((2 + 4) * 100, 2 * 100 + 60)


def test_figure_draws_each_map_at_its_grid_on_one_shared_scale(loaded):
  steered = steer(loaded, "stage3_block1/conv1")
  maps = visualize.attention_maps(steered, image(), [(13, 5), (4, 15)])
  figure = visualize.plot_attention(image(), maps, "model x", label=7)
  try:
    artists = [artist for axis in figure.axes for artist in axis.images]
    heads = [artist for artist in artists if artist.get_array().shape == (7, 5)]
    assert len(heads) == 2 * 4 and len(artists) == 2 + 2 * 4  # plus one input per row
    assert {artist.get_cmap().name for artist in heads} == {"viridis"}
    # Own resolution (one value per grid cell), no smoothing, cells over the pixels they cover.
    assert all(artist.get_interpolation() == "nearest" for artist in artists)
    for artist, expected in zip(heads, maps.maps.reshape(-1, 7, 5)):
      np.testing.assert_array_equal(artist.get_array(), expected)
      assert artist.get_extent() == [0, 20, 28, 0]
    # One scale for the whole figure, from 0 to the largest weight, and its colour bar.
    assert {artist.get_clim() for artist in heads} == {(0.0, float(maps.maps.max()))}
    colour_bars = [artist.colorbar for artist in heads if artist.colorbar is not None]
    assert len(colour_bars) == 1
    # The uniform level 1/L (L = 7 * 5 keys) is a tick and a line on the colour bar.
    assert 1 / 35 in colour_bars[0].get_ticks()
    assert any(np.allclose(line.get_ydata(), 1 / 35) for line in colour_bars[0].ax.lines)
    title = figure._suptitle.get_text()
    assert f"true class 7, predicted class {maps.predicted}" in title and "1/35" in title
    assert 0 <= maps.predicted < 10
  finally:
    import matplotlib.pyplot as plt
    plt.close(figure)


def test_bad_layer_query_and_plain_model_are_clear_errors(loaded):
  with pytest.raises(ValueError, match="unknown layer 'stage9/conv1'; AA layers of this model: "
                     "stage2_block1/conv1, stage3_block1/conv1"):
    visualize.attention_maps(loaded, image(), [(0, 0)], "stage9/conv1")
  with pytest.raises(ValueError, match=r"query pixel \(y=28, x=0\) is outside the 28x20 image"):
    visualize.attention_maps(loaded, image(), [(28, 0)])
  plain = visualize.fresh_model("resnet_tiny", 16, width=8)
  with pytest.raises(ValueError, match="no AAConv layer"):
    visualize.attention_maps(plain, image()[:16, :16], [(0, 0)])


def test_load_image_fits_files_and_npz_to_the_model(loaded, tmp_path):
  Image.fromarray(np.zeros((50, 40), np.uint8)).save(tmp_path / "gray.png")
  fitted = visualize.load_image(str(tmp_path / "gray.png"), loaded=loaded)
  assert fitted.shape == (*IMAGE_HW, 3) and fitted.dtype == np.uint8
  np.savez(tmp_path / "x.npz", images=np.full((2, 8, 8, 3), 7, np.uint8))
  assert visualize.load_image(str(tmp_path / "x.npz"), index=1).shape == (8, 8, 3)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir trained for 2 steps (its checkpoint and config.json)."""
  from aa_flax.trainer import train_and_evaluate
  workdir = tmp_path_factory.mktemp("trained")
  train_and_evaluate(tiny_config(num_train_steps=2, optimizer__warmup_epochs=0,
                                 checkpoint_every_steps=2), str(workdir), progress="none")
  return workdir


@pytest.mark.parametrize("case", ["missing workdir", "no config.json", "dataset index",
                                  "not an image", "negative size"])
def test_cli_mistakes_print_one_error_line_and_write_nothing(trained_workdir, tmp_path, case):
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("not an image")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digit.png")
  arguments, expected = {
      "missing workdir": ([f"--workdir={tmp_path / 'nope'}", "--dataset-index=0"],
                          f"WorkdirError: {tmp_path / 'nope'} does not exist"),
      "no config.json": ([f"--workdir={tmp_path / 'empty'}", "--dataset-index=0"],
                         f"WorkdirError: {tmp_path / 'empty' / 'config.json'} not found"),
      "dataset index": ([f"--workdir={trained_workdir}", "--dataset-index=360"],
                        "DataError: dataset_index=360 is out of range: the eval split has 360 "
                        "images (valid: 0 to 359)"),
      "not an image": ([f"--workdir={trained_workdir}", f"--image={tmp_path / 'notes.txt'}"],
                       f"DataError: {tmp_path / 'notes.txt'} is not an image file"),
      "negative size": (["--model=aa_resnet_tiny", "--image-size=-5",
                         f"--image={tmp_path / 'digit.png'}"],
                        "--image-size=-5: must be a positive integer"),
  }[case]
  before = sorted(p.name for p in trained_workdir.rglob("*"))
  out = tmp_path / "figures" / "maps.png"
  result = subprocess.run([sys.executable, "-m", "aa_flax.visualize", *arguments, f"--out={out}"],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, result.stderr
  assert not out.parent.exists()
  assert sorted(p.name for p in trained_workdir.rglob("*")) == before
