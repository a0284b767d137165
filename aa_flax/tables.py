"""Parameter and GFLOP counts of every model in the paper's tables 1, 2, 3, 4 and 6.

    python -m aa_flax.tables [--tables 1,2,3,4,6] [--no-flops]

prints, for each row, the paper's params and GFlops with their confidence mark from
PAPER.md ([sure], [likely], [unsure]) beside ours and the relative difference. GFLOPs use the
"dense" convention (padding taps counted, like the paper; see ``aa_flax.metrics``); XLA's own
cost analysis is printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

from aa_flax.metrics import count_flops, count_params
from aa_flax.models import create_model


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row: our model name and the paper's numbers (millions of params, GFlops)."""
  table: int
  label: str
  model: str
  params_m: float
  params_mark: str
  gflops: Optional[float] = None
  gflops_mark: str = ""


# Input size and classes per table: CIFAR-100 at 32 px, ImageNet at 224 px.
TABLE_INPUTS = {1: (32, 100), 2: (224, 1000), 3: (224, 1000), 4: (224, 1000), 6: (224, 1000)}

PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(1, "Wide-ResNet", "wrn28_10", 36.3, "sure", 10.4, "sure"),
    PaperRow(1, "GE-Wide-ResNet", "ge_wrn28_10", 36.3, "sure", 10.4, "sure"),
    PaperRow(1, "SE-Wide-ResNet", "se_wrn28_10", 36.5, "sure", 10.4, "sure"),
    PaperRow(1, "AA-Wide-ResNet", "aa_wrn28_10", 36.2, "sure", 10.9, "sure"),
    # Table 2: ResNet-50 with other attention modules (only top-1 of SE and AA is sure).
    PaperRow(2, "ResNet-50", "resnet50", 25.6, "unsure"),
    PaperRow(2, "SE-ResNet-50", "se_resnet50", 28.1, "unsure", 8.7, "unsure"),
    PaperRow(2, "BAM-ResNet-50", "bam_resnet50", 25.9, "unsure"),
    PaperRow(2, "CBAM-ResNet-50", "cbam_resnet50", 28.1, "unsure"),
    PaperRow(2, "GALA-ResNet-50", "gala_resnet50", 29.4, "unsure"),
    PaperRow(2, "GE-ResNet-50 (GE-θ)", "ge_resnet50", 31.1, "unsure"),
    PaperRow(2, "AA-ResNet-50", "aa_resnet50", 25.8, "unsure", 8.3, "unsure"),
    PaperRow(3, "ResNet-34", "resnet34", 21.8, "likely", 7.4, "likely"),
    PaperRow(3, "SE-ResNet-34", "se_resnet34", 22.0, "unsure", 7.4, "likely"),
    PaperRow(3, "AA-ResNet-34", "aa_resnet34", 20.7, "likely", 7.1, "likely"),
    PaperRow(3, "ResNet-50", "resnet50", 25.6, "likely", 8.2, "likely"),
    PaperRow(3, "SE-ResNet-50", "se_resnet50", 28.1, "likely", 8.2, "likely"),
    PaperRow(3, "AA-ResNet-50", "aa_resnet50", 25.8, "likely", 8.3, "likely"),
    PaperRow(3, "ResNet-101", "resnet101", 44.5, "likely", 15.6, "likely"),
    PaperRow(3, "SE-ResNet-101", "se_resnet101", 49.3, "unsure", 15.6, "unsure"),
    PaperRow(3, "AA-ResNet-101", "aa_resnet101", 45.4, "likely", 16.1, "likely"),
    PaperRow(3, "ResNet-152", "resnet152", 60.2, "unsure", 23.0, "unsure"),
    PaperRow(3, "SE-ResNet-152", "se_resnet152", 66.8, "unsure", 23.1, "unsure"),
    PaperRow(3, "AA-ResNet-152", "aa_resnet152", 61.6, "unsure", 23.8, "unsure"),
    PaperRow(4, "MnasNet-0.75", "mnasnet_0.75", 2.91, "unsure"),
    PaperRow(4, "AA-MnasNet-0.75", "aa_mnasnet_0.75", 3.02, "unsure"),
    PaperRow(4, "MnasNet-1.0", "mnasnet_1.0", 3.89, "unsure"),
    PaperRow(4, "AA-MnasNet-1.0", "aa_mnasnet_1.0", 4.06, "unsure"),
    PaperRow(4, "MnasNet-1.25", "mnasnet_1.25", 5.26, "unsure"),
    PaperRow(4, "AA-MnasNet-1.25", "aa_mnasnet_1.25", 5.53, "unsure"),
    PaperRow(4, "MnasNet-1.4", "mnasnet_1.4", 6.10, "unsure"),
    PaperRow(4, "AA-MnasNet-1.4", "aa_mnasnet_1.4", 6.44, "unsure"),
    PaperRow(6, "FA ResNet-50 κ=υ=0.25", "fa_resnet50_0.25", 24.3, "unsure", 7.9, "unsure"),
    PaperRow(6, "FA ResNet-50 κ=υ=0.5", "fa_resnet50_0.5", 22.3, "unsure", 7.3, "unsure"),
    PaperRow(6, "FA ResNet-50 κ=υ=0.75", "fa_resnet50_0.75", 20.7, "unsure", 6.8, "unsure"),
    PaperRow(6, "FA ResNet-50 κ=υ=1.0", "fa_resnet50_1.0", 19.4, "unsure", 6.3, "unsure"),
)


