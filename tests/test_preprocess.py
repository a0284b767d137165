"""Preprocessing: the fast crop/resize/decode path against the straightforward reference
(full decode, crop, per-channel resize) on real photos, and the crop boxes' distribution."""

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from aa_flax.data import preprocess
from benchmarks import input_data


@pytest.fixture(scope="module")
def jpegs():
  """Real photos as JPEGs: two ImageNet-sized (H != W both ways) and one large."""
  return input_data.jpeg_images(3, sizes=((375, 500), (500, 333), (1200, 1600)))


def _train(transform, image, seed):
  return transform({"image": image, "label": 7}, np.random.default_rng(seed))["image"]


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_decoded_images_match_the_reference_exactly(jpegs, channels):
  """Arrays: one resize of all channels equals the per-channel reference bit for bit."""
  size = (40, 56)
  for image in input_data.decode_all(jpegs[:2]):
    image = np.ascontiguousarray(image[:, :, :channels])
    for seed in range(6):
      got = _train(preprocess.TrainTransform("inception", size), image, seed)
      want = _train(input_data.ReferenceTrainTransform(size), image, seed)
      assert got.shape == (*size, channels) and got.dtype == np.uint8
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        preprocess.EvalTransform("inception", size)({"image": image, "label": 0})["image"],
        input_data.ReferenceEvalTransform(size)({"image": image, "label": 0})["image"])


def _mean_abs(a, b):
  return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_jpeg_bytes_match_the_reference_within_resize_tolerance(jpegs, monkeypatch):
  """From the encoded file: the same crops and flips as the reference; pixels differ only as
  much as two standard resize filters differ (DCT-scaled decoding, box-edge neighbours)."""
  scales = []
  draft = JpegImagePlugin.JpegImageFile.draft

  def spy(self, mode, size):
    result = draft(self, mode, size)
    scales.append(self.decoderconfig[0])
    return result

  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
  ours, bicubic = [], []
  for size in [(224, 224), (48, 64)]:
    for jpeg, image in zip(jpegs, input_data.decode_all(jpegs)):
      for seed in range(8):
        got = _train(preprocess.TrainTransform("inception", size), jpeg, seed)
        want = _train(input_data.ReferenceTrainTransform(size), image, seed)
        assert got.shape == (*size, 3)
        top, left, height, width = preprocess.inception_crop_box(
            *image.shape[:2], np.random.default_rng(seed))
        crop = Image.fromarray(image[top:top + height, left:left + width])
        other_filter = np.asarray(crop.resize(size[::-1], Image.BICUBIC))
        ours.append(_mean_abs(got, want))
        bicubic.append(_mean_abs(other_filter[:, ::-1] if _flipped(image, seed) else
                                 other_filter, want))
      got = preprocess.EvalTransform("inception", size)({"image": jpeg, "label": 0})["image"]
      want = input_data.ReferenceEvalTransform(size)({"image": image, "label": 0})["image"]
      assert _mean_abs(got, want) < 3.0
  assert max(ours) < 3.0, ours
  assert np.mean(ours) < np.mean(bicubic), (np.mean(ours), np.mean(bicubic))
  assert {2, 4, 8} <= set(scales)  # the large photo was decoded at reduced sizes


def _flipped(image, seed):
  rng = np.random.default_rng(seed)
  preprocess.inception_crop_box(*image.shape[:2], rng)
  return rng.random() < 0.5


def test_dct_scale_keeps_the_box_at_least_the_output_size():
  assert preprocess.dct_scale(448, 448, (224, 224)) == 2
  assert preprocess.dct_scale(447, 900, (224, 224)) == 1
  assert preprocess.dct_scale(1800, 1792, (224, 224)) == 8
  assert preprocess.dct_scale(1000, 1000, (224, 112)) == 4
  assert preprocess.dct_scale(100, 100, (224, 224)) == 1


