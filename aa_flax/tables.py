"""The paper's tables in one place: every row's numbers, and our parameter and GFLOP counts.

    python -m aa_flax.tables [--tables 1,2,3,4,6,7] [--no-flops] [--write docs/TABLES.md]

prints (``--write``: also puts between the markers ``BLOCK_BEGIN`` and ``BLOCK_END`` of a
markdown file), for each row, the paper's params and GFlops with their confidence mark ([sure]: read
from the paper; [likely]: from secondary sources or consistent derivations; [unsure]:
remembered, not confirmed) beside ours and the relative difference. GFLOPs use the "dense"
convention (padding taps counted, like the paper; see ``aa_flax.model_cost``); XLA's own cost
analysis is printed beside it. A line per row goes to stderr while it counts (GFLOPs are the slow
part). ``PAPER_ROWS`` also holds the paper's top-1/top-5 (percent),
which ``aa_flax.report`` sets beside trained runs. Rows whose model is not in the registry
(some of Table 2's attention modules) are listed as not implemented.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from typing import Any, Optional, Sequence

from aa_flax.errors import AAFlaxError, WorkdirError, exit_with_error
from aa_flax.model_cost import FLOP_CONVENTIONS, count_flops, count_params
from aa_flax.models import create_model, list_models
from aa_flax.progress import Progress


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of a paper table: our model (name + overrides) and the paper's numbers.

  ``params_m`` in millions, ``gflops`` per image, ``top1``/``top5`` in percent; ``None``
  where the paper gives no number. Each number has a confidence mark (sure, likely, unsure).
  ``config_arg`` is the argument of the table's config file that trains this row.
  """
  table: int
  label: str
  model: str
  params_m: Optional[float]
  params_mark: str
  gflops: Optional[float] = None
  gflops_mark: str = ""
  top1: Optional[float] = None
  top1_mark: str = ""
  top5: Optional[float] = None
  top5_mark: str = ""
  overrides: tuple[tuple[str, Any], ...] = ()
  config_arg: str = ""


# Input size and classes per table: CIFAR-100 at 32 px, ImageNet at 224 px.
TABLE_INPUTS = {1: (32, 100), 2: (224, 1000), 3: (224, 1000), 4: (224, 1000), 6: (224, 1000),
                7: (224, 1000)}
TABLE_TITLES = {
    1: "CIFAR-100, Wide-ResNet-28-10",
    2: "ImageNet ResNet-50 with other attention modules",
    3: "ImageNet ResNets",
    4: "ImageNet MnasNet",
    6: "Fully attentional ResNet-50 (kappa = upsilon)",
    7: "Position encodings, ImageNet",
}
# The config file that trains each table's rows (``python train.py --config=<file>:<arg>``).
TABLE_CONFIGS = {1: "configs/cifar.py", 2: "configs/imagenet_resnet.py",
                 3: "configs/imagenet_resnet.py", 4: "configs/imagenet_mnasnet.py",
                 6: "configs/imagenet_resnet.py", 7: "configs/imagenet_resnet.py"}


def _encoding_row(depth: int, encoding: str, top1: float, top5: float, mark: str) -> PaperRow:
  return PaperRow(7, f"AA-ResNet-{depth}, {encoding}", f"aa_resnet{depth}", None, "",
                  top1=top1, top1_mark=mark, top5=top5, top5_mark=mark,
                  overrides=(("position_encoding", encoding),),
                  config_arg=f"aa_resnet{depth},{encoding}")


