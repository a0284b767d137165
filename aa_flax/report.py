"""Reproduction report: the paper's tables beside runs of this code, and the project's own runs.

    python -m aa_flax.report --runs='runs/*,/data/aa_r50' [--out=REPRODUCTION.md]
        [--tables=1,2,3,4,6,7] [--no-flops]

Part 1 lists every row of the paper's tables 1, 2 (the rows whose model this codebase has),
3, 4, 6 and 7: the paper's params / GFLOPs / top-1 / top-5 with their confidence marks, ours
(params and GFLOPs computed as ``aa_flax.tables`` does), the differences and the config that
trains the row. Top-1/top-5 of ours come only from a workdir's ``eval_results.json`` whose
``config.json`` trains the row's model (same architecture) on the row's data; every other row
says "not run". Matched runs are listed with steps, epochs, wall time, hardware and how their
recipe differs from the row's config, and a PNG sets the paper's top-1 against ours.

Part 2 holds every other run (the project's own small experiments): runs that differ only in
their seed form a group with mean ± standard deviation, and a PNG shows their curves.

Wall time and hardware come from ``run_info.json`` (written by ``train.py``); a run without
it says "not recorded". The report is printed and written to ``--out`` (in an existing
folder); figures go to ``figures/`` beside it. While it counts, a line per paper row goes to
stderr (counting GFLOPs is the slow part; ``--no-flops`` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import statistics
from typing import Any, Optional, Sequence

from aa_flax import config_utils, run_info, storage, tables, workdir as workdir_layout
from aa_flax.errors import AAFlaxError, WorkdirError, exit_with_error
from aa_flax.metric_logging import read_records
from aa_flax.progress import Progress

# Config keys that change neither what is trained nor how (logging, checkpoints, loaders).
BOOKKEEPING_KEYS = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "async_checkpointing", "eval_only", "checkpoint_path", "on_nonfinite",
    "allow_config_mismatch", "eval_batch_size", *config_utils.RESUME_FREE_KEYS})
PAPER_FIGURE = "paper_vs_ours_top1.png"
CURVES_FIGURE = "project_runs_curves.png"


@dataclasses.dataclass
class Run:
  """What a workdir says about its run: config, final eval, run info and metric records."""
  workdir: str
  config: dict[str, Any]
  results: Optional[dict[str, Any]]
  info: Optional[dict[str, Any]]
  records: list[dict[str, Any]]

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  @property
  def finished(self) -> bool:
    return self.results is not None

  @property
  def step(self) -> Optional[int]:
    if self.results:
      return int(self.results["step"])
    return max((int(r["step"]) for r in self.records), default=None)

  @property
  def epochs(self) -> Optional[float]:
    """Epochs trained: known for finished runs whose length was set in epochs."""
    if self.finished and self.config.get("num_train_steps", -1) <= 0:
      return float(self.config["num_epochs"])
    return None

  @property
  def wall_time_s(self) -> Optional[float]:
    return run_info.total_wall_time(self.info)

  @property
  def load_average(self) -> Optional[float]:
    """1-minute load average of the host when the last segment ended (if recorded)."""
    segments = (self.info or {}).get("segments") or [{}]
    load = segments[-1].get("load_average_end")
    return load[0] if load else None

  @property
  def wall_time(self) -> str:
    """``'12m03s'`` (plus the host's load when recorded: timings on a busy host are slow)."""
    text = format_duration(self.wall_time_s)
    return text if self.load_average is None else f"{text} (load {self.load_average:g})"

  @property
  def hardware(self) -> str:
    if not self.info or not self.info.get("segments"):
      return "not recorded"
    return run_info.describe_environment(self.info["segments"][-1]["environment"])


def load_run(workdir: str) -> Run:
  """Reads a workdir. Raises ``WorkdirError`` if it holds no ``config.json``."""
  results_file = storage.path(workdir) / workdir_layout.EVAL_RESULTS_FILE
  return Run(workdir=workdir, config=workdir_layout.read_config(workdir),
             results=workdir_layout.read_json(results_file),
             info=run_info.read(workdir),
             records=read_records(workdir))


def find_runs(spec: str) -> tuple[list[Run], list[str]]:
  """Runs of comma-separated workdirs or globs; also the paths skipped, with the reason."""
  runs, skipped = [], []
  for pattern in (p.strip() for p in spec.split(",") if p.strip()):
    if glob.has_magic(pattern):
      workdirs = sorted(glob.glob(os.path.expanduser(pattern)))
      if not workdirs:
        skipped.append(f"{pattern}: matches nothing")
    else:
      workdirs = [os.path.expanduser(pattern)]
    for workdir in workdirs:
      try:
        runs.append(load_run(workdir))
      except (AAFlaxError, OSError, ValueError) as error:
        skipped.append(f"{workdir}: {error}")
  return runs, skipped


# ---------------------------------------------------------------------------------------------
# Matching runs to the paper's rows.


def row_config(row: tables.PaperRow):
  """The ``ml_collections`` config that trains ``row`` (from the shipped configs)."""
  path, _, arg = tables.config_spec(row).partition(":")
  return config_utils.load_config(
      f"{os.path.join(config_utils.shipped_configs_dir(), os.path.basename(path))}:{arg}")


def _settings(config: dict[str, Any], sections: Sequence[str], inside: bool) -> dict[str, Any]:
  """Flat config keys in (``inside``) or outside ``sections``, bookkeeping keys left out."""
  return {key: value for key, value in config_utils.flatten(config).items()
          if (key.split(".")[0] in sections) == inside and key not in BOOKKEEPING_KEYS}


def _model_settings(config: dict[str, Any]) -> dict[str, Any]:
  """The ``create_model`` keyword arguments a stored config sets (``None`` keys left out)."""
  import ml_collections
  return config_utils.model_overrides(ml_collections.ConfigDict(config["model"]))


def _architecture(config: dict[str, Any]):
  """The registry model a config trains (classes and dtype aside), or ``None``."""
  from aa_flax.models import create_model
  try:
    return create_model(config["model"]["name"], 1, **_model_settings(config))
  except (KeyError, ValueError, TypeError):
    return None


def run_matches_row(run: Run, row_cfg: dict[str, Any]) -> bool:
  """Same architecture (overrides equal to defaults count as defaults) and same data."""
  model = _architecture(run.config)
  return (model is not None and model == _architecture(row_cfg)
          and _settings(run.config, ["data"], True) == _settings(row_cfg, ["data"], True))


def recipe_changes(run: Run, row_cfg: dict[str, Any]) -> list[str]:
  """``'key: <run value> (config: <row value>)'`` for every training setting that differs."""
  ours = _settings(run.config, ["model", "data"], False)
  theirs = _settings(row_cfg, ["model", "data"], False)
  return [f"{key}: {ours.get(key, '—')} (config: {theirs.get(key, '—')})"
          for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]


# ---------------------------------------------------------------------------------------------
# Formatting.


def _percent(value: Optional[float]) -> str:
  return "—" if value is None else f"{100 * value:.2f}"


def _points(ours: Optional[float], paper: Optional[float]) -> str:
  """Difference of a fraction (ours) and a percentage (paper) in percentage points."""
  return "" if ours is None or paper is None else f"{100 * ours - paper:+.2f} pp"


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return "not recorded"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _epochs(run: Run) -> str:
  return "—" if run.epochs is None else f"{run.epochs:g}"


def _accuracy_cells(row: tables.PaperRow, run: Optional[Run]) -> list[str]:
  if run is None:
    ours1 = ours5 = "not run"
    top1 = top5 = None
  elif not run.finished:
    ours1 = ours5 = "unfinished"
    top1 = top5 = None
  else:
    top1, top5 = run.results["top1"], run.results["top5"]
    ours1, ours5 = _percent(top1), _percent(top5)
  return [tables.with_mark(row.top1, row.top1_mark), ours1, _points(top1, row.top1),
          tables.with_mark(row.top5, row.top5_mark), ours5, _points(top5, row.top5)]


@dataclasses.dataclass
class _Matched:
  row: tables.PaperRow
  run: Run
  changes: list[str]


def paper_section(runs: Sequence[Run], table_numbers: Sequence[int], with_flops: bool,
                  progress: Optional[Progress] = None) -> tuple[list[str], list[_Matched]]:
  """Markdown lines of part 1 and the (row, run) pairs it matched; ``progress`` gets a line
  per row."""
  progress = progress or Progress("none")
  conventions = ("dense",) if with_flops else ()
  columns = ["model", "config", *tables.count_columns(conventions), "top-1 paper", "ours",
             "diff", "top-5 paper", "ours", "diff"]
  lines, matched = [], []
  for table in table_numbers:
    lines += ["", f"### {tables.table_heading(table)}", "", tables.markdown_row(columns),
              "|---" * len(columns) + "|"]
    for row in filter(tables.is_implemented, tables.table_rows(table)):
      cfg = config_utils.config_to_dict(row_config(row))
      row_runs = [run for run in runs if run_matches_row(run, cfg)]
      matched += [_Matched(row, run, recipe_changes(run, cfg)) for run in row_runs]
      params, gflops = tables.row_counts(row, with_flops, progress, conventions)
      cells = [f"`{tables.config_spec(row)}`", *tables.count_cells(row, params, gflops)]
      for run in row_runs or [None]:
        label = row.label if run is None else f"{row.label} (run `{run.name}`)"
        lines.append(tables.markdown_row([label, *cells, *_accuracy_cells(row, run)]))
    note = tables.not_implemented_note(table)
    if note:
      lines += ["", note]
  return lines, matched


def matched_runs_lines(matched: Sequence[_Matched]) -> list[str]:
  if not matched:
    return ["", "No run of a paper row was given, so every row above says \"not run\"."]
  lines = ["", "| table | row | workdir | steps | epochs | wall time | hardware | "
           "recipe changed from the config |", "|---" * 8 + "|"]
  for item in matched:
    run = item.run
    changes = "; ".join(item.changes) or "none"
    lines.append(f"| {item.row.table} | {item.row.label} | `{run.workdir}` | "
                 f"{run.step if run.step is not None else '—'}"
                 f"{'' if run.finished else ' (unfinished)'} | {_epochs(run)} | "
                 f"{run.wall_time} | {run.hardware} | {changes} |")
  return lines


# A curve with at most this many points draws each point as a visible marker.
FEW_POINTS = 20


def _accuracy_limits(values: Sequence[float], margin: float = 1.0) -> tuple[float, float]:
  """Axis limits around accuracies in percent, never outside [0, 100]."""
  return max(0.0, min(values) - margin), min(100.0, max(values) + margin)


def _curve_style(num_points: int) -> dict[str, Any]:
  """Line markers: large when a curve has few points (one point is only a marker)."""
  return {"marker": "o", "markersize": 5 if num_points <= FEW_POINTS else 2}


def plot_paper_vs_ours(matched: Sequence[_Matched], path: str) -> bool:
  """Scatter of the paper's top-1 against ours for finished runs; ``False`` if none."""
  points = [(m.row.top1, 100 * m.run.results["top1"], f"T{m.row.table} {m.row.label}")
            for m in matched if m.run.finished and m.row.top1 is not None]
  if not points:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(6, 6), dpi=100)
  low, high = _accuracy_limits([v for p in points for v in p[:2]])
  axis.plot([low, high], [low, high], color="grey", linewidth=1, label="ours = paper")
  for paper, ours, label in points:
    axis.scatter([paper], [ours], s=25)
    axis.annotate(label, (paper, ours), fontsize=7, xytext=(3, 3), textcoords="offset points")
  axis.set(xlim=(low, high), ylim=(low, high), xlabel="paper top-1 (%)",
           ylabel="ours top-1 (%)", title="Paper vs ours, top-1")
  axis.legend(loc="upper left", fontsize=8)
  figure.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  figure.savefig(path)
  plt.close(figure)
  return True


