"""The benchmarks run, write their files, and measure the right computation (no timing asserts)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax import attention

# benchmarks/ is a top-level package of the repository, not of the installed aa_flax: make the
# repository root importable also when pytest is started as `pytest` rather than `python -m`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_attention, bench_train, gpu_check  # noqa: E402


def test_naive_explicit_table_matches_attention():
  case = bench_attention.Case("t", 3, 4, 2, 5, 3)
  args, _ = bench_attention.make_inputs(case, batch=2, dtype=jnp.float32)
  np.testing.assert_allclose(bench_attention.naive_relative_attention(*args),
                             attention.multihead_attention_2d(*args), atol=1e-5)


def test_bench_attention_writes_results(tmp_path):
  rows = bench_attention.run("sizes", sizes=(7,), batches=(1,), dtypes=("float32",),
                             methods=("plain", "skew", "fused"), reps=1, time_it=False,
                             name="attn", out_dir=str(tmp_path))
  assert [r["method"].split("-")[0] for r in rows] == ["plain", "skew", "fused"]
  assert all(r["fwd_bwd_temp_mib"] > 0 and r["d_k^h"] == 20 for r in rows)
  saved = json.loads((tmp_path / "attn.json").read_text())
  assert saved["environment"]["jax"] == jax.__version__
  assert {r["method"] for r in saved["extra"]["relative_vs_plain"]} == {
      "skew", rows[2]["method"]}
  assert "| 7x7 | plain |" in (tmp_path / "attn.md").read_text()


def test_aa_resnet50_suite_has_the_13_augmented_layers():
  cases = bench_attention.suite_cases("aa_resnet50", ())
  assert sum(c.count for c in cases) == 13
  assert [(c.height, c.key_depth, c.value_depth) for c in cases] == [
      (14, 20, 2), (14, 20, 3), (7, 20, 6)]
  with pytest.raises(ValueError, match="'resnet' is not one of"):
    bench_attention.suite_cases("resnet", ())


def test_bench_train_step_runs_on_all_devices():
  row = bench_train.measure("aa_resnet_tiny", batch=8, image_size=8, dtype="float32",
                            steps=1, warmup=1, num_classes=3)
  assert row["devices"].startswith(f"{jax.local_device_count()}x")
  assert np.isfinite(row["loss"]) and row["img_per_s"] > 0 and row["params_m"] > 0
  with pytest.raises(ValueError, match="batch 3 is not divisible"):
    bench_train.measure("aa_resnet_tiny", batch=3, image_size=8, dtype="float32", steps=1,
                        warmup=0, num_classes=3)


def test_parse_override():
  assert bench_train.parse_override("attention_stages=(0,1,2,3)") == (
      "attention_stages", (0, 1, 2, 3))
  assert bench_train.parse_override("attention_impl=pallas") == ("attention_impl", "pallas")
  assert bench_train.parse_override("attention_pool_stages=()") == ("attention_pool_stages", ())
  with pytest.raises(ValueError, match="name=value"):
    bench_train.parse_override("pallas")


def test_gpu_check_plan_and_summary(tmp_path):
  steps = gpu_check.plan(gpu_check.FULL, str(tmp_path))
  assert [name for name, _ in steps] == ["plain", "aa_xla", "aa_pallas", "aa56_pallas",
                                         "aa_cudnn", "attention_layers", "aa56_cudnn",
                                         "attention_sizes"]
  only = gpu_check.main(["--dry-run", "--only", "attention_layers,plain"])
  assert [name for name, _ in only] == ["plain", "attention_layers"]
  with pytest.raises(SystemExit):
    gpu_check.main(["--dry-run", "--only", "plian"])
  aa56 = dict(steps)["aa56_pallas"]
  assert aa56[len(aa56) - 1 - aa56[::-1].index("--batch") + 1] == "128"  # last --batch wins
  assert "attention_pool_stages=()" in aa56 and "attention_impl=pallas" in aa56
  assert "attention_impl=cudnn" in dict(steps)["aa_cudnn"]

  def write(name, img_per_s):
    row = {"model": name, "img_per_s": img_per_s, "device_peak_mib": 1.0}
    with open(os.path.join(tmp_path, f"{name}.json"), "w") as f:
      json.dump({"rows": [row]}, f)

  write("plain", 100.0)
  write("aa_xla", 80.0)
  write("aa_pallas", 90.0)
  rows = {r["measure"]: r["value"] for r in gpu_check.summarise(str(tmp_path), {})}
  assert rows["aa_xla (xla) / plain"] == pytest.approx(0.8)
  assert rows["aa_pallas (pallas) / plain"] == pytest.approx(0.9)
  assert rows["augmented from the 56x56 stage, no pooling, pallas: img/s"] is None
  assert rows["aa (cudnn) / plain"] is None


def test_bench_attention_records_a_failing_method_and_goes_on(tmp_path, monkeypatch):
  measure = bench_attention.measure

  def flaky(case, method, *args):
    if method == "skew":
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return measure(case, method, *args)

  monkeypatch.setattr(bench_attention, "measure", flaky)
  rows = bench_attention.run("sizes", sizes=(7,), batches=(1,), dtypes=("float32",),
                             methods=("skew", "plain"), reps=1, time_it=False,
                             name="flaky", out_dir=str(tmp_path))
  assert [r["method"] for r in rows] == ["plain"]
  failures = json.loads((tmp_path / "flaky.json").read_text())["extra"]["failures"]
  assert failures[0]["method"] == "skew" and "RESOURCE_EXHAUSTED" in failures[0]["error"]
