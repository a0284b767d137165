"""Every Python snippet in README.md runs as written (in a fresh interpreter, from the
repository root, on CPU)."""

import re
import subprocess
import sys

import pytest

from train_helpers import REPO_ROOT

_RUNNER = """
import sys, time
snippets = {snippets!r}
for number, code in enumerate(snippets, 1):
  start = time.perf_counter()
  try:
    exec(compile(code, f"README.md python snippet {{number}}", "exec"), {{"__name__": "__main__"}})
  except Exception:
    print(f"README python snippet {{number}} failed:\\n{{code}}", file=sys.stderr)
    raise
  print(f"snippet {{number}}: {{time.perf_counter() - start:.1f}} s")
"""


def readme_python_snippets() -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(),
                    re.MULTILINE | re.DOTALL)


@pytest.mark.long_running
def test_readme_python_snippets_run_as_written(tmp_path):
  snippets = readme_python_snippets()
  assert len(snippets) >= 3
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
         "TMPDIR": str(tmp_path), "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
         "PYTHONPATH": str(REPO_ROOT)}
  run = subprocess.run([sys.executable, "-c", _RUNNER.format(snippets=snippets)], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-5000:]
  assert run.stdout.count("snippet ") == len(snippets), run.stdout
