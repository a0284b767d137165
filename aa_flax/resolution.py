"""Moving trained variables to another input size: resampling the relative position tables.

Every AAConv with relative position encodings holds two tables, ``rel_height [2H'-1, d]`` and
``rel_width [2W'-1, d]``, sized at init from the spatial size ``H' x W'`` its attention sees
(after striding and ``attention_pool``). Row ``m`` of a table of length ``2L-1`` holds the
relative offset ``m - (L-1)`` (key minus query). Every other variable of the models here is
independent of the image size, so moving a model to a new size means resampling each table
along its offset axis, ``[2L-1, d] -> [2L'-1, d]``, and keeping everything else.

Methods (``RESAMPLE_METHODS``):

* ``"interpolate"`` (default): the new offset ``r'`` reads the old table at ``r' * L / L'``
  (linear interpolation between the two nearest rows, clamped to the old range). Right when
  the image *content* is resized (FixRes-style evaluation or fine-tuning at a higher or lower
  resolution): a displacement between two object parts scales with the image.
* ``"extend"``: offsets the old table has keep their rows exactly; offsets beyond the old
  range take the row of the nearest old offset (relative distance clipped, as in Shaw et al.
  2018); shrinking crops the ends. Right when the *canvas* changes at the same object scale
  (detection-style inputs, padding): a displacement of k pixels means the same as before.

See docs/RESOLUTION.md for the measurements behind the default.
"""

from __future__ import annotations

from typing import Any, Sequence

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


def fit_variables(variables: Any, target: Any, method: str = DEFAULT_METHOD) -> Any:
  """Fits ``variables`` to the shapes of ``target`` by resampling relative tables.

  Args:
    variables: the variable tree to convert (e.g. ``{'params': ..., 'batch_stats': ...}``).
    target: a tree of the same structure whose leaves have ``.shape`` (arrays or
      ``jax.ShapeDtypeStruct``), e.g. ``jax.eval_shape`` of ``model.init`` at the new size.
    method: one of ``RESAMPLE_METHODS``.

  Returns:
    A tree like ``variables``: tables whose length differs resampled, every other leaf the
    same object (so an unchanged size gives back bitwise the same arrays).

  Raises:
    VariableMismatchError: the trees differ in structure, or a leaf other than a table's
      length differs in shape: the variables belong to another model (or another number
      of input channels or classes).
  """
  check_method(method)
  source_leaves = dict(_leaves_by_path(variables))
  target_leaves = dict(_leaves_by_path(target))
  missing = sorted(set(target_leaves) - set(source_leaves))
  extra = sorted(set(source_leaves) - set(target_leaves))
  if missing or extra:
    raise VariableMismatchError(
        "the variables do not belong to this model: "
        + "; ".join(part for part in (_list_paths("missing", missing),
                                      _list_paths("unexpected", extra)) if part)
        + ". Use the model (and settings) the variables were made with.")
  mismatches = [f"{path} has shape {tuple(leaf.shape)}, the model needs "
                f"{tuple(target_leaves[path].shape)}"
                for path, leaf in sorted(source_leaves.items(),
                                         key=lambda item: not item[0].startswith("params/"))
                if tuple(leaf.shape) != tuple(target_leaves[path].shape)
                and not _is_resizable_table(path, leaf.shape, target_leaves[path].shape)]
  if mismatches:
    more = f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""
    raise VariableMismatchError(
        f"the variables belong to another model (or another number of input channels or "
        f"classes): {'; '.join(mismatches[:3])}{more}. Only the length of the relative "
        f"tables ({', '.join(TABLE_NAMES)}) depends on the input size.")

  def convert(path, leaf):
    wanted = target_leaves[_path_string(path)].shape
    if tuple(leaf.shape) == tuple(wanted):
      return leaf
    return resample_table(leaf, (wanted[0] + 1) // 2, method)

  return jax.tree_util.tree_map_with_path(convert, variables)


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
      object scale); see the module docstring.
    **call_kwargs: extra arguments of ``model.__call__`` for init (the zoo needs none).

  Returns:
    Variables that ``model.apply`` accepts at ``input_shape``; nothing is computed but the
    resampled tables, and an unchanged size returns the same arrays.

  Raises:
    ValueError: a bad ``input_shape`` or ``method``, or the model cannot run at that size.
    VariableMismatchError: the variables belong to another model.
  """
  check_method(method)
  target = abstract_variables(model, input_shape, **call_kwargs)
  # Collections the caller left out (e.g. batch_stats when converting params) are not needed.
  wanted = {name: tree for name, tree in target.items() if name in variables}
  return fit_variables(variables, wanted, method)


def abstract_variables(model, input_shape: Sequence[int], **call_kwargs) -> dict[str, Any]:
  """``jax.eval_shape`` of ``model.init`` at ``input_shape``: the variable shapes a model
  needs for that input size (``jax.ShapeDtypeStruct`` leaves; nothing is computed)."""
  shape = tuple(input_shape)
  if not shape or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
    raise ValueError(f"input_shape must be positive ints, e.g. (1, 48, 48, 3); got "
                     f"{input_shape!r}")
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  try:
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **call_kwargs), images)
  except ValueError as error:
    raise ValueError(f"{type(model).__name__} cannot run on inputs of shape {shape}: "
                     f"{error}") from error


def table_lengths(variables: Any) -> dict[str, int]:
  """``{path: L}`` for every relative table ``[2L-1, d]`` in ``variables`` (in tree order):
  the spatial size each AAConv's attention sees along that table's axis."""
  return {path: (leaf.shape[0] + 1) // 2 for path, leaf in _leaves_by_path(variables)
          if path.rsplit("/", 1)[-1] in TABLE_NAMES}


def _is_resizable_table(path: str, shape, wanted) -> bool:
  return (path.rsplit("/", 1)[-1] in TABLE_NAMES and len(shape) == len(wanted) == 2
          and shape[1] == wanted[1] and shape[0] % 2 == 1 and wanted[0] % 2 == 1)


def _path_string(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _leaves_by_path(tree) -> list[tuple[str, Any]]:
  return [(_path_string(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _list_paths(kind: str, paths: list[str], limit: int = 5) -> str:
  if not paths:
    return ""
  shown = ", ".join(paths[:limit])
  more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
  return f"{kind} {shown}{more}"
