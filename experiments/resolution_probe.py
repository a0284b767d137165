"""Which table conversion keeps what relative attention learned: a task only the tables solve.

A scene is ``S x S`` with two marked pixels, A (channel 0) and B (channel 1); the class is the
horizontal offset ``dx = x_B - x_A`` in four bins (``dx <= -4``, ``-3..-1``, ``1..3``,
``>= 4``). The probe is one fully attentional AAConv (1x1 projections only, relative
encodings, no convolution) whose output at A's pixels feeds a small MLP, so the offset can
only be read through the relative tables. Trained at ``S`` px, it is evaluated on new scenes
rendered two ways at each larger size ``N``:

* ``resized``: the scene scaled to ``N x N`` (nearest neighbour): offsets in pixels grow by
  ``N / S``, the class does not (FixRes-style evaluation at a higher resolution);
* ``canvas``: the scene pasted in the middle of an empty ``N x N`` canvas: offsets in pixels
  are unchanged (detection-style: a larger view at the same object scale);

with the tables converted by each ``aa_flax.resolution`` method and re-initialised.
Needs only jax, flax, optax and numpy; accuracy does not depend on machine load.

Example (the table in docs/RESOLUTION.md):
  python -m experiments.resolution_probe
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aa_flax import resolution
from aa_flax.layers import AAConv
from benchmarks import common

COLUMNS = ("input", "size", "scale", "tables", "top1")
BIN_EDGES = (-3, 0, 4)  # dx <= -4 | -3..-1 | 1..3 | >= 4


class RelativeProbe(nn.Module):
  """``scenes [B, H, W, 2] -> logits [B, 4]``: relative attention read out at A's pixels."""
  features: int = 32
  num_heads: int = 8

  @nn.compact
  def __call__(self, scenes: jax.Array) -> jax.Array:
    out = AAConv(self.features, kernel_size=1, key_ratio=1.0, value_ratio=1.0,
                 num_heads=self.num_heads, min_key_depth_per_head=0, name="attention")(scenes)
    at_a = scenes[..., :1]
    pooled = jnp.sum(out * at_a, axis=(1, 2)) / jnp.sum(at_a, axis=(1, 2))
    return nn.Dense(len(BIN_EDGES) + 1)(nn.relu(nn.Dense(64)(pooled)))


def make_scenes(rng: np.random.Generator, count: int, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """``count`` scenes ``float32 [count, size, size, 2]`` and their classes ``int32 [count]``."""
  ya, yb = rng.integers(0, size, (2, count))
  xa = rng.integers(0, size, count)
  dx = rng.integers(1, size, count) * rng.choice([-1, 1], count)
  keep = (xa + dx >= 0) & (xa + dx < size)
  while not keep.all():  # redraw offsets that leave the scene
    redo = ~keep
    dx[redo] = rng.integers(1, size, redo.sum()) * rng.choice([-1, 1], redo.sum())
    keep = (xa + dx >= 0) & (xa + dx < size)
  scenes = np.zeros((count, size, size, 2), np.float32)
  scenes[np.arange(count), ya, xa, 0] = 1.0
  scenes[np.arange(count), yb, xa + dx, 1] = 1.0
  return scenes, np.digitize(dx, BIN_EDGES, right=True).astype(np.int32)


def render(scenes: np.ndarray, size: int, condition: str) -> np.ndarray:
  """Scenes ``[N, S, S, 2]`` at ``size``: scaled (nearest neighbour) or pasted in the middle."""
  source = scenes.shape[1]
  if condition == "resized":
    index = np.arange(size) * source // size
    return scenes[:, index][:, :, index]
  canvas = np.zeros((len(scenes), size, size, scenes.shape[-1]), scenes.dtype)
  start = (size - source) // 2
  canvas[:, start:start + source, start:start + source] = scenes
  return canvas


def train(model, args) -> Any:
  rng = np.random.default_rng(args.seed)
  variables = model.init(jax.random.key(args.seed), jnp.zeros((1, args.scene, args.scene, 2)))
  tx = optax.adam(args.learning_rate)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, scenes, labels):
    def loss_fn(v):
      logits = model.apply(v, scenes)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(variables, updates), opt_state, loss

  for index in range(args.steps):
    scenes, labels = make_scenes(rng, args.batch, args.scene)
    variables, opt_state, loss = step(variables, opt_state, scenes, labels)
    if (index + 1) % max(1, args.steps // 5) == 0:
      print(f"step {index + 1}: loss {float(loss):.4f}", flush=True)
  return variables


def accuracy(predict, variables, scenes, labels, batch: int) -> float:
  hits = sum(int(np.sum(np.asarray(predict(variables, scenes[i:i + batch]))
                        == labels[i:i + batch])) for i in range(0, len(scenes), batch))
  return hits / len(scenes)


def run(args) -> list[dict[str, Any]]:
  model = RelativeProbe(num_heads=args.heads)
  variables = train(model, args)
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1))
  scenes, labels = make_scenes(np.random.default_rng(args.seed + 1), args.eval_scenes,
                               args.scene)
  rows = [{"input": "as trained", "size": args.scene, "scale": 1.0, "tables": "as trained",
           "top1": accuracy(predict, variables, scenes, labels, args.eval_batch)}]
  print(rows[-1], flush=True)
  for condition in ("resized", "canvas"):
    for size in args.sizes:
      inputs = render(scenes, size, condition)
      shape = (1, size, size, 2)
      variants = {method: resolution.convert_variables(model, variables, shape, method=method)
                  for method in resolution.RESAMPLE_METHODS}
      fresh = model.init(jax.random.key(args.seed + 2), jnp.zeros(shape))
      variants["re-initialised"] = jax.tree_util.tree_map_with_path(
          lambda path, leaf, new: new if path[-1].key in resolution.TABLE_NAMES else leaf,
          variants[resolution.DEFAULT_METHOD], fresh)
      for name, fitted in variants.items():
        rows.append({"input": condition, "size": size,
                     "scale": size / args.scene if condition == "resized" else 1.0,
                     "tables": name,
                     "top1": accuracy(predict, fitted, inputs, labels, args.eval_batch)})
        print(rows[-1], flush=True)
  return rows


def main(argv=None):
  parser = common.argument_parser(__doc__, "resolution_probe")
  parser.add_argument("--scene", type=int, default=12, help="training scene size S (px)")
  parser.add_argument("--sizes", type=int, nargs="+", default=[18, 24])
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--eval-scenes", type=int, default=2000)
  parser.add_argument("--eval-batch", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rows = run(args)
  extra = {key: value for key, value in vars(args).items() if key not in ("out_dir", "name")}
  common.save_results(args.name, rows, COLUMNS, common.environment(), args.out_dir, extra)
  return rows


if __name__ == "__main__":
  main()
