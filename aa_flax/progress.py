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

In the line modes, a heartbeat line (step, img/s, ETA; during evaluation, examples done;
otherwise how long since the last line and what it said) appears whenever ``interval_s``
seconds passed without a line, e.g. between the metric lines written every
``log_every_steps``. Inside ``with progress.heartbeat():`` a background thread writes it, so
the promise holds while the caller is blocked (a slow step, input batch, evaluation batch,
compilation or checkpoint wait); elsewhere it is written when ``train_step`` or an eval batch
finds it due. It reads only host-side counters and the clock, so it never waits for the device
(steps are dispatched asynchronously, so it runs a few steps ahead of the device at most).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator

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
    self._last_news = (self._last_line, "")  # time and text of the last line not a heartbeat
    self._train_bar = None
    self._last_bar = float("-inf")
    self._rate_start: tuple[float, int] | None = None
    # What the heartbeat reports: the training position and the evaluation count.
    self._training: tuple[int, int, int, Callable[[], int] | None] | None = None
    self._evaluated: tuple[int, int] | None = None
    self._lock = threading.RLock()  # one line at a time, also from the heartbeat thread

  def line(self, message: str, *args) -> None:
    """Shows one line now (printf-style ``args`` as in logging)."""
    with self._lock:
      self._write(message, *args)
      self._last_news = (self._last_line, message % args if args else message)

  def _write(self, message: str, *args) -> None:
    """Writes a line (news or heartbeat) and restarts the heartbeat interval."""
    with self._lock:
      self._last_line = self._clock()
      text = message % args if args else message
      if self.mode == "log":
        logging.info(message, *args, stacklevel=3)
      elif self.mode in ("print", "bar"):
        if self._train_bar is not None:
          self._train_bar.set_postfix_str(text)  # in the bar, never between its renders
        else:
          print(text, file=sys.stderr, flush=True)

  def _heartbeat_due(self) -> bool:
    return self.mode in ("log", "print") and \
        self._clock() - self._last_line >= self.interval_s

  def _beat(self) -> None:
    """Writes the heartbeat line if one is due: the evaluation count, the training step, or
    (during anything else, e.g. compiling) how long since the last line and what it said."""
    with self._lock:
      if not self._heartbeat_due():
        return
      if self._evaluated is not None:
        self._write("eval: %d/%d examples", *self._evaluated)
      elif self._training is not None:
        step, total_steps, batch_size, completed = self._training
        done = completed() if completed else step
        self._write("step %d/%d: %.0f img/s, ETA %s", done, total_steps,
                    self.rate(done) * batch_size, self.eta(done, total_steps))
      else:
        since, text = self._last_news
        self._write("still working, %.0f s since: %s", self._clock() - since, text)

  @contextlib.contextmanager
  def heartbeat(self) -> Iterator[None]:
    """While inside, a background thread writes the heartbeat line when it is due (checked
    every ``min(1, interval_s / 4)`` s), also while the caller is blocked. Line modes with
    ``interval_s > 0`` only; elsewhere it does nothing."""
    if self.mode not in ("log", "print") or self.interval_s <= 0:
      yield
      return
    stop = threading.Event()

    def run() -> None:
      while not stop.wait(min(1.0, self.interval_s / 4)):
        self._beat()

    thread = threading.Thread(target=run, name="progress-heartbeat", daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()

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
    self._training = (step, total_steps, batch_size, completed)
    if self._train_bar is not None and now - self._last_bar >= self.BAR_REFRESH_S:
      self._last_bar = now
      done = completed() if completed else step
      self._train_bar.update(done - self._train_bar.n)
    self._beat()

  def end_training(self, step: int) -> None:
    """Training finished at ``step`` (all steps done): completes and closes the bar."""
    self._training = None
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
    self._evaluated = (done, num_examples)
    try:
      for batch in batches:
        yield batch
        done = min(done + examples_per_batch, num_examples)
        self._evaluated = (done, num_examples)
        if bar is not None:
          bar.update(done - bar.n)
        self._beat()
    finally:
      self._evaluated = None
      if bar is not None:
        bar.close()
