"""Progress reporting: heartbeat timing, rates, eval counts, modes (no training here)."""

import logging
import re
import sys
import time
import types

import pytest

from aa_flax.progress import Progress


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _lines(capsys):
  return [line for line in capsys.readouterr().err.splitlines() if line]


def test_heartbeat_only_after_the_interval_without_a_line(capsys):
  clock = _Clock()
  progress = Progress("print", interval_s=15, clock=clock)
  progress.start_training(0, 100)
  progress.reset_rate(1)  # step 1 (compilation) done at t=100
  clock.now = 110
  progress.train_step(11, 100, batch_size=8)  # 10 s: too early
  assert _lines(capsys) == []
  clock.now = 120
  progress.train_step(21, 100, batch_size=8)  # 20 steps in 20 s = 8 img/s, 79 steps left
  assert _lines(capsys) == ["step 21/100: 8 img/s, ETA 00:01:19"]
  clock.now = 130
  progress.line("a metric line")  # any line restarts the interval
  clock.now = 140
  progress.train_step(41, 100, batch_size=8)
  assert _lines(capsys) == ["a metric line"]
  clock.now = 145.5
  progress.train_step(46, 100, batch_size=8)
  assert _lines(capsys) == ["step 46/100: 8 img/s, ETA 00:00:54"]


def test_heartbeat_reports_the_completed_step_not_the_dispatched_one(capsys):
  clock = _Clock()
  progress = Progress("print", interval_s=15, clock=clock)
  progress.reset_rate(1)
  asked = []

  def completed():
    asked.append(clock.now)
    return 11

  progress.train_step(30, 100, batch_size=4, completed=completed)  # not due: not asked
  clock.now = 120
  progress.train_step(31, 100, batch_size=4, completed=completed)  # 10 steps done in 20 s
  assert asked == [120]
  assert _lines(capsys) == ["step 11/100: 2 img/s, ETA 00:02:58"]


def test_rate_is_unknown_before_the_first_measured_step(capsys):
  clock = _Clock()
  progress = Progress("print", interval_s=0, clock=clock)
  progress.train_step(1, 10, batch_size=4)
  assert _lines(capsys) == ["step 1/10: 0 img/s, ETA --:--:--"]


def test_eval_counts_examples_and_caps_at_the_total(capsys):
  clock = _Clock()
  progress = Progress("print", interval_s=5, clock=clock)
  seen = []
  for batch in progress.eval_batches(iter(range(4)), num_examples=10, examples_per_batch=3):
    seen.append(batch)
    clock.now += 3  # a line is due after every second batch
  assert seen == [0, 1, 2, 3]
  assert _lines(capsys) == ["eval: 6/10 examples", "eval: 10/10 examples"]


def test_log_mode_writes_absl_info_and_none_writes_nothing(capsys, caplog):
  with caplog.at_level(logging.INFO, logger="absl"):
    Progress("log").line("step %d of %s", 3, "x")
    Progress("none", interval_s=0).line("hidden")
    Progress("none", interval_s=0).train_step(5, 10, 2)
  assert [r.getMessage() for r in caplog.records] == ["step 3 of x"]
  assert _lines(capsys) == []


def test_bar_mode_advances_a_bar_and_keeps_lines(capsys):
  clock = _Clock()
  progress = Progress("bar", interval_s=0, clock=clock)
  progress.start_training(2, 6)
  progress.train_step(3, 6, batch_size=1)
  assert progress._train_bar.n == 3
  progress.train_step(4, 6, batch_size=1)  # within BAR_REFRESH_S: the bar waits
  assert progress._train_bar.n == 3
  clock.now += 1
  progress.train_step(5, 6, batch_size=1, completed=lambda: 4)  # the device is at step 4
  assert progress._train_bar.n == 4
  progress.line("eval line")
  progress.end_training(6)
  list(progress.eval_batches(iter([1, 2]), num_examples=4, examples_per_batch=2))
  err = capsys.readouterr().err
  assert "eval line" in err and "6/6" in err and "step 5/6:" not in err  # bars, no heartbeats


