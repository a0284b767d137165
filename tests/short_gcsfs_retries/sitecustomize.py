"""Shortens gcsfs's own retry waits in a test's ``train.py`` subprocess.

gcsfs retries a failing request itself (6 tries, waits of about 1, 2, 4, 8, 16 s) before it
raises, so an outage the run's own retries must see would have to last over 30 s. With this
directory on ``PYTHONPATH`` and ``AA_FLAX_TEST_GCSFS_RETRY_SCALE`` set (e.g. ``0.05``), each
of those waits is multiplied by that factor; without the variable nothing is imported.
"""

import os

_SCALE = os.environ.get("AA_FLAX_TEST_GCSFS_RETRY_SCALE")
if _SCALE:
  import asyncio
  import types

  import gcsfs.retry

  def _scaled_sleep(delay, *args, **kwargs):
    return asyncio.sleep(delay * float(_SCALE), *args, **kwargs)

  # gcsfs.retry uses its module's name ``asyncio`` only for the wait between tries.
  gcsfs.retry.asyncio = types.SimpleNamespace(sleep=_scaled_sleep)
