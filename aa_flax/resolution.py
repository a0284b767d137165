"""Moving trained variables to another input size.

A few variables are sized at init from the feature map, so a model's variables only fit the
input size they were made for:

* Every AAConv with relative position encodings holds ``rel_height [2H'-1, d]`` and
  ``rel_width [2W'-1, d]``, sized from the map ``H' x W'`` its attention sees (after striding
  and pooling). Row ``m`` of a table of length ``2L-1`` holds the relative offset
  ``m - (L-1)`` (key minus query). These are resampled along the offset axis,
  ``[2L-1, d] -> [2L'-1, d]``, by one of ``RESAMPLE_METHODS``:

  * ``"interpolate"`` (default): new offset ``r'`` reads the old table at ``r' * L / L'``
    (linear interpolation between the two nearest rows, clamped to the old range). Right when
    the image *content* is resized (evaluation or fine-tuning at another resolution,
    FixRes-style): the displacement between two parts of an object scales with the image.
  * ``"extend"``: offsets the old table has keep their rows exactly; offsets beyond its range
    take the row of the nearest old offset (relative distance clipped, as in Shaw et al.,
    2018); shrinking crops the ends. Right when the *canvas* changes at the same object scale
    (detection-style inputs, padding): a displacement of k pixels means what it meant.

* Gather-excite GE-θ/θ⁺ modules hold a gather kernel ``[H, W, C]``, one weight per position
  of the whole map. It is resized bilinearly and scaled by ``(H W) / (H' W')`` whatever the
  method, so a constant map gathers the same value as before.

Every other variable of the models here is independent of the input size and is kept as it is.
docs/RESOLUTION.md has the measurements behind the default.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aa_flax.errors import VariableMismatchError

RESAMPLE_METHODS = ("interpolate", "extend")
DEFAULT_METHOD = "interpolate"
TABLE_NAMES = ("rel_height", "rel_width")


def check_method(method: str) -> None:
  if method not in RESAMPLE_METHODS:
    raise ValueError(f"table resampling method {method!r} is not one of {RESAMPLE_METHODS}")


def resample_table(table: jax.Array, length: int, method: str = DEFAULT_METHOD) -> jax.Array:
  """Resamples one relative table ``[2L-1, d]`` to ``[2 * length - 1, d]`` (same dtype).

  Returns ``table`` itself when the length is unchanged. Interpolation runs in float32.
  """
  check_method(method)
  if table.ndim != 2 or table.shape[0] % 2 != 1:
    raise ValueError(f"a relative table has shape [2L-1, d], got {table.shape}")
  if not isinstance(length, int) or length < 1:
    raise ValueError(f"the new length must be a positive int, got {length!r}")
  old = (table.shape[0] + 1) // 2
  if old == length:
    return table
  table = jnp.asarray(table)
  offsets = jnp.arange(-(length - 1), length, dtype=jnp.float32)  # new offsets r'
  if method == "interpolate":
    offsets = offsets * (old / length)
  position = jnp.clip(offsets + (old - 1), 0, 2 * old - 2)  # row of the old table
  low = jnp.floor(position).astype(jnp.int32)
  if method == "extend":
    return table[low]
  high = jnp.minimum(low + 1, 2 * old - 2)
  frac = (position - low)[:, None]
  rows = table.astype(jnp.float32)
  return (rows[low] * (1 - frac) + rows[high] * frac).astype(table.dtype)


def resize_gather_kernel(kernel: jax.Array, height: int, width: int) -> jax.Array:
  """A GE-θ gather kernel ``[H, W, C]`` -> ``[height, width, C]`` (same dtype): bilinear,
  scaled by ``H W / (height width)`` so that its sum over positions is kept. Returns
  ``kernel`` itself when the size is unchanged."""
  old_h, old_w, channels = kernel.shape
  if (old_h, old_w) == (height, width):
    return kernel
  resized = jax.image.resize(jnp.asarray(kernel, jnp.float32), (height, width, channels), "linear")
  return (resized * (old_h * old_w / (height * width))).astype(kernel.dtype)


def _size_dependent_variables() -> dict[tuple[type, str], Callable[[Any, tuple, str], Any]]:
  """(module class, variable name) -> ``resample(leaf, new_shape, method)``."""
  from aa_flax.layers import AAConv
  from aa_flax.models.block_attention import GatherExcite

  def table(leaf, shape, method):
    if leaf.ndim != 2 or leaf.shape[1] != shape[1]:
      return None
    return resample_table(leaf, (shape[0] + 1) // 2, method)

  def gather_kernel(leaf, shape, method):
    del method  # a weight per position of the whole map: only resizing makes sense
    if leaf.ndim != 3 or leaf.shape[2] != shape[2]:
      return None
    return resize_gather_kernel(leaf, shape[0], shape[1])

  return {(AAConv, "rel_height"): table, (AAConv, "rel_width"): table,
          (GatherExcite, "kernel"): gather_kernel}


def abstract_variables(model, input_shape: Sequence[int], **call_kwargs
                       ) -> tuple[dict[str, Any], dict[str, type]]:
  """``jax.eval_shape`` of ``model.init`` at ``input_shape`` (nothing is computed).

  Returns ``(variables, module_types)``: the variable shapes (``jax.ShapeDtypeStruct``
  leaves) a model needs for that input size, and ``{module path: class}`` of every submodule
  called (paths joined by "/", the top module ``""``).
  """
  shape = tuple(input_shape)
  if not shape or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
    raise ValueError(f"input_shape must be positive ints, e.g. (1, 48, 48, 3); got "
                     f"{input_shape!r}")
  module_types: dict[str, type] = {}

  def record(call, args, kwargs, context):
    if context.method_name == "__call__" and context.module.scope is not None:
      module_types["/".join(context.module.scope.path)] = type(context.module)
    return call(*args, **kwargs)

  def init(images):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), images, **call_kwargs)

  try:
    variables = jax.eval_shape(init, jax.ShapeDtypeStruct(shape, jnp.float32))
  except ValueError as error:
    raise ValueError(f"{type(model).__name__} cannot run on inputs of shape {shape}: "
                     f"{error}") from error
  return variables, module_types


def convert_variables(model, variables: Any, input_shape: Sequence[int], *,
                      method: str = DEFAULT_METHOD, **call_kwargs) -> Any:
  """Converts ``variables`` of ``model`` for inputs of shape ``input_shape``.

  Args:
    model: the flax module the variables belong to (e.g. from ``create_model``).
    variables: its variables at any input size (``{'params': ..., 'batch_stats': ...}``;
      collections left out are left out of the result).
    input_shape: the shape of an input at the new size, as for ``model.init``, e.g.
      ``(1, 48, 48, 3)`` (the batch size does not matter).
    method: ``"interpolate"`` (content resized) or ``"extend"`` (canvas changed at the same
      object scale) for relative tables; see the module docstring.
    **call_kwargs: extra arguments of ``model.__call__`` for init (the zoo needs none).

  Returns:
    A tree like ``variables`` that ``model.apply`` accepts at ``input_shape``: size-dependent
    variables resampled, every other leaf the same object (so an unchanged size gives back
    bitwise the same arrays). Works under ``jax.eval_shape`` and ``jax.jit``.

  Raises:
    ValueError: a bad ``input_shape`` or ``method``, or the model cannot run at that size.
    VariableMismatchError: the variables belong to another model (or another number of
      input channels or classes).
  """
  check_method(method)
  target, module_types = abstract_variables(model, input_shape, **call_kwargs)
  # Collections the caller left out (e.g. batch_stats when converting params) are not needed.
  target = {name: tree for name, tree in target.items() if name in variables}
  resamplers = _size_dependent_variables()
  source_leaves = dict(leaves_by_path(variables))
  target_leaves = dict(leaves_by_path(target))
  missing = sorted(set(target_leaves) - set(source_leaves))
  extra = sorted(set(source_leaves) - set(target_leaves))
  if missing or extra:
    raise VariableMismatchError(
        "the variables do not belong to this model: "
        + "; ".join(part for part in (_list_paths("missing", missing),
                                      _list_paths("unexpected", extra)) if part)
        + ". Use the model (and settings) the variables were made with.")

  converted, mismatches = {}, []
  for path, leaf in source_leaves.items():
    wanted = tuple(target_leaves[path].shape)
    if tuple(leaf.shape) == wanted:
      continue
    # path = collection/module path/variable name
    module_path, _, name = path.partition("/")[2].rpartition("/")
    owner = module_types.get(module_path)
    resample = next((fn for (cls, var), fn in resamplers.items()
                     if var == name and owner is not None and issubclass(owner, cls)), None)
    result = resample(leaf, wanted, method) if resample is not None else None
    if result is None:
      mismatches.append(f"{path} has shape {tuple(leaf.shape)}, the model needs {wanted}")
    else:
      converted[path] = result
  if mismatches:
    mismatches.sort(key=lambda line: not line.startswith("params/"))
    more = f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""
    raise VariableMismatchError(
        f"the variables belong to another model (or another number of input channels or "
        f"classes): {'; '.join(mismatches[:3])}{more}. Only relative tables and GE-θ gather "
        f"kernels depend on the input size.")
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: converted.get(_path_string(path), leaf), variables)


def table_lengths(variables: Any) -> dict[str, int]:
  """``{path: L}`` for every relative table ``[2L-1, d]`` in ``variables`` (in tree order):
  the spatial size each AAConv's attention sees along that table's axis."""
  return {path: (leaf.shape[0] + 1) // 2 for path, leaf in leaves_by_path(variables)
          if path.rsplit("/", 1)[-1] in TABLE_NAMES}


def _path_string(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def leaves_by_path(tree) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` in tree order; paths join dict keys with "/" (``params/conv/kernel``)."""
  return [(_path_string(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _list_paths(kind: str, paths: list[str], limit: int = 5) -> str:
  if not paths:
    return ""
  shown = ", ".join(paths[:limit])
  more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
  return f"{kind} {shown}{more}"