S, L, U = "sure", "likely", "unsure"
PAPER_ROWS: tuple[PaperRow, ...] = (
    # table, label, model, params, mark, GFlops, mark, top-1, mark, top-5, mark
    PaperRow(1, "Wide-ResNet", "wrn28_10", 36.3, S, 10.4, S, 80.3, S, 95.0, S),
    PaperRow(1, "GE-Wide-ResNet", "ge_wrn28_10", 36.3, S, 10.4, S, 79.8, S, 95.0, S),
    PaperRow(1, "SE-Wide-ResNet", "se_wrn28_10", 36.5, S, 10.4, S, 81.0, S, 95.3, S),
    PaperRow(1, "AA-Wide-ResNet", "aa_wrn28_10", 36.2, S, 10.9, S, 81.6, S, 95.2, S),
    # Table 2: only the top-1 of SE and AA is sure.
    PaperRow(2, "ResNet-50", "resnet50", 25.6, U, top1=76.4, top1_mark=U),
    PaperRow(2, "SE-ResNet-50", "se_resnet50", 28.1, U, 8.7, U, 77.5, S, 93.7, U),
    PaperRow(2, "BAM-ResNet-50", "bam_resnet50", 25.9, U, top1=77.3, top1_mark=U),
    PaperRow(2, "CBAM-ResNet-50", "cbam_resnet50", 28.1, U, top1=77.4, top1_mark=U),
    PaperRow(2, "GALA-ResNet-50", "gala_resnet50", 29.4, U, top1=77.3, top1_mark=U),
    PaperRow(2, "GE-ResNet-50 (GE-θ)", "ge_resnet50", 31.1, U, top1=77.6, top1_mark=U),
    PaperRow(2, "AA-ResNet-50", "aa_resnet50", 25.8, U, 8.3, U, 77.7, S, 93.8, U),
    PaperRow(3, "ResNet-34", "resnet34", 21.8, L, 7.4, L, 73.6, S, 91.5, L),
    PaperRow(3, "SE-ResNet-34", "se_resnet34", 22.0, U, 7.4, L, 74.3, S, 91.8, U),
    PaperRow(3, "AA-ResNet-34", "aa_resnet34", 20.7, L, 7.1, L, 74.7, S, 92.0, L),
    PaperRow(3, "ResNet-50", "resnet50", 25.6, L, 8.2, L, 76.4, S, 93.1, L),
    PaperRow(3, "SE-ResNet-50", "se_resnet50", 28.1, L, 8.2, L, 77.5, S, 93.7, L),
    PaperRow(3, "AA-ResNet-50", "aa_resnet50", 25.8, L, 8.3, L, 77.7, S, 93.8, L),
    PaperRow(3, "ResNet-101", "resnet101", 44.5, L, 15.6, L, 77.9, S, 94.0, L),
    PaperRow(3, "SE-ResNet-101", "se_resnet101", 49.3, U, 15.6, U, 78.4, S, 94.2, U),
    PaperRow(3, "AA-ResNet-101", "aa_resnet101", 45.4, L, 16.1, L, 78.7, S, 94.4, L),
    PaperRow(3, "ResNet-152", "resnet152", 60.2, U, 23.0, U, 78.4, S, 94.2, U),
    PaperRow(3, "SE-ResNet-152", "se_resnet152", 66.8, U, 23.1, U, 78.9, S, 94.5, U),
    PaperRow(3, "AA-ResNet-152", "aa_resnet152", 61.6, U, 23.8, U, 79.1, S, 94.6, U),
    PaperRow(4, "MnasNet-0.75", "mnasnet_0.75", 2.91, U, None, "", 73.3, U, 91.3, U),
    PaperRow(4, "AA-MnasNet-0.75", "aa_mnasnet_0.75", 3.02, U, None, "", 73.9, U, 91.6, U),
    PaperRow(4, "MnasNet-1.0", "mnasnet_1.0", 3.89, U, None, "", 75.2, U, 92.4, U),
    PaperRow(4, "AA-MnasNet-1.0", "aa_mnasnet_1.0", 4.06, U, None, "", 75.7, U, 92.6, U),
    PaperRow(4, "MnasNet-1.25", "mnasnet_1.25", 5.26, U, None, "", 76.7, U, 93.2, U),
    PaperRow(4, "AA-MnasNet-1.25", "aa_mnasnet_1.25", 5.53, U, None, "", 77.2, U, 93.6, U),
    PaperRow(4, "MnasNet-1.4", "mnasnet_1.4", 6.10, U, None, "", 77.2, U, 93.5, U),
    PaperRow(4, "AA-MnasNet-1.4", "aa_mnasnet_1.4", 6.44, U, None, "", 77.7, U, 93.8, U),
    PaperRow(6, "FA ResNet-50 κ=υ=0.25", "fa_resnet50_0.25", 24.3, U, 7.9, U, 77.7, U, 93.8, U),
    PaperRow(6, "FA ResNet-50 κ=υ=0.5", "fa_resnet50_0.5", 22.3, U, 7.3, U, 77.3, U, 93.6, U),
    PaperRow(6, "FA ResNet-50 κ=υ=0.75", "fa_resnet50_0.75", 20.7, U, 6.8, U, 76.7, U, 93.2, U),
    PaperRow(6, "FA ResNet-50 κ=υ=1.0", "fa_resnet50_1.0", 19.4, U, 6.3, U, 73.9, U, 91.5, U),
    # Table 7: the AA-ResNet-34 row is unsure, the AA-ResNet-50 row likely.
    _encoding_row(34, "none", 74.4, 91.9, U),
    _encoding_row(34, "sine", 74.4, 92.0, U),
    _encoding_row(34, "coordconv", 74.4, 92.0, U),
    _encoding_row(34, "relative", 74.7, 92.0, U),
    _encoding_row(50, "none", 77.5, 93.7, L),
    _encoding_row(50, "sine", 77.5, 93.7, L),
    _encoding_row(50, "coordconv", 77.5, 93.8, L),
    _encoding_row(50, "relative", 77.7, 93.8, L),
)
del S, L, U