def test_bar_mode_shows_lines_in_the_open_bar_never_between_its_renders(capsys):
  """One form at a time: a line while the training bar is open becomes the bar's status
  text; before and after the bar it is a line of its own."""
  clock = _Clock()
  progress = Progress("bar", interval_s=0, clock=clock)
  progress.line("Model x: 4 steps")
  progress.start_training(0, 4)
  progress.line("Compiling the train step...")
  clock.now += 1
  progress.train_step(1, 4, batch_size=1)
  progress.line("step %d/%d loss %.1f", 4, 4, 0.5)
  progress.end_training(4)
  progress.line("Evaluating at step 4")
  segments = [s for s in re.split(r"[\r\n]", capsys.readouterr().err) if s.strip()]
  assert segments[0] == "Model x: 4 steps" and segments[-1] == "Evaluating at step 4"
  bar = segments[1:-1]
  assert bar and all(s.startswith("train:") for s in bar), segments
  assert any("Compiling the train step..." in s for s in bar)
  assert "4/4" in bar[-1] and "step 4/4 loss 0.5" in bar[-1]


def test_auto_is_bar_in_a_notebook_kernel_and_print_elsewhere(monkeypatch):
  assert Progress("auto").mode == "print"
  for config, mode in (({"IPKernelApp": {}}, "bar"), ({}, "print")):  # Jupyter, terminal
    shell = types.SimpleNamespace(config=config)
    monkeypatch.setitem(sys.modules, "IPython",
                        types.SimpleNamespace(get_ipython=lambda shell=shell: shell))
    assert Progress("auto").mode == mode


def test_bad_modes_are_named():
  with pytest.raises(ValueError, match=r"progress='bars' is not one of \('auto', 'log'"):
    Progress("bars")


def test_heartbeat_thread_writes_while_a_step_blocks(capsys):
  """The heartbeat promise holds during a step slower than the interval: no call into the
  progress object happens while it runs, yet lines appear."""
  progress = Progress("print", interval_s=0.2)
  with progress.heartbeat():
    progress.line("Compiling the train step...")
    time.sleep(0.7)  # compiling: no step yet
    compiling = _lines(capsys)
    progress.start_training(0, 10)
    progress.reset_rate(0)
    progress.train_step(1, 10, batch_size=4)
    capsys.readouterr()
    time.sleep(0.7)  # a slow step
    stepping = _lines(capsys)
  assert compiling[0] == "Compiling the train step..."
  assert len(compiling) >= 2 and all(
      re.fullmatch(r"still working, \d+ s since: Compiling the train step\.\.\.", line)
      for line in compiling[1:]), compiling
  assert stepping and all(re.fullmatch(r"step 1/10: \d+ img/s, ETA [-:0-9]{8}", line)
                          for line in stepping), stepping
  time.sleep(0.5)
  assert _lines(capsys) == []  # the thread ends with the block


def test_heartbeat_thread_counts_a_slow_eval_batch(capsys):
  def slow_batches():
    yield 1
    time.sleep(0.7)  # the second batch takes long to arrive
    yield 2

  progress = Progress("print", interval_s=0.2)
  with progress.heartbeat():
    assert list(progress.eval_batches(slow_batches(), num_examples=4, examples_per_batch=2)) \
        == [1, 2]
  lines = _lines(capsys)
  assert "eval: 2/4 examples" in lines and set(lines) <= {"eval: 2/4 examples",
                                                          "eval: 4/4 examples"}


def test_no_heartbeat_thread_without_an_interval_or_in_quiet_modes(capsys):
  for progress in (Progress("print", interval_s=0), Progress("none", interval_s=0.1)):
    with progress.heartbeat():
      time.sleep(0.3)
  assert _lines(capsys) == []


def test_a_training_run_never_stays_silent_longer_than_the_interval(tmp_path):
  """Compiling, steps, evaluation and checkpoint waits of a real run: the longest gap
  between two log lines stays near the interval (checked every interval / 4)."""
  from aa_flax.trainer import train_and_evaluate
  from train_helpers import tiny_config

  class Times(logging.Handler):
    def __init__(self):
      super().__init__()
      self.times = []

    def emit(self, record):
      self.times.append(record.created)

  interval, handler, absl_logger = 0.5, Times(), logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging.INFO)
  try:
    train_and_evaluate(tiny_config(num_train_steps=3, optimizer__warmup_epochs=0),
                       str(tmp_path), progress=Progress("log", interval_s=interval))
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)
  gaps = [b - a for a, b in zip(handler.times, handler.times[1:])]
  assert len(handler.times) > 5 and max(gaps) < interval + 1.0, gaps