def test_non_jpeg_bytes_and_grayscale_decode_to_rgb():
  gray = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
  for fmt in ("PNG", "JPEG"):
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, fmt)
    record = {"image": buffer.getvalue(), "label": 1}
    out = preprocess.TrainTransform("inception", (8, 12))(record, np.random.default_rng(0))
    assert out["image"].shape == (8, 12, 3)
    assert preprocess.EvalTransform("none", (30, 40))(record)["image"].shape == (30, 40, 3)


def _vectorised_inception_boxes(height, width, count, rng, attempts=10):
  """An independent, vectorised sampler of the same distribution: ``count`` boxes as arrays
  (area fraction, log aspect w/h, centre y / H, centre x / W, fell back)."""
  area = rng.uniform(0.08, 1.0, (count, attempts)) * height * width
  log_aspect = rng.uniform(np.log(3 / 4), np.log(4 / 3), (count, attempts))
  crop_w = np.round(np.sqrt(area * np.exp(log_aspect)))
  crop_h = np.round(np.sqrt(area / np.exp(log_aspect)))
  fits = (crop_w <= width) & (crop_h <= height) & (crop_w > 0) & (crop_h > 0)
  first = np.argmax(fits, axis=1)
  fell_back = ~fits.any(axis=1)
  rows = np.arange(count)
  crop_w, crop_h = crop_w[rows, first], crop_h[rows, first]
  top = np.floor(rng.uniform(0, 1, count) * (height - crop_h + 1))
  left = np.floor(rng.uniform(0, 1, count) * (width - crop_w + 1))
  keep = ~fell_back
  return (crop_h * crop_w / (height * width))[keep], np.log(crop_w / crop_h)[keep], (
      (top + crop_h / 2) / height)[keep], ((left + crop_w / 2) / width)[keep], fell_back.mean()


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (64, 64)])
def test_inception_crop_box_statistics(height, width):
  count = 4000
  rng = np.random.default_rng(0)
  boxes = np.array([preprocess.inception_crop_box(height, width, rng) for _ in range(count)])
  top, left, crop_h, crop_w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
  fallback = (crop_h * crop_w == height * width) | (crop_w == width) & (
      crop_h == round(width / (3 / 4)))
  fallback &= (top == (height - crop_h) // 2) & (left == (width - crop_w) // 2)
  sampled = ~fallback
  area, log_aspect, centre_y, centre_x, want_fallback = _vectorised_inception_boxes(
      height, width, 40_000, np.random.default_rng(1))
  stats = {
      "area": (crop_h * crop_w / (height * width))[sampled],
      "log_aspect": np.log(crop_w / crop_h)[sampled],
      "centre_y": ((top + crop_h / 2) / height)[sampled],
      "centre_x": ((left + crop_w / 2) / width)[sampled],
  }
  want = {"area": area, "log_aspect": log_aspect, "centre_y": centre_y, "centre_x": centre_x}
  for key, values in stats.items():
    # Two-sample Kolmogorov-Smirnov distance; 0.035 is about the 1% critical value here.
    grid = np.sort(np.concatenate([values, want[key]]))
    cdf = np.searchsorted(np.sort(values), grid, "right") / len(values)
    cdf_want = np.searchsorted(np.sort(want[key]), grid, "right") / len(want[key])
    assert np.abs(cdf - cdf_want).max() < 0.035, key
  assert abs(fallback.mean() - want_fallback) < 0.01
  rounding = 1.0 / np.minimum(crop_h, crop_w)[sampled]  # of the integer box sides
  assert np.all(stats["area"] >= 0.08 * (1 - 2 * rounding))
  assert np.all(np.abs(stats["log_aspect"]) <= np.log(4 / 3) + rounding)


def test_center_crop_box_is_the_central_square():
  assert preprocess.center_crop_box(375, 500) == (23, 86, 328, 328)
  assert preprocess.center_crop_box(500, 333) == (104, 21, 291, 291)
  assert preprocess.center_crop_box(1, 7) == (0, 3, 1, 1)
