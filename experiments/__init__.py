"""Experiments: runs that answer a question and write their evidence under ``docs/`` (benchmarks,
which only time and measure, live in ``benchmarks/``)."""
