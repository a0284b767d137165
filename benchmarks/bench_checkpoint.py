"""What the checkpoint digest costs: save and restore of a ResNet-50-sized train state with
and without it, through ``aa_flax.checkpoint.Checkpointer``.

The state has ResNet-50's parameter and BatchNorm shapes (25.6M parameters, random values)
plus one momentum buffer per parameter, f32: ~196 MiB. "save" is ``save`` until the step is
committed (``wait``); the digest is computed between the last write and the commit. "restore"
is ``restore_latest``, which hashes every file before reading it. The hashing alone
(``write_digest``, ``verify_digest`` on the saved step) is timed too. Median of ``--reps``.

Example (any workdir, also ``gs://bucket/dir``):
  python -m benchmarks.bench_checkpoint --reps 3
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from aa_flax import integrity, storage
from aa_flax.checkpoint import Checkpointer
from aa_flax.models import create_model
from benchmarks import common

COLUMNS = ("operation", "digest", "seconds", "state_mib", "mib_per_s")


class _NoDigestCheckpointer(Checkpointer):
  """The same saves and restores without writing or checking digests."""

  def _write_digest(self) -> None:
    pass

  def _verify(self, step_dir) -> None:
    pass


def resnet50_state(seed: int = 0) -> dict:
  """``{'params', 'batch_stats', 'momentum'}`` with ResNet-50's shapes, random f32 values."""
  model = create_model("resnet50", 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32))

  params = jax.tree.map(fill, shapes["params"])
  return {"params": params, "batch_stats": jax.tree.map(fill, shapes["batch_stats"]),
          "momentum": jax.tree.map(fill, shapes["params"])}


def _median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run(workdir: str, reps: int, state=None) -> list[dict]:
  state = state if state is not None else resnet50_state()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  state_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / common.MIB
  rows = []
  for digest, checkpointer_class in ((False, _NoDigestCheckpointer), (True, Checkpointer)):
    root = storage.path(workdir) / f"digest_{digest}"
    checkpointer = checkpointer_class(root, max_to_keep=reps + 1)
    steps = iter(range(1, 10 * reps + 10))

    def save(checkpointer=checkpointer, steps=steps):
      checkpointer.save(next(steps), state, {}, {})
      checkpointer.wait()

    save()  # warm-up: directories, handlers
    rows.append({"operation": "save", "digest": digest,
                 "seconds": _median_time(save, reps)})
    rows.append({"operation": "restore", "digest": digest, "seconds": _median_time(
        lambda checkpointer=checkpointer: jax.block_until_ready(
            checkpointer.restore_latest(abstract).state), reps)})
    if digest:
      step_dir = checkpointer.step_path(checkpointer.latest_step())
      rows.append({"operation": "write_digest only", "digest": True,
                   "seconds": _median_time(lambda: integrity.write_digest(step_dir), reps)})
      rows.append({"operation": "verify_digest only", "digest": True,
                   "seconds": _median_time(lambda: integrity.verify_digest(step_dir), reps)})
    checkpointer.close()
  for row in rows:
    row.update(state_mib=state_mib, mib_per_s=state_mib / row["seconds"])
  return rows


def main(argv=None):
  parser = common.argument_parser(__doc__, "checkpoint_digest")
  parser.add_argument("--workdir", default=None,
                      help="where to write the checkpoints (default: a temporary directory)")
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as scratch:
    rows = run(args.workdir or scratch, args.reps)
  common.save_results(args.name, rows, COLUMNS, common.environment(), args.out_dir)


if __name__ == "__main__":
  main()
