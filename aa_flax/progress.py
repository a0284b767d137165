"""Progress a person can see: what the run is doing from its first seconds, training steps
between log lines, and evaluation with a count.

The outputs (``train_and_evaluate(..., progress=...)``):

* ``"log"``: absl ``logging.info`` lines (what ``train.py`` uses).
* ``"print"``: the same lines on stderr, for scripts that never set up logging.
* ``"bar"``: ``tqdm`` progress bars for training and evaluation (notebooks), one form at a
  time: a line while the training bar is open becomes the bar's status text (the newest one
  stays on the finished bar), other lines print as in ``"print"``.
* ``"auto"``: ``"bar"`` inside a Jupyter/Colab kernel, else ``"print"``.
* ``"none"``: nothing (warnings and errors still go to logging).

In the line modes, a heartbeat line (step, img/s, ETA; during evaluation, examples done)
appears whenever ``interval_s`` seconds passed without a line, e.g. between the metric lines
written every ``log_every_steps``. It reads only host-side counters and the clock, so it never
waits for the device (steps are dispatched asynchronously, so it runs a few steps ahead of
the device at most).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from absl import logging

MODES = ("auto", "log", "print", "bar", "none")


def _in_notebook() -> bool:
  """Whether this runs in a Jupyter or Colab kernel (not a terminal IPython)."""
  ipython_module = sys.modules.get("IPython")
  ipython = ipython_module.get_ipython() if ipython_module else None
  if ipython is None:
    return False
  return "IPKernelApp" in getattr(ipython, "config", {}) or \
      type(ipython).__module__.startswith("google.colab")


def hms(seconds: float) -> str:
  """``seconds`` as ``HH:MM:SS`` (an ETA)."""
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


def _tqdm():
  """tqdm's notebook widget where ipywidgets is installed, its text bar elsewhere."""
  try:
    import ipywidgets  # noqa: F401  (tqdm.auto warns without it)
    from tqdm.auto import tqdm
  except ImportError:
    from tqdm import tqdm
  return tqdm


class Progress:
  """Reports phases, training steps and evaluation progress (see the module docstring)."""

  BAR_REFRESH_S = 0.5

  def __init__(self, mode: str = "auto", *, interval_s: float = 15.0,
               clock: Callable[[], float] = time.monotonic):
    if mode not in MODES:
      raise ValueError(f"progress={mode!r} is not one of {MODES}")
    if mode == "auto":
      mode = "bar" if _in_notebook() else "print"
    self.mode = mode
    self.interval_s = interval_s
    self._clock = clock
    self._last_line = clock()
    self._train_bar = None
    self._last_bar = float("-inf")
    self._rate_start: tuple[float, int] | None = None

  def line(self, message: str, *args) -> None:
    """Shows one line now (printf-style ``args`` as in logging)."""
    self._last_line = self._clock()
    if self.mode == "log":
      logging.info(message, *args, stacklevel=2)
    elif self.mode in ("print", "bar"):
      text = message % args if args else message
      if self._train_bar is not None:
        self._train_bar.set_postfix_str(text)
      else:
        print(text, file=sys.stderr, flush=True)

  def start_training(self, step: int, total_steps: int) -> None:
    """Training runs from ``step`` to ``total_steps``; the step rate counts from the next
    ``reset_rate`` (call it once compilation is over)."""
    if self.mode == "bar":
      self._train_bar = _tqdm()(total=total_steps, initial=step, desc="train", unit="step",
                             dynamic_ncols=True)

  def reset_rate(self, step: int) -> None:
    """Measures img/s and the ETA from now on (e.g. after the first, compiling, step)."""
    self._rate_start = (self._clock(), step)

  def rate(self, step: int) -> float:
    """Steps per second since ``reset_rate``, 0 before it."""
    if self._rate_start is None:
      return 0.0
    elapsed = self._clock() - self._rate_start[0]
    steps = step - self._rate_start[1]
    return steps / elapsed if elapsed > 0 and steps > 0 else 0.0

  def eta(self, step: int, total_steps: int) -> str:
    rate = self.rate(step)
    if not rate:
      return "--:--:--"
    return hms((total_steps - step) / rate)

  def train_step(self, step: int, total_steps: int, batch_size: int,
                 completed: Callable[[], int] | None = None) -> None:
    """Called after every step is dispatched: advances the bar (at most every
    ``BAR_REFRESH_S``) and writes a heartbeat line when one is due. Both report
    ``completed()``, the newest step the device has finished (asked only then; default
    ``step``), since dispatch runs ahead of the device."""
    now = self._clock()
    if self._train_bar is not None and now - self._last_bar >= self.BAR_REFRESH_S:
      self._last_bar = now
      done = completed() if completed else step
      self._train_bar.update(done - self._train_bar.n)
    if self.mode not in ("log", "print") or now - self._last_line < self.interval_s:
      return
    done = completed() if completed else step
    self.line("step %d/%d: %.0f img/s, ETA %s", done, total_steps,
              self.rate(done) * batch_size, self.eta(done, total_steps))

  def end_training(self, step: int) -> None:
    """Training finished at ``step`` (all steps done): completes and closes the bar."""
    if self._train_bar is not None:
      self._train_bar.update(step - self._train_bar.n)
      self._train_bar.close()
      self._train_bar = None

  def eval_batches(self, batches, num_examples: int, examples_per_batch: int):
    """Yields ``batches`` while showing how many of ``num_examples`` were evaluated."""
    bar = None
    if self.mode == "bar":
      bar = _tqdm()(total=num_examples, desc="eval", unit="img", leave=False, dynamic_ncols=True)
    done = 0
    try:
      for batch in batches:
        yield batch
        done = min(done + examples_per_batch, num_examples)
        if bar is not None:
          bar.update(done - bar.n)
        if self.mode in ("log", "print") and self._clock() - self._last_line >= self.interval_s:
          self.line("eval: %d/%d examples", done, num_examples)
    finally:
      if bar is not None:
        bar.close()
