"""Reproduction report: rows against configs, run matching, never-invented numbers, figures."""

import json
import re
import subprocess
import sys
import types

import pytest
from PIL import Image

from aa_flax import report, tables
from aa_flax.config_utils import config_to_dict, load_config, model_overrides
from train_helpers import REPO_ROOT, subprocess_env, tiny_config


def test_every_implemented_row_config_trains_the_row_model():
  for row in filter(tables.is_implemented, tables.PAPER_ROWS):
    config = load_config(str(REPO_ROOT / tables.config_spec(row)))
    assert config.model.name == row.model, row
    assert model_overrides(config.model) == dict(row.overrides), row
    assert row.top1 is not None and row.top1_mark in ("sure", "likely", "unsure"), row


def write_run(workdir, config, results=None, records=(), info=None):
  """A workdir as train.py leaves it (minus checkpoints)."""
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(config_to_dict(config)))
  if results is not None:
    (workdir / "eval_results.json").write_text(json.dumps(results))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if info is not None:
    (workdir / "run_info.json").write_text(json.dumps(info))
  return workdir


def results(top1, top5, step=100):
  return {"step": step, "top1": top1, "top5": top5, "loss": 1.0, "num_examples": 10_000}


def table_lines(markdown, table):
  section = markdown.split(f"### Table {table}:")[1].split("###")[0]
  return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def test_runs_matched_by_config_and_nothing_invented(tmp_path):
  short_aa_wrn = load_config(str(REPO_ROOT / "configs/cifar.py:aa_wrn28_10"))
  short_aa_wrn.num_epochs = 10.0
  environment = {"backend": "tpu", "device_kind": "TPU v3", "device_count": 8, "cpu": "x",
                 "cpu_count": 96, "jax": "0.10.2", "flax": "0.12.8"}
  info = {"segments": [{"wall_time_s": 3000.0, "environment": environment},
                       {"wall_time_s": 725.0, "environment": environment}], "notes": []}
  runs_dir = tmp_path / "runs"
  write_run(runs_dir / "aa_wrn", short_aa_wrn, results(0.8012, 0.951, step=1960), info=info)
  # Same model on CIFAR-10: not Table 1's data, so a project run.
  write_run(runs_dir / "aa_wrn_c10", load_config(str(REPO_ROOT / "configs/cifar.py:aa_wrn28_10,"
                                                     "cifar10")), results(0.9, 0.99))
  write_run(runs_dir / "aa_r50", load_config(str(REPO_ROOT / "configs/imagenet_resnet.py:"
                                                 "aa_resnet50")), results(0.775, 0.936))
  write_run(runs_dir / "se_r50", load_config(str(REPO_ROOT / "configs/imagenet_resnet.py:"
                                                 "se_resnet50")),
            records=[{"step": 500, "split": "train", "loss": 5.0}])  # unfinished
  (runs_dir / "not_a_run").mkdir()
  runs, skipped = report.find_runs(f"{runs_dir}/*")
  assert len(runs) == 4 and len(skipped) == 1 and "no config.json" in skipped[0]

  out = tmp_path / "docs" / "REPORT.md"
  out.parent.mkdir()
  markdown = report.build_report(runs, str(out), (1, 2), with_flops=False, skipped=skipped)
  assert out.read_text() == markdown

  t1 = {line.split(" | ")[0]: line for line in table_lines(markdown, 1)[1:]}
  assert all("not run" in t1[f"| {label}"] for label in ("Wide-ResNet", "SE-Wide-ResNet"))
  aa_wrn = t1["| AA-Wide-ResNet (run `aa_wrn`)"]
  assert "| 81.6 [sure] | 80.12 | -1.48 pp |" in aa_wrn
  assert "| 95.2 [sure] | 95.10 | -0.10 pp |" in aa_wrn and "36.317M" in aa_wrn
  t2 = {line.split(" | ")[0]: line for line in table_lines(markdown, 2)[1:]}
  assert "| 77.7 [sure] | 77.50 | -0.20 pp |" in t2["| AA-ResNet-50 (run `aa_r50`)"]
  assert "not run" in t2["| ResNet-50"] and "unfinished" in t2["| SE-ResNet-50 (run `se_r50`)"]
  # Every accuracy printed for ours is one of the runs' numbers.
  part1 = markdown.split("## Part 2")[0]
  ours = set(re.findall(r"\| (\d+\.\d\d) \|", part1))
  assert ours <= {"80.12", "95.10", "77.50", "93.60"}

  runs_table = part1.split("### Runs of the paper's rows")[1]
  assert "1h02m05s" in runs_table and "8 x TPU v3" in runs_table
  assert "num_epochs: 10.0 (config: 500.0)" in runs_table
  assert "aa_wrn_c10" not in part1 and "aa_wrn_c10" in markdown.split("## Part 2")[1]
  assert "not recorded" in runs_table  # the ResNet-50 runs have no run_info.json

  with Image.open(out.parent / "figures" / report.PAPER_FIGURE) as figure:
    assert figure.size == (600, 600)


