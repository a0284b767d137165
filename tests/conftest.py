"""Test setup, before jax is imported anywhere: 8 simulated CPU devices, one compilation
cache for the session, and the repository root importable (``benchmarks`` is a package of the
repository, not of the installed ``aa_flax``; plain ``pytest`` does not put the working
directory on the path).

The compilation cache is a folder that jax in this process and in every subprocess the tests
start (``train.py`` runs inherit the environment) reads compiled programs from: many
subprocess runs compile the same train and eval steps, and compiling is most of their time.
A cache entry is keyed by the program, its compile options and the devices, so a hit is the
program that would have been compiled. ``JAX_COMPILATION_CACHE_DIR`` set by the caller wins.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aa_flax_test_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
  """Compiles a module's programs without XLA's CPU code-generation optimisations.

  Test programs are small and run once, so compiling dominates; with those optimisations the
  random init of a 4D conv kernel alone takes seconds to compile. Fusion and buffer assignment
  stay as they are, so compiled memory figures do not change. Use it with
  ``pytestmark = pytest.mark.usefixtures("fast_compiles")``.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def pytest_collection_modifyitems(items):
  """Tests marked ``long_running`` (each tens of seconds: subprocess training runs) go first,
  the rest keep their order: with several workers (``-n 2``) the run then ends on short tests
  that either worker can take, not on a long one that started last."""
  items.sort(key=lambda item: item.get_closest_marker("long_running") is None)