def is_implemented(row: PaperRow) -> bool:
  """Whether the row's model is in this codebase's registry."""
  return row.model in list_models()


def table_rows(table: int) -> list[PaperRow]:
  """The rows of ``table`` in the paper's order, implemented or not."""
  return [row for row in PAPER_ROWS if row.table == table]


def config_spec(row: PaperRow) -> str:
  """``'<config file>:<arg>'`` that trains the row (``train.py --config=...``)."""
  return f"{TABLE_CONFIGS[row.table]}:{row.config_arg or row.model}"


def create_row_model(row: PaperRow, dtype=None):
  """The row's model at its table's class count (f32 unless ``dtype``)."""
  _, classes = TABLE_INPUTS[row.table]
  kwargs = {} if dtype is None else {"dtype": dtype}
  return create_model(row.model, classes, **kwargs, **dict(row.overrides))


def model_params(row: PaperRow) -> int:
  """Our parameter count for a table row."""
  size, _ = TABLE_INPUTS[row.table]
  return count_params(create_row_model(row), (1, size, size, 3))


def model_gflops(row: PaperRow, convention: str = "dense") -> float:
  """Our per-image GFLOPs for a table row."""
  size, _ = TABLE_INPUTS[row.table]
  return count_flops(create_row_model(row), (1, size, size, 3), convention) / 1e9


def relative_difference(ours: float, paper: Optional[float]) -> str:
  """``'+1.23%'``, or ``''`` when the paper has no number."""
  return "" if paper is None else f"{100 * (ours - paper) / paper:+.2f}%"


def with_mark(value: Optional[float], mark: str, digits: int = 1, unit: str = "") -> str:
  """``'77.7 [sure]'``, or ``'—'`` when the paper has no number."""
  return "—" if value is None else f"{value:.{digits}f}{unit} [{mark}]"


def not_implemented_note(table: int) -> str:
  """A line naming the table's rows whose model is not in the registry (or ``''``)."""
  missing = [row.label for row in table_rows(table) if not is_implemented(row)]
  return f"Not implemented in this codebase: {', '.join(missing)}." if missing else ""


def announce(table_numbers: Sequence[int], with_flops: bool, progress: Progress) -> None:
  """Says up front how many rows get counted and that counting GFLOPs is the slow part."""
  rows = sum(len(list(filter(is_implemented, table_rows(t)))) for t in table_numbers)
  if with_flops:
    progress.line("Counting parameters and GFLOPs of %d rows (tables %s). Counting GFLOPs "
                  "traces every model and takes most of the time; --no-flops skips it.", rows,
                  ", ".join(map(str, table_numbers)))
  else:
    progress.line("Counting parameters of %d rows (tables %s); GFLOPs skipped (--no-flops).",
                  rows, ", ".join(map(str, table_numbers)))


def row_counts(row: PaperRow, with_flops: bool, progress: Progress,
               conventions: Sequence[str] = ("dense",)) -> tuple[float, dict[str, float]]:
  """Our params (millions) and, with ``with_flops``, GFLOPs per convention for ``row``;
  writes one progress line with what it counted and how long that took."""
  start = time.perf_counter()
  params = model_params(row) / 1e6
  gflops = {c: model_gflops(row, c) for c in conventions} if with_flops else {}
  progress.line("  table %d, %s: %.3fM params%s (%.1f s)", row.table, row.label, params,
                f", {gflops['dense']:.2f} GFLOPs" if gflops else "",
                time.perf_counter() - start)
  return params, gflops


