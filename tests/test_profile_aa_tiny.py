"""experiments.profile_aa_tiny runs and attributes op time to the right layers (no timing)."""

import json

import pytest

from experiments import profile_aa_tiny


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_profile_rows_tensors_and_op_shares(tmp_path):
  rows, shares = profile_aa_tiny.main(["--batch=8", "--image-size=8", "--rounds=1",
                                       "--dtypes=float32", f"--out-dir={tmp_path}"])
  plain, augmented = rows
  assert (plain["model"], augmented["model"]) == profile_aa_tiny.MODELS
  # Attention over 4x4 (stage 2) and 2x2 (stage 3): [8, 4, 16, 16] + [8, 4, 4, 4] float32.
  assert augmented["attention_mib"] == pytest.approx(4 * 8 * 4 * (16 ** 2 + 4 ** 2) / 2 ** 20)
  assert plain["attention_mib"] == 0 and plain["ratio_median"] == 1.0
  assert augmented["full_size_arrays"] >= 1 and plain["full_size_arrays"] == 0
  assert augmented["gflops"] > plain["gflops"] and augmented["gb_accessed"] > 0
  if shares["float32 aa_resnet_tiny"]:  # the CPU trace has per-op events
    # Op time goes to each augmented block's core and branch, and to the rest.
    core, branch, other = profile_aa_tiny.CORE, profile_aa_tiny.BRANCH, profile_aa_tiny.OTHER
    assert set(shares["float32 aa_resnet_tiny"]) == {
        other, f"stage2_block1 {core}", f"stage2_block1 {branch}", f"stage3_block1 {core}",
        f"stage3_block1 {branch}"}
    assert sum(shares["float32 aa_resnet_tiny"].values()) == pytest.approx(1.0)
    assert list(shares["float32 resnet_tiny"]) == [other]
    assert augmented["attention_core_share"] > 0 and augmented["attention_branch_share"] > 0
    assert plain["attention_core_share"] == plain["attention_branch_share"] == 0
  saved = json.loads((tmp_path / "profile_aa_tiny.json").read_text())
  assert saved["environment"]["load_average_end"] and len(saved["rows"]) == 2
