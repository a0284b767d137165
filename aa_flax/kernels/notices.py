"""One log line per distinct attention path notice per process ("say what runs").

An attention path that runs something other than what its name promises (Pallas interpret mode
on CPU, cuDNN's XLA fallback) calls :func:`say_once` at trace time; a model traces its layers
many times (init, train step, eval step), so each distinct message is logged only the first
time. ``say_once.cache_clear()`` forgets what was said (tests).
"""

from __future__ import annotations

import functools

from absl import logging


@functools.lru_cache(maxsize=None)
def say_once(message: str) -> None:
  """Logs ``message`` as a warning the first time it is passed in this process."""
  logging.warning("%s", message)
