"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (shortened training);
its install cell, as Colab runs it, with pip recorded instead of run."""

import os
import re
import subprocess
import sys
import tomllib
import types

import pytest

from aa_flax import tables
from train_helpers import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.long_running
def test_quickstart_notebook_executes(monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), \
      "commit the notebook with its outputs stripped"
  # The kernel inherits this environment: a short training run and fast compiles.
  monkeypatch.setenv("AA_QUICKSTART_STEPS", "15")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT),
                                                    os.environ.get("PYTHONPATH", "")]))
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError naming the failing cell

  def text(cell):
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")

  outputs = [text(cell) for cell in code_cells]
  # Our parameter counts of Table 3's ResNet-50 and AA-ResNet-50 beside the paper's.
  found = re.findall(r"^(\S+): ours ([0-9.]+)M parameters, paper ([0-9.]+)M",
                     "".join(outputs), re.M)
  counts = {label: (float(ours), float(paper)) for label, ours, paper in found}
  rows = [row for row in tables.table_rows(3) if row.model in ("resnet50", "aa_resnet50")]
  assert counts == {row.label: (round(tables.model_params(row) / 1e6, 3), row.params_m)
                    for row in rows}
  assert any("after 15 steps" in o for o in outputs)
  training = next(o for o in outputs if "after 15 steps" in o)
  assert "Compiling the train step" in training and "15/15" in training  # lines and a bar
  # One form at a time: nothing but renders of the bar while the training bar is open.
  segments = [s for s in re.split(r"[\r\n]", training) if s.strip()]
  renders = [i for i, s in enumerate(segments) if s.startswith("train:")]
  assert all(s.startswith("train:") for s in segments[renders[0]:renders[-1] + 1]), segments
  assert any("each row sums to 1.0000" in o for o in outputs)
  figures = [out for cell in code_cells for out in cell.outputs
             if "image/png" in out.get("data", {})]
  assert len(figures) == 1  # the attention maps


def _install_cell(repo_url: str | None = None) -> str:
  """The source of the notebook's install cell, with ``REPO_URL`` set to ``repo_url``."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c.source for c in notebook.cells if c.cell_type == "code" and "REPO_URL" in c.source)
  if repo_url is None:
    return cell
  return re.sub(r'^REPO_URL = ".*?"', f"REPO_URL = {repo_url!r}", cell, count=1, flags=re.M)


def test_install_cell_defaults_to_the_repository_url_of_the_package_metadata():
  urls = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"].get("urls", {})
  default = re.search(r'^REPO_URL = "(.*?)"', _install_cell(), re.M).group(1)
  assert default == urls.get("Repository", "")


def _run_in_colab(monkeypatch, source: str) -> list[list[str]]:
  """Executes ``source`` as in Colab, with ``subprocess.run`` recorded instead of run."""
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(list(args)))
  exec(compile(source, "install cell", "exec"), {"__name__": "__main__"})
  return calls


def test_install_cell_in_colab_without_a_url_says_what_to_set(monkeypatch):
  if re.search(r'^REPO_URL = ""', _install_cell(), re.M) is None:
    pytest.skip("the notebook has a repository URL")
  with pytest.raises(ValueError, match=r"^Set REPO_URL at the top of this cell to the git URL "
                                       r"of the aa_flax repository \(or your fork\), then run "
                                       r"the cell again\.$"):
    _run_in_colab(monkeypatch, _install_cell())


def test_install_cell_in_colab_pip_installs_the_repository_keeping_the_runtime_jax(
    monkeypatch, capsys):
  url = "https://example.org/someone/aa_flax"
  calls = _run_in_colab(monkeypatch, _install_cell(url))
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"git+{url}"]]
  import aa_flax
  assert f"aa_flax {aa_flax.__version__} from" in capsys.readouterr().out