def parse_table_numbers(text: str) -> list[int]:
  """``'1,3'`` -> ``[1, 3]``; raises ``argparse.ArgumentTypeError`` naming the bad value and
  the valid tables (the ``--tables`` option of this module and of ``aa_flax.report``)."""
  try:
    numbers = [int(t) for t in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"must be comma-separated integers among {sorted(TABLE_INPUTS)}, got {text!r}") from None
  bad = [t for t in numbers if t not in TABLE_INPUTS]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown table(s) {bad}; valid: {sorted(TABLE_INPUTS)}")
  return numbers


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
  """``--tables`` (parsed by ``parse_table_numbers``) and ``--no-flops``."""
  parser.add_argument("--tables", type=parse_table_numbers, default="1,2,3,4,6,7",
                      help="comma-separated paper tables among 1, 2, 3, 4, 6, 7")
  parser.add_argument("--no-flops", action="store_true",
                      help="parameters only (counting GFLOPs is the slow part)")


def table_heading(table: int) -> str:
  """``'Table 1: CIFAR-100, Wide-ResNet-28-10 (32x32 px, 100 classes)'``."""
  size, classes = TABLE_INPUTS[table]
  return f"Table {table}: {TABLE_TITLES[table]} ({size}x{size} px, {classes} classes)"


def count_columns(conventions: Sequence[str]) -> list[str]:
  """Column names of ``count_cells`` for GFLOPs in ``conventions`` (none: parameters only)."""
  columns = ["params paper", "ours", "diff"]
  if conventions:
    columns += ["GFLOPs paper", "ours (dense)", "diff"]
  return columns + [f"ours ({c.upper()})" for c in conventions if c != "dense"]


def count_cells(row: PaperRow, params: float, gflops: dict[str, float]) -> list[str]:
  """The paper's params (and GFLOPs) beside ours (millions; GFLOPs per convention, as
  ``row_counts`` returns them) and the relative differences."""
  cells = [with_mark(row.params_m, row.params_mark, 2, "M"), f"{params:.3f}M",
           relative_difference(params, row.params_m)]
  if gflops:
    cells += [with_mark(row.gflops, row.gflops_mark), f"{gflops['dense']:.2f}",
              relative_difference(gflops["dense"], row.gflops)]
  return cells + [f"{value:.2f}" for c, value in gflops.items() if c != "dense"]


def markdown_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def format_tables(tables: Sequence[int], with_flops: bool = True,
                  progress: Optional[Progress] = None) -> str:
  """The comparison as markdown, one section per table; ``progress`` gets a line per row."""
  progress = progress or Progress("none")
  conventions = FLOP_CONVENTIONS if with_flops else ()
  columns = ["model", "name", *count_columns(conventions)]
  lines = []
  for table in tables:
    lines += ["", table_heading(table), "", markdown_row(columns), "|---" * len(columns) + "|"]
    for row in filter(is_implemented, table_rows(table)):
      params, gflops = row_counts(row, with_flops, progress, conventions)
      lines.append(markdown_row([row.label, row.model, *count_cells(row, params, gflops)]))
    if not_implemented_note(table):
      lines += ["", not_implemented_note(table)]
  return "\n".join(lines)


BLOCK_BEGIN = "<!-- begin: generated by python -m aa_flax.tables -->"
BLOCK_END = "<!-- end: generated by python -m aa_flax.tables -->"
_BLOCK = re.compile(f"{re.escape(BLOCK_BEGIN)}\n(.*?)\n?{re.escape(BLOCK_END)}", re.S)


def find_generated_block(markdown: str, where: str = "the text") -> re.Match:
  """The generated block of ``markdown``, markers included (``group(1)``: the tables between
  them); raises ``WorkdirError`` naming ``where`` if it has none."""
  match = _BLOCK.search(markdown)
  if match is None:
    raise WorkdirError(f"{where} has no generated block: a line {BLOCK_BEGIN!r} and, below it, "
                       f"a line {BLOCK_END!r} mark where the tables go")
  return match


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_table_arguments(parser)
  parser.add_argument("--write", metavar="PATH",
                      help="also put the tables between the markers of this markdown file")
  args = parser.parse_args(argv)
  progress = Progress("print")
  try:
    if args.write:  # a file without markers fails before anything is counted
      with open(args.write) as handle:
        document = handle.read()
      block = find_generated_block(document, args.write)
    announce(args.tables, not args.no_flops, progress)
    markdown = format_tables(args.tables, with_flops=not args.no_flops, progress=progress)
    if args.write:
      with open(args.write, "w") as handle:
        handle.write(f"{document[:block.start()]}{BLOCK_BEGIN}\n{markdown.strip()}\n"
                     f"{BLOCK_END}{document[block.end():]}")
  except (AAFlaxError, OSError) as error:
    exit_with_error(error)
  print(markdown)


if __name__ == "__main__":
  main()
