"""The package as pip installs it: the wheel (and an editable install) in a fresh virtual
environment trains from another directory with the console command and a bare config name.

The fresh environments get aa_flax only; its dependencies come from this interpreter's
site-packages through a ``.pth`` file (installing them from PyPI would take minutes). That
folder is not the repository, so aa_flax can only come from what was installed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from train_helpers import REPO_ROOT, TRAIN_PY_FLAGS

VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
PROBE = """
import json, os, sys
import aa_flax
from aa_flax import report, tables
from aa_flax.config_utils import load_config
rows = [row for row in tables.PAPER_ROWS if tables.is_implemented(row)]
print(json.dumps({"file": os.path.realpath(aa_flax.__file__), "version": aa_flax.__version__,
                  "path": [os.path.realpath(entry) for entry in sys.path],
                  "cifar": load_config("cifar.py:aa_wrn28_10").model.name,
                  "report rows": all(report.row_config(row).model.name == row.model
                                     for row in rows)}))
"""


def _source_copy(folder: Path) -> Path:
  """What the wheel is built from, copied so that the build leaves the checkout untouched."""
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  for name in ("aa_flax", "configs"):
    shutil.copytree(REPO_ROOT / name, folder / name, ignore=ignore)
  for name in ("pyproject.toml", "requirements.txt", "requirements-test.txt"):
    shutil.copy(REPO_ROOT / name, folder / name)
  return folder


def _pip(*args, cwd=None) -> None:
  run = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _fresh_venv(folder: Path) -> Path:
  """A virtual environment without aa_flax that sees this interpreter's dependencies; its
  python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True,
                 timeout=120)
  python = folder / "bin" / "python"
  purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                            "print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                           text=True, check=True).stdout.strip()
  dependencies = Path(sysconfig.get_paths()["purelib"])
  assert dependencies.resolve() != REPO_ROOT.resolve() and not (dependencies / "aa_flax").exists()
  Path(purelib, "dependencies.pth").write_text(f"{dependencies}\n")
  return python


def _env() -> dict[str, str]:
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return env


def _probe(python: Path, cwd: Path) -> dict:
  run = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, cwd=cwd,
                       env=_env(), timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout)


@pytest.mark.long_running
def test_wheel_in_a_fresh_venv_trains_with_the_console_command_and_a_bare_config(tmp_path):
  source = _source_copy(tmp_path / "source")
  _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
       str(source))
  [wheel] = (tmp_path / "dist").glob("aa_flax-*.whl")
  # pyproject.toml lists the packages: every one of the checkout must be in the wheel.
  modules = {str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "aa_flax").rglob("*.py")
             if "__pycache__" not in path.parts}
  configs = {f"aa_flax/configs/{path.name}" for path in (REPO_ROOT / "configs").glob("*.py")}
  assert modules | configs <= set(zipfile.ZipFile(wheel).namelist())
  python = _fresh_venv(tmp_path / "venv")
  _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()

  found = _probe(python, elsewhere)
  assert Path(found["file"]).is_relative_to((tmp_path / "venv").resolve())
  # Only the new venv has aa_flax: the checkout and the copy built from are not on the path.
  assert not {str(REPO_ROOT.resolve()), str(source.resolve())} & set(found["path"])
  assert [entry for entry in found["path"] if Path(entry, "aa_flax").exists()] == \
      [str(Path(found["file"]).parents[1])]
  assert found["version"] == VERSION and found["cifar"] == "aa_wrn28_10" and found["report rows"]

  run = subprocess.run([str(tmp_path / "venv" / "bin" / "aa-flax-train"), "--workdir=run",
                        "--config=default.py", *TRAIN_PY_FLAGS], capture_output=True,
                       text=True, cwd=elsewhere, env=_env(), timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Training aa_resnet_tiny on digits" in run.stderr
  results = json.loads((elsewhere / "run" / "eval_results.json").read_text())
  assert results["step"] == 12


@pytest.mark.long_running
def test_editable_install_finds_the_shipped_configs_from_another_directory(tmp_path):
  source = _source_copy(tmp_path / "source")
  python = _fresh_venv(tmp_path / "venv")
  _pip("--python", str(python), "install", "--no-deps", "--no-build-isolation", "-q", "-e",
       str(source))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  found = _probe(python, elsewhere)
  assert Path(found["file"]).is_relative_to((source / "aa_flax").resolve())
  assert found["version"] == VERSION and found["cifar"] == "aa_wrn28_10" and found["report rows"]


def test_every_console_command_the_readme_names_is_installed():
  scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  named = set(re.findall(r"\b(aa-flax-[a-z-]+)", (REPO_ROOT / "README.md").read_text()))
  assert named and named <= set(scripts), (named, scripts)
  assert scripts["aa-flax-train"] == "aa_flax.cli:run"
