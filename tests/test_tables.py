"""``python -m aa_flax.tables``: the shared ``--tables`` parsing, ``--write`` and the tables of
docs/TABLES.md, whose parameter columns must match the code (FLOPs are not recounted here:
they take minutes on a CPU)."""

import argparse

import pytest

from aa_flax import tables
from train_helpers import REPO_ROOT


def _parameter_columns(markdown: str) -> list[str]:
  """The lines of ``markdown`` with every table row cut to its first five cells (model, name,
  the paper's params, ours, difference)."""
  lines = []
  for line in markdown.strip().splitlines():
    if line.startswith("|"):
      line = "|" + "|".join(line.strip("|").split("|")[:5]) + "|"
    lines.append(line)
  return lines


def test_the_tables_in_the_docs_match_the_parameter_counts_of_the_code():
  documented = tables.find_generated_block((REPO_ROOT / "docs" / "TABLES.md").read_text())[1]
  counted = tables.format_tables(sorted(tables.TABLE_INPUTS), with_flops=False)
  assert _parameter_columns(documented) == _parameter_columns(counted)


def test_table_numbers_are_parsed_or_refused_naming_the_valid_ones():
  assert tables.parse_table_numbers("3,1") == [3, 1]
  with pytest.raises(argparse.ArgumentTypeError, match=r"unknown table\(s\) \[5\]; valid: "
                                                       r"\[1, 2, 3, 4, 6, 7\]"):
    tables.parse_table_numbers("1,5")
  with pytest.raises(argparse.ArgumentTypeError, match="'1;2'"):
    tables.parse_table_numbers("1;2")


def test_write_replaces_only_the_generated_block(tmp_path, capsys):
  path = tmp_path / "T.md"
  path.write_text(f"before\n{tables.BLOCK_BEGIN}\nold\n{tables.BLOCK_END}\nafter\n")
  tables.main(["--tables=1", "--no-flops", f"--write={path}"])
  printed = capsys.readouterr().out
  text = path.read_text()
  assert text.startswith(f"before\n{tables.BLOCK_BEGIN}\n") and text.endswith(
      f"\n{tables.BLOCK_END}\nafter\n")
  assert tables.find_generated_block(text)[1] == printed.strip()
  assert "| AA-Wide-ResNet | aa_wrn28_10 |" in printed and "old" not in text


def test_write_to_a_file_without_markers_fails_in_one_line_and_leaves_it(tmp_path, capsys):
  path = tmp_path / "T.md"
  path.write_text("no markers here\n")
  with pytest.raises(SystemExit) as exit_info:
    tables.main(["--tables=1", "--no-flops", f"--write={path}"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(f"error: WorkdirError: {path} has no generated block")
  assert path.read_text() == "no markers here\n"