def test_position_encoding_rows_match_by_architecture(tmp_path):
  """The default AA-ResNet-50 is Table 7's "relative" column: an override equal to the
  model's default names the same architecture; other encodings and data do not match."""
  def config(spec):
    return config_to_dict(load_config(str(REPO_ROOT / f"configs/imagenet_resnet.py:{spec}")))

  run = report.Run(str(tmp_path), config("aa_resnet50"), None, None, [])
  rows = {row.label: config_to_dict(report.row_config(row)) for row in tables.table_rows(7)}
  assert [label for label, cfg in rows.items() if report.run_matches_row(run, cfg)] == \
      ["AA-ResNet-50, relative"]
  sine = report.Run(str(tmp_path), config("aa_resnet50,sine"), None, None, [])
  assert [label for label, cfg in rows.items() if report.run_matches_row(sine, cfg)] == \
      ["AA-ResNet-50, sine"]
  sine.config["data"]["image_size"] = 128
  assert not any(report.run_matches_row(sine, cfg) for cfg in rows.values())


def test_project_runs_grouped_by_seed_with_mean_and_spread(tmp_path):
  records = [{"step": s, "split": "train", "loss": 2.0 / s} for s in (4, 8, 12)]
  records += [{"step": 12, "split": "eval", "top1": 0.5, "top5": 0.9}]
  for seed, top1 in ((0, 0.60), (1, 0.64)):
    write_run(tmp_path / f"aa_{seed}", tiny_config(seed=seed), results(top1, 0.95, 12), records)
  write_run(tmp_path / "plain_0", tiny_config(model__name="resnet_tiny"),
            results(0.5, 0.9, 12), records)
  runs, _ = report.find_runs(f"{tmp_path}/aa_*,{tmp_path}/plain_0")
  groups = report.group_runs(runs)
  assert [[r.name for r in g] for g in groups] == [["aa_0", "aa_1"], ["plain_0"]]
  markdown = report.build_report(runs, str(tmp_path / "R.md"), (1,), with_flops=False)
  part2 = markdown.split("## Part 2")[1]
  assert "62.00 ± 2.83 (60.00–64.00, n=2)" in part2 and "50.00 (n=1)" in part2
  assert "| `aa_1` | 1 | 12 | — | 64.00 | 95.00 | not recorded |" in part2
  assert (tmp_path / "figures" / report.CURVES_FIGURE).exists()


def test_report_cli_rejects_unknown_table(tmp_path, capsys):
  with pytest.raises(SystemExit):
    report.main(["--tables", "5", "--out", str(tmp_path / "R.md")])
  assert "unknown table(s) [5]" in capsys.readouterr().err


@pytest.mark.parametrize("top1", [0.9833, 1.0])
def test_curves_keep_top1_within_0_100_and_mark_few_points(tmp_path, top1):
  records = [{"step": s, "split": "train", "loss": 2.0 / s} for s in (4, 8, 12)]
  records += [{"step": 12, "split": "eval", "top1": top1, "top5": 1.0}]
  write_run(tmp_path / "one", tiny_config(), results(top1, 1.0, 12), records)
  runs, _ = report.find_runs(str(tmp_path / "one"))
  figure = report.curves_figure(runs)
  try:
    loss_axis, top1_axis = figure.axes
    low, high = top1_axis.get_ylim()
    assert 0 <= low < 100 * top1 <= high <= 100
    for axis in (loss_axis, top1_axis):
      (line,) = axis.get_lines()
      assert line.get_marker() == "o" and line.get_markersize() >= 5
  finally:
    import matplotlib.pyplot as plt
    plt.close(figure)


@pytest.mark.parametrize("case", ["missing folder", "under a file", "a folder"])
def test_report_out_mistakes_print_one_error_line_and_write_nothing(tmp_path, case):
  write_run(tmp_path / "runs" / "one", tiny_config(), results(0.5, 0.9, 12))
  (tmp_path / "notes.txt").write_text("a file")
  out, expected = {
      "missing folder": (tmp_path / "missing" / "R.md",
                         f"its folder {tmp_path / 'missing'} does not exist"),
      "under a file": (tmp_path / "notes.txt" / "R.md",
                       f"its folder {tmp_path / 'notes.txt'} is a file, not a folder"),
      "a folder": (tmp_path / "runs", f"--out={tmp_path / 'runs'} is a folder"),
  }[case]
  before = sorted(tmp_path.rglob("*"))
  result = subprocess.run([sys.executable, "-m", "aa_flax.report", "--tables=1", "--no-flops",
                           f"--runs={tmp_path / 'runs' / '*'}", f"--out={out}"],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: WorkdirError: ") and expected in last, result.stderr
  assert sorted(tmp_path.rglob("*")) == before


def test_tables_and_report_say_what_takes_time_and_show_a_line_per_row(tmp_path):
  result = subprocess.run([sys.executable, "-m", "aa_flax.tables", "--tables=1"],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[0].startswith("Counting parameters and GFLOPs of 4 rows (tables 1).")
  assert "--no-flops skips it" in lines[0]
  labels = [row.label for row in tables.table_rows(1) if tables.is_implemented(row)]
  assert [re.match(r"  table 1, (.*): [\d.]+M params, [\d.]+ GFLOPs \([\d.]+ s\)$", line)[1]
          for line in lines[1:]] == labels
  assert "| AA-Wide-ResNet | aa_wrn28_10 |" in result.stdout
  rows = []
  report.build_report([], str(tmp_path / "R.md"), (1,), with_flops=False,
                      progress=types.SimpleNamespace(line=lambda *args: rows.append(args)))
  assert [args[2] for args in rows] == labels