# ---------------------------------------------------------------------------------------------
# The project's own runs.


def _group_key(run: Run) -> str:
  flat = {k: v for k, v in config_utils.flatten(run.config).items()
          if k != "seed" and k not in BOOKKEEPING_KEYS}
  return json.dumps(flat, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
  """Runs whose configs differ only in the seed (and bookkeeping), in first-seen order."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(_group_key(run), []).append(run)
  return [sorted(group, key=lambda r: r.config.get("seed", 0)) for group in groups.values()]


def _data_description(config: dict[str, Any]) -> str:
  data = config["data"]
  if data["name"] != "npz":
    return data["name"]
  names = lambda spec: ", ".join(os.path.basename(p) for p in spec.split(","))  # noqa: E731
  return f"npz: train {names(data['train_files'])}; eval {names(data['eval_files'])}"


def mean_and_spread(values: Sequence[float]) -> str:
  """``'61.23 ± 0.45 (60.91–61.55, n=2)'`` in percent; sd is the sample standard deviation."""
  percents = [100 * v for v in values]
  if len(percents) == 1:
    return f"{percents[0]:.2f} (n=1)"
  return (f"{statistics.mean(percents):.2f} ± {statistics.stdev(percents):.2f} "
          f"({min(percents):.2f}–{max(percents):.2f}, n={len(percents)})")


def _recipe_summary(config: dict[str, Any]) -> str:
  optimizer = config["optimizer"]
  length = (f"{config['num_train_steps']} steps" if config.get("num_train_steps", -1) > 0
            else f"{config['num_epochs']:g} epoch(s)")
  settings = _model_settings(config)
  model = config["model"]["name"] + (f" {settings}" if settings else "")
  return (f"model {model}; {length}, batch {config['batch_size']}, "
          f"{optimizer['name']} (base LR {optimizer['base_learning_rate']:g} per 256, "
          f"{optimizer['schedule']}, warm-up {optimizer['warmup_epochs']:g} epochs, weight "
          f"decay {optimizer['weight_decay']:g}), augment {config['data']['augment']}, "
          f"{'bf16' if config.get('half_precision') else 'f32'}")


def project_section(runs: Sequence[Run]) -> list[str]:
  if not runs:
    return ["", "No project runs were given. The project's CIFAR-10 comparison of a small "
            "ResNet with and without attention augmentation is trained, recorded under "
            "`docs/runs/` and reported here by `python -m experiments.cifar10_evidence`."]
  groups = group_runs(runs)
  lines = ["", "| model | data | runs | test top-1 (%) mean ± sd (range) | test top-5 (%) | "
           "wall time per run |", "|---" * 6 + "|"]
  for group in groups:
    done = [run for run in group if run.finished]
    top1 = mean_and_spread([r.results["top1"] for r in done]) if done else "unfinished"
    top5 = mean_and_spread([r.results["top5"] for r in done]) if done else "unfinished"
    times = ", ".join(r.wall_time for r in group)
    lines.append(f"| {group[0].config['model']['name']} | {_data_description(group[0].config)} "
                 f"| {len(group)} | {top1} | {top5} | {times} |")
  for index, group in enumerate(groups, 1):
    first = group[0]
    lines += ["", f"#### Group {index}: {first.config['model']['name']}", "",
              f"- Recipe: {_recipe_summary(first.config)}.",
              f"- Data: {_data_description(first.config)}."]
    notes = dict.fromkeys(n for run in group for n in (run.info or {}).get("notes", []))
    lines += [f"- Note: {note}" for note in notes]
    hardware = dict.fromkeys(run.hardware for run in group)
    lines += [f"- Hardware: {'; '.join(hardware)}.", "",
              "| run | seed | steps | epochs | test top-1 (%) | test top-5 (%) | wall time |",
              "|---" * 7 + "|"]
    for run in group:
      lines.append(f"| `{run.name}` | {run.config.get('seed', '—')} | "
                   f"{run.step if run.step is not None else '—'} | {_epochs(run)} | "
                   f"{_percent(run.results['top1']) if run.finished else 'unfinished'} | "
                   f"{_percent(run.results['top5']) if run.finished else 'unfinished'} | "
                   f"{run.wall_time} |")
  return lines


def curves_figure(runs: Sequence[Run]):
  """Train loss and eval top-1 against epochs (or steps), one colour per group; the top-1
  axis stays within [0, 100]. ``None`` if no run has metric records."""
  groups = group_runs(runs)
  if not any(run.records for run in runs):
    return None
  import matplotlib.pyplot as plt
  figure, (loss_axis, top1_axis) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  in_epochs = all(run.epochs is not None for run in runs)
  accuracies = []
  for index, group in enumerate(groups):
    for number, run in enumerate(group):
      scale = run.epochs / run.step if in_epochs and run.step else 1.0
      style = dict(color=colours[index % len(colours)], linewidth=1.2,
                   linestyle=("-", "--", ":", "-.")[number % 4])
      label = f"{run.config['model']['name']} seed {run.config.get('seed', '?')}"
      train = [r for r in run.records if r.get("split") == "train" and "loss" in r]
      evals = [r for r in run.records if r.get("split") == "eval" and "top1" in r]
      accuracies += [100 * r["top1"] for r in evals]
      loss_axis.plot([r["step"] * scale for r in train], [r["loss"] for r in train],
                     label=label, **style, **_curve_style(len(train)))
      top1_axis.plot([r["step"] * scale for r in evals], [100 * r["top1"] for r in evals],
                     label=label, **style, **_curve_style(len(evals)))
  unit = "epoch" if in_epochs else "step"
  loss_axis.set(xlabel=unit, ylabel="train loss (window mean)", title="Training loss")
  top1_axis.set(xlabel=unit, ylabel="test top-1 (%)", title="Test top-1")
  if accuracies:
    top1_axis.set_ylim(*_accuracy_limits(accuracies))
  top1_axis.legend(fontsize=7)
  for axis in (loss_axis, top1_axis):
    axis.grid(alpha=0.3)
  figure.tight_layout()
  return figure


def plot_curves(runs: Sequence[Run], path: str) -> bool:
  """``curves_figure`` written to ``path``; ``False`` (nothing written) if there is none."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure = curves_figure(runs)
  if figure is None:
    return False
  os.makedirs(os.path.dirname(path), exist_ok=True)
  figure.savefig(path)
  plt.close(figure)
  return True


# ---------------------------------------------------------------------------------------------


def build_report(runs: Sequence[Run], out_path: str, table_numbers: Sequence[int] = (1, 2, 3, 4,
                 6, 7), with_flops: bool = True, skipped: Sequence[str] = (),
                 command: str = "", project_extra: Sequence[str] = (),
                 progress: Optional[Progress] = None) -> str:
  """Writes the markdown report to ``out_path`` and its figures to ``figures/`` beside it.

  ``project_extra``: markdown lines appended to part 2 (e.g. a figure made by the caller).
  ``progress`` gets a line per paper row while they are counted. Returns the markdown.
  """
  figure_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "figures")
  paper_lines, matched = paper_section(runs, table_numbers, with_flops, progress)
  paper_run_ids = {id(m.run) for m in matched}
  project_runs = [run for run in runs if id(run) not in paper_run_ids]
  utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [
      "# Reproduction report", "",
      f"Generated {utc} by `{command or 'python -m aa_flax.report'}` from {len(runs)} "
      "run(s).",
      "",
      "Paper numbers carry a confidence mark: **[sure]** read from the paper, **[likely]** "
      "from secondary sources or consistent derivations, **[unsure]** remembered, not "
      "confirmed. Our params and GFLOPs are computed from the model (GFLOPs: multiply and add "
      "count 2; every conv tap counted, as in the paper). Our top-1/top-5 come only from a "
      "run's `eval_results.json` whose `config.json` trains the row's architecture on the "
      "row's data; a row without one says \"not run\". Differences of accuracies are in "
      "percentage points (pp). Wall times are summed over a run's invocations; \"load\" is "
      "the host's 1-minute load average when the run ended (other work slows a run down). "
      "Each row trains with `python train.py --config=<config> --workdir=<dir>`.",
  ]
  if skipped:
    lines += ["", "Workdirs skipped:"] + [f"- {reason}" for reason in skipped]
  lines += ["", "## Part 1: the paper's tables", *paper_lines, "", "### Runs of the paper's rows",
            *matched_runs_lines(matched)]
  if plot_paper_vs_ours(matched, os.path.join(figure_dir, PAPER_FIGURE)):
    lines += ["", f"![paper vs ours top-1](figures/{PAPER_FIGURE})"]
  lines += ["", "## Part 2: the project's own runs", "",
            "Small experiments of this project, not the paper's: they use other data, models "
            "and budgets, so their numbers are not comparable with Part 1.",
            *project_section(project_runs)]
  if plot_curves(project_runs, os.path.join(figure_dir, CURVES_FIGURE)):
    lines += ["", f"![curves of the project runs](figures/{CURVES_FIGURE})"]
  lines += list(project_extra)
  markdown = "\n".join(lines) + "\n"
  with open(out_path, "w") as handle:
    handle.write(markdown)
  return markdown


