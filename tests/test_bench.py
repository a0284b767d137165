"""The benchmarks run, write their files, and measure the right computation (no timing asserts)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_flax import attention, trainer
from benchmarks import (bench_attention, bench_checkpoint, bench_input, bench_train, common,
                        gpu_check)


pytestmark = pytest.mark.usefixtures("fast_compiles")


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
  assert row["finite_checks"] == "on"
  with pytest.raises(ValueError, match="batch 3 is not divisible"):
    bench_train.measure("aa_resnet_tiny", batch=3, image_size=8, dtype="float32", steps=1,
                        warmup=0, num_classes=3)


def test_bench_train_times_the_step_train_py_runs():
  """The trainer's step (uint8 input normalised in the step, finiteness metrics), jitted with
  its donation; ``check_finite=False`` drops the checks and their metrics."""
  setup = bench_train.synthetic_training("resnet_tiny", batch=8, image_size=8, dtype="float32",
                                         num_classes=3)
  assert setup.batch["image"].dtype == jnp.uint8
  lowered = setup.jitted().lower(setup.state, setup.batch)
  assert "tf.aliasing_output" in lowered.as_text()  # the state is donated
  state, metrics = lowered.compile()(setup.state, setup.batch)
  assert set(metrics) == {"loss", "accuracy", "learning_rate", "grad_norm", "finite",
                          "finite_update"} and metrics["finite"] == 1 and state.step == 1
  unchecked = bench_train.synthetic_training("resnet_tiny", batch=8, image_size=8,
                                             dtype="float32", num_classes=3,
                                             check_finite=False)
  _, metrics = jax.jit(unchecked.train_step)(unchecked.state, unchecked.batch)
  assert set(metrics) == {"loss", "accuracy", "learning_rate", "grad_norm"}
  with pytest.raises(ValueError, match="skip_nonfinite=True needs check_finite=True"):
    trainer.make_train_step(setup.model, None, None, mean=0, std=1, dtype=jnp.float32,
                            label_smoothing=0.0, seed=0, skip_nonfinite=True,
                            check_finite=False)


def test_parse_override_and_the_shared_parser():
  assert common.parse_override("attention_stages=(0,1,2,3)") == (
      "attention_stages", (0, 1, 2, 3))
  assert common.parse_override("attention_impl=pallas") == ("attention_impl", "pallas")
  assert common.parse_override("attention_pool_stages=()") == ("attention_pool_stages", ())
  with pytest.raises(ValueError, match="name=value"):
    common.parse_override("pallas")
  parser = common.argument_parser("Times things.\n\nMore.", "things")
  common.add_override_argument(parser)
  args = parser.parse_args(["--override", "width=8", "--override", "attention_impl=auto"])
  assert (parser.description, args.name, args.out_dir) == ("Times things.", "things",
                                                          common.RESULTS_DIR)
  assert args.override == [("width", 8), ("attention_impl", "auto")]


def test_bench_attention_interleaves_methods(tmp_path):
  rows = bench_attention.run("sizes", sizes=(7,), batches=(1,), dtypes=("float32",),
                             methods=("gather", "skew"), reps=2, name="forms",
                             out_dir=str(tmp_path), interleave=True)
  assert [r["method"] for r in rows] == ["gather", "skew"]
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
  (fastest,) = json.loads((tmp_path / "forms.json").read_text())["extra"]["fastest_rounds"]
  assert fastest["rounds"] == 2 and fastest["gather"] + fastest["skew"] == 2


def test_gpu_check_plan_fits_eight_minutes_in_the_required_order():
  config = gpu_check.FULL
  steps = gpu_check.fixed_steps(config, "out")
  assert [name for name, _ in steps] + ["aa56"] == list(gpu_check.STEPS) == [
      "plain", "aa_xla", "aa_cudnn", "aa_pallas", "attention_memory", "aa56"]
  assert sum(config.limits.values()) <= config.budget_s <= 8 * 60 - 10
  assert "attention_impl=cudnn" in dict(steps)["aa_cudnn"]
  aa56 = gpu_check.aa56_argv(config, "out", "pallas", 128)
  assert aa56[len(aa56) - 1 - aa56[::-1].index("--batch") + 1] == "128"  # last --batch wins
  assert "attention_pool_stages=()" in aa56 and "attention_impl=pallas" in aa56
  only = gpu_check.main(["--dry-run", "--only", "attention_memory,plain"])
  assert [name for name, _ in only] == ["plain", "attention_memory"]
  with pytest.raises(SystemExit):
    gpu_check.main(["--dry-run", "--only", "plian"])
  with pytest.raises(SystemExit):
    gpu_check.main(["--dry-run", "--limit", "aa56=soon"])


@pytest.mark.parametrize("outcomes,largest", [
    ({128: "ok", 256: "failed (exit 1)"}, 128), ({128: "ok", 256: "ok"}, 256),
    ({128: "timed out", 64: "failed (exit 1)", 32: "ok"}, 32),
    ({128: "failed", 64: "failed", 32: "failed"}, None)])
def test_gpu_check_finds_the_largest_batch_that_trains(outcomes, largest):
  tried = []

  def run(name, argv):
    batch = int(argv[len(argv) - 1 - argv[::-1].index("--batch") + 1])
    tried.append(batch)
    assert name == f"aa56_b{batch}"
    return outcomes[batch]

  result = gpu_check.largest_training_batch(gpu_check.FULL, run, "cudnn", "out")
  assert result["largest_batch"] == largest and tried == list(outcomes)


def test_gpu_check_summary_table(tmp_path):
  def write(name, rows, extra=None):
    with open(os.path.join(tmp_path, f"{name}.json"), "w") as f:
      json.dump({"rows": rows, "extra": extra}, f)

  def train_row(model, img_per_s):
    return [{"model": model, "img_per_s": img_per_s, "device_peak_mib": 1000.0}]

  write("plain", train_row("resnet50", 100.0))
  write("aa_xla", train_row("aa_resnet50", 80.0))
  write("aa_cudnn", train_row("aa_resnet50", 90.0))
  write("aa56_b128", train_row("aa_resnet50", 40.0))
  write("attention_memory", [], {"relative_vs_plain": [
      {"case": "28x28", "method": "gather", "temp_vs_plain": 1.02},
      {"case": "56x56", "method": "fused-interpret", "temp_vs_plain": 0.05}]})
  assert gpu_check.fastest_impl(str(tmp_path)) == "cudnn"
  aa56 = {"impl": "cudnn", "attempts": {128: "ok", 256: "failed (exit 1)"},
          "largest_batch": 128}
  rows = gpu_check.summarise(str(tmp_path), gpu_check.FULL, {"plain": "ok"}, aa56)
  values = {r["measure"]: r["value"] for r in rows}
  assert values["  xla / plain img/s"] == pytest.approx(0.8)
  assert values["  cudnn / plain img/s"] == pytest.approx(0.9)
  assert values["  pallas / plain img/s"] is None
  assert values["attention fwd+bwd temp memory 28x28, xla / plain"] == 1.02
  assert values["attention fwd+bwd temp memory 56x56, pallas / plain"] == 0.05
  assert values["AA from the 56x56 stage, no pooling, cudnn: largest batch that trains"] == 128
  assert values["  img/s at batch 128"] == 40.0
  assert "(this one)" in next(r["target"] for r in rows if r["measure"].startswith("  cudnn"))


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


def test_bench_input_times_both_paths_and_writes_results(tmp_path):
  rows = bench_input.run(num_images=4, batch=2, image_size=32, seconds=0, threads=(1,),
                         workers=(), sources=("npz",), name="input", out_dir=str(tmp_path))
  inline = {(r["split"], r["path"]) for r in rows if r["mode"] == "inline"}
  assert inline == {(s, p) for s in ("train", "eval") for p in ("before", "after")}
  assert all(r["img_per_s"] > 0 and r["images"] >= 4 for r in rows if r["mode"] == "inline")
  saved = json.loads((tmp_path / "input.json").read_text())
  assert saved["environment"]["usable_cores"] >= 1
  assert saved["extra"]["ratios"]["npz_train_after_over_before_per_core"] > 0
  assert saved["extra"]["reduced_decode"][0]["jpeg"] == "375x500"


def test_bench_train_input_gap_feeds_the_real_pipeline():
  rows = bench_train.measure_input_gap("resnet_tiny", batch=8, image_size=16, dtype="float32",
                                       steps=2, warmup=1, num_images=16)
  assert [r["feed"] for r in rows] == ["synthetic", "pipeline", "pipeline_inline"]
  assert rows[0]["gap_ms"] == 0 and rows[0]["wait_ms"] == 0
  assert all(r["step_ms"] > 0 and r["wait_ms"] >= 0 for r in rows)


def test_bench_checkpoint_times_saves_and_restores_with_and_without_digest(tmp_path):
  state = {"params": {"kernel": jnp.ones((64, 32))}, "momentum": {"kernel": jnp.zeros((64, 32))}}
  rows = bench_checkpoint.run(str(tmp_path), reps=1, state=state)
  assert [(r["operation"], r["digest"]) for r in rows] == [
      ("save", False), ("restore", False), ("save", True), ("restore", True),
      ("write_digest only", True), ("verify_digest only", True)]
  assert all(r["seconds"] > 0 for r in rows)
  assert not list((tmp_path / "digest_False").rglob("aa_flax_digest.json"))
  assert list((tmp_path / "digest_True").rglob("aa_flax_digest.json"))
