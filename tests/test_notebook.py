"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (shortened training)."""

import os

import pytest

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
  assert any("AA-ResNet-50: ours 25.782M parameters, paper 25.8M [likely]" in o for o in outputs)
  assert any("after 15 steps" in o for o in outputs)
  training = next(o for o in outputs if "after 15 steps" in o)
  assert "Compiling the train step" in training and "15/15" in training  # lines and a bar
  assert any("each row sums to 1.0000" in o for o in outputs)
  figures = [out for cell in code_cells for out in cell.outputs
             if "image/png" in out.get("data", {})]
  assert len(figures) == 1  # the attention maps