def check_out_path(out_path: str) -> None:
  """Raises ``WorkdirError`` unless ``out_path`` can be a file in an existing folder (checked
  before anything is computed or written)."""
  folder = os.path.dirname(os.path.abspath(out_path))
  if os.path.isdir(out_path):
    raise WorkdirError(f"--out={out_path} is a folder; give a file name such as "
                       f"{os.path.join(out_path, 'REPRODUCTION.md')}")
  if not os.path.isdir(folder):
    what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
    raise WorkdirError(f"--out={out_path}: its folder {folder} {what}; create the folder or "
                       "choose another --out")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line; a mistake prints one ``error:`` line on stderr and writes nothing."""
  import sys
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="",
                      help="comma-separated workdirs or globs (e.g. 'runs/*,/data/aa_r50')")
  parser.add_argument("--out", default="REPRODUCTION.md",
                      help="markdown file to write; figures go to figures/ beside it")
  tables.add_table_arguments(parser)
  args = parser.parse_args(argv)
  try:
    check_out_path(args.out)
    runs, skipped = find_runs(args.runs)
    command = " ".join(["python -m aa_flax.report",
                        *(argv if argv is not None else sys.argv[1:])])
    progress = Progress("print")
    tables.announce(args.tables, not args.no_flops, progress)
    markdown = build_report(runs, args.out, args.tables, not args.no_flops, skipped, command,
                            progress=progress)
  except AAFlaxError as error:
    exit_with_error(error)
  print(markdown)
  print(f"Wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
