"""Attention-map figures: the right layer, the right query cell and orientation, the PNG."""

import flax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aa_flax import visualize

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
  # Upsampled maps cover the whole image; the first query's peak cell is rows 8..11,
  # columns 8..11 of the image.
  upsampled = maps.upsampled()
  assert upsampled.shape == (3, 4, *IMAGE_HW)
  peak = np.unravel_index(np.argmax(upsampled[0, 0]), IMAGE_HW)
  assert 8 <= peak[0] < 12 and 8 <= peak[1] < 12


def test_figure_png_size_and_default_layer(loaded, tmp_path):
  out = tmp_path / "maps.png"
  maps = visualize.save_attention_figure(loaded, image(), [(0, 0), (14, 10)], str(out),
                                         panel_px=100)
  assert maps.layer == "stage3_block1/conv1"  # the last AA layer
  with Image.open(out) as png:
    assert png.size == ((1 + 4) * 100, 2 * 100 + 40)


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