def model_params(row: PaperRow) -> int:
  """Our parameter count for a table row."""
  size, classes = TABLE_INPUTS[row.table]
  return count_params(create_model(row.model, classes), (1, size, size, 3))


def model_gflops(row: PaperRow, convention: str = "dense") -> float:
  """Our per-image GFLOPs for a table row."""
  size, classes = TABLE_INPUTS[row.table]
  return count_flops(create_model(row.model, classes), (1, size, size, 3), convention) / 1e9


def _relative(ours: float, paper: Optional[float]) -> str:
  return "" if paper is None else f"{100 * (ours - paper) / paper:+.2f}%"


def format_tables(tables: Sequence[int], with_flops: bool = True) -> str:
  """The comparison as markdown, one section per table."""
  lines = []
  for table in tables:
    size, classes = TABLE_INPUTS[table]
    lines += ["", f"Table {table} ({size}x{size} px, {classes} classes)", ""]
    header = "| model | name | paper params | ours | diff |"
    rule = "|---|---|---|---|---|"
    if with_flops:
      header += " paper GFlops | ours (dense) | diff | ours (XLA) |"
      rule += "---|---|---|---|"
    lines += [header, rule]
    for row in (r for r in PAPER_ROWS if r.table == table):
      params = model_params(row) / 1e6
      line = (f"| {row.label} | {row.model} | {row.params_m:.2f}M [{row.params_mark}] | "
              f"{params:.3f}M | {_relative(params, row.params_m)} |")
      if with_flops:
        dense = model_gflops(row, "dense")
        xla = model_gflops(row, "xla")
        paper = "—" if row.gflops is None else f"{row.gflops:.1f} [{row.gflops_mark}]"
        line += f" {paper} | {dense:.2f} | {_relative(dense, row.gflops)} | {xla:.2f} |"
      lines.append(line)
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tables", default="1,2,3,4,6",
                      help="comma-separated table numbers among 1, 2, 3, 4, 6")
  parser.add_argument("--no-flops", action="store_true", help="parameters only (faster)")
  args = parser.parse_args(argv)
  try:
    tables = [int(t) for t in args.tables.split(",")]
  except ValueError:
    parser.error(f"--tables must be comma-separated integers, got {args.tables!r}")
  bad = [t for t in tables if t not in TABLE_INPUTS]
  if bad:
    parser.error(f"unknown table(s) {bad}; valid: {sorted(TABLE_INPUTS)}")
  print(format_tables(tables, with_flops=not args.no_flops))


if __name__ == "__main__":
  main()
