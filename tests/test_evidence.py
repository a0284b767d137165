"""The real-data evidence script end to end at a tiny size: runs, records, report, figures."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aa_flax import trainer
from aa_flax.config_utils import base_config, flatten, load_config
from experiments import cifar10_evidence
from train_helpers import SHARED_DATA


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_evidence_configs_differ_only_in_the_model():
  plain, augmented = (load_config(f"{cifar10_evidence.CONFIG}:{m}")
                      for m in ("resnet_tiny", "aa_resnet_tiny"))
  assert set(flatten(plain)) == set(flatten(base_config()))  # every key, as in every config
  differences = {k for k, v in flatten(plain).items() if flatten(augmented)[k] != v}
  assert differences == {"model.name"}
  for config in (plain, augmented):
    trainer.build_model(config, 10, jnp.float32)
  with pytest.raises(ValueError, match="valid: resnet_tiny, aa_resnet_tiny"):
    load_config(f"{cifar10_evidence.CONFIG}:resnet50")


def test_balanced_subset_takes_the_first_of_each_class():
  labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2])
  images = np.arange(9)[:, None]
  subset_images, subset_labels = cifar10_evidence.balanced_subset(images, labels, 2)
  assert subset_images[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
  assert np.bincount(subset_labels).tolist() == [2, 2, 2]
  with pytest.raises(ValueError, match="fewer than 4"):
    cifar10_evidence.balanced_subset(images, labels, 4)


@pytest.mark.long_running
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_evidence_script_end_to_end(tmp_path, capsys):
  out, docs = tmp_path / "out", tmp_path / "docs"
  # One run keeps the test short; the report's grouping of seeds and models is tested in
  # test_report.py.
  argv = [f"--data-dir={SHARED_DATA}", f"--out={out}", f"--docs={docs}", "--seeds=0",
          "--models=aa_resnet_tiny",
          "--train-examples=40", "--test-examples=20", "--epochs=1", "--batch-size=8",
          "--eval-batch-size=8", "--report-tables=1", "--no-flops"]
  cifar10_evidence.main(argv)
  records = docs / "runs" / "cifar10_evidence"
  results = {}
  for name in ("aa_resnet_tiny_seed0",):
    assert sorted(p.name for p in (records / name).iterdir()) == sorted(
        cifar10_evidence.RECORD_FILES)
    results[name] = json.loads((records / name / "eval_results.json").read_text())
    assert results[name]["step"] == 5 and results[name]["num_examples"] == 20
    info = json.loads((records / name / "run_info.json").read_text())
    assert info["segments"][0]["wall_time_s"] > 0 and "JPEG q75" in info["notes"][0]
    assert info["segments"][0]["environment"]["backend"] == "cpu"
  markdown = (docs / "REPRODUCTION.md").read_text()
  assert "--data-dir=<folder of the CIFAR-10 npz files>" in markdown.splitlines()[2]
  assert str(SHARED_DATA) not in markdown  # the report names no path of this machine
  part2 = markdown.split("## Part 2")[1]
  for name, result in results.items():
    assert f"| `{name}` | 0 | 5 | 1 | {100 * result['top1']:.2f} |" in part2
  assert "JPEG q75" in part2 and "figures/project_runs_curves.png" in part2
  with Image.open(docs / "figures" / "cifar10_evidence_attention.png") as figure:
    assert figure.size == ((2 + 4) * 160, 3 * 160 + 60)  # 4 heads and a colour bar, 3 queries
  assert (docs / "figures" / "project_runs_curves.png").exists()

  # A rerun trains nothing again and rebuilds the same records.
  before = (records / "aa_resnet_tiny_seed0" / "metrics.jsonl").read_text()
  cifar10_evidence.main(argv)
  assert capsys.readouterr().out.count("finished earlier, not trained again") == 1
  assert (records / "aa_resnet_tiny_seed0" / "metrics.jsonl").read_text() == before
