"""The image-size benchmarks run end to end at tiny settings and write their tables."""

import json

import numpy as np
import pytest

from experiments import resolution_probe, resolution_transfer


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_probe_scenes_render_and_label():
  scenes, labels = resolution_probe.make_scenes(np.random.default_rng(0), 400, 12)
  assert scenes.shape == (400, 12, 12, 2) and scenes.sum() == 800
  xa = scenes[..., 0].max(1).argmax(-1)
  xb = scenes[..., 1].max(1).argmax(-1)
  np.testing.assert_array_equal(labels, np.digitize(xb - xa, [-3, 0, 4], right=True))
  assert set(labels) == {0, 1, 2, 3} and not np.any(xb == xa)
  resized = resolution_probe.render(scenes, 24, "resized")
  np.testing.assert_array_equal(resized[:, ::2, ::2], scenes)
  np.testing.assert_array_equal(resized[:, 1::2, 1::2], scenes)
  canvas = resolution_probe.render(scenes, 18, "canvas")
  np.testing.assert_array_equal(canvas[:, 3:15, 3:15], scenes)
  assert canvas.sum() == scenes.sum()


def test_probe_runs_and_writes(tmp_path):
  rows = resolution_probe.main(["--scene", "6", "--sizes", "9", "--steps", "2", "--batch", "8",
                                "--eval-scenes", "20", "--eval-batch", "10",
                                "--out-dir", str(tmp_path)])
  assert [(r["input"], r["tables"]) for r in rows[1:4]] == [
      ("resized", "interpolate"), ("resized", "extend"), ("resized", "re-initialised")]
  assert len(rows) == 7 and all(0 <= r["top1"] <= 1 for r in rows)
  assert "| canvas | 9 | 1 | extend |" in (tmp_path / "resolution_probe.md").read_text()


@pytest.mark.long_running
def test_transfer_runs_on_cifar_shaped_files(tmp_path):
  """Fake CIFAR-shaped npz files; 2 training steps, every size and variant evaluated."""
  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(0)
  for name, count in (("cifar10_train_part0.npz", 20), ("cifar10_train_part1.npz", 20),
                      ("cifar10_test.npz", 20)):
    np.savez(data / name, images=rng.integers(0, 256, (count, 32, 32, 3), np.uint8),
             labels=np.arange(count) % 10)
  rows = resolution_transfer.main([
      "--data-dir", str(data), "--workdir", str(tmp_path / "work"), "--train-examples", "30",
      "--test-examples", "20", "--epochs", "1", "--batch", "16", "--eval-batch", "8",
      "--set", "model.width=4", "--sizes", "32", "40", "--finetune-steps", "0",
      "--out-dir", str(tmp_path / "results")])
  by_key = {(r["input"], r["size"], r["tables"]): r for r in rows}
  assert "ValueError" in by_key[("resized", 40, "as trained")]["note"]
  assert by_key[("resized", 32, "as trained")]["top1"] == by_key[("resized", 32, "extend")]["top1"]
  assert ("canvas", 40, "interpolate") in by_key and ("canvas", 32, "extend") not in by_key
  saved = json.loads((tmp_path / "results" / "resolution_transfer.json").read_text())
  assert ["model.width", 4] in saved["extra"]["set"]
  assert len(saved["rows"]) == 4 * 3
  change = saved["extra"]["relative_change_from_init"]
  assert set(change) == {"tables", "qkv kernels"} and change["qkv kernels"] > 0
