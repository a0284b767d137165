"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere), and the
repository root importable (``benchmarks`` is a package of the repository, not of the installed
``aa_flax``; plain ``pytest`` does not put the working directory on the path)."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
