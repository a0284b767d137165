"""Fused attention kernels run per device, on each device's share of the batch.

XLA cannot split a Pallas kernel call over devices: it refuses Mosaic (TPU) kernels under a
jit over several devices ("Mosaic kernels cannot be automatically partitioned"), and a Triton
(GPU) custom call would be left to its partitioner. Attention is independent per example, so
:func:`per_batch_shard` wraps the call in ``jax.shard_map`` over the ``data`` axis of the mesh
in context (:func:`jax.sharding.get_abstract_mesh`; the trainer traces its steps with the
mesh in context, :func:`aa_flax.parallel.traced_on`): each device runs the kernels, forward
and backward, on its ``B / devices`` examples.

Without a mesh in context, on a mesh of one device, or inside a ``shard_map`` over the mesh
(already per device), the call runs as it is. A batch that the ``data`` axis does not divide
(e.g. one replicated image) goes whole to every device, each computing all of it.

``check_vma=False``: Pallas kernels do not declare how their outputs vary over mesh axes. The
outputs are split like the batch; gradients of the shared inputs are summed over the devices.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec

from aa_flax.parallel import DATA_AXIS


def per_batch_shard(fn: Callable, batched: tuple[jax.Array, ...], shared: tuple = ()) -> Any:
  """``fn(*batched, *shared)``, run per device over the mesh in context.

  Args:
    fn: a function of arrays whose every output has the batch as its leading axis and is
      computed per example (example ``b`` of the outputs depends on example ``b`` of
      ``batched`` only).
    batched: arrays ``[B, ...]`` with the batch leading; split over the ``data`` axis.
    shared: pytrees of arrays (or None) that every device gets whole (e.g. the relative
      tables); their gradients are summed over the devices.

  Returns:
    ``fn``'s outputs, ``[B, ...]`` each, split over ``data`` like ``batched``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # Axes not yet manual: inside a shard_map, its axes already run per device.
  sizes = {name: size for name, size in zip(mesh.axis_names, mesh.axis_sizes)
           if name not in mesh.manual_axes}
  if math.prod(sizes.values()) == 1:  # no mesh, one device, or already per device
    return fn(*batched, *shared)
  shards = sizes.get(DATA_AXIS, 1)
  divides = shards > 1 and batched[0].shape[0] % shards == 0
  spec = PartitionSpec(DATA_AXIS) if divides else PartitionSpec()
  in_specs = (spec,) * len(batched) + (PartitionSpec(),) * len(shared)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec,
                       axis_names=frozenset(sizes), check_vma=False)(*batched, *shared)
