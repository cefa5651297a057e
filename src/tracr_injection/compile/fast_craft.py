"""`fast_craft`: vectorised drop-in replacements for tracr's slow craft-assembly hot paths.

In: ordinary tracr calls (typically ``compiling.compile_rasp_to_model``)
inside a ``with fast_craft():`` block.  Out: exactly the same compiled model
-- every parameter array and ``residual_labels`` are identical to those of
unpatched tracr -- only much faster and with less peak memory.  On exit
(normal or via an exception) the original tracr functions are put back, so
code outside the block sees stock tracr.  Patching module globals is
process-wide: do not compile in other threads meanwhile.

Why: tracr builds every weight matrix in pure Python, one basis direction at a
time, and materialises dense one-hot vectors with ``np.eye(n)[i]`` (an ``n*n``
identity matrix per direction).  Programs with large numerical value sets,
such as Shuffle-Dyck at max_seq_len=40 (~1.5k values per balance, hence MLPs
with ~3k hidden units each, ~18k after combining), make this cubic: 3-7 minutes.
After that, tracr's haiku ``init`` (random weights that are then zeroed, plus
an op-by-op forward pass) dominates time and memory.  The patches:

* ``VectorSpaceWithBasis.vector_from_basis_direction``: one-hot via
  ``zeros`` + one assignment instead of slicing ``np.eye``.
* ``vectorspace_fns.project`` (also bound as ``transformers.project``): the 0/1
  matrix is written in one fancy-indexing assignment.
* ``Linear.combine_in_parallel``: each sub-matrix is accumulated into the joint
  matrix at its row/column indices (in the same order tracr adds them) instead
  of evaluating every sub-function on every joint basis direction.
* ``numerical_mlp._get_discretising_layer``: the first-layer action writes its
  per-threshold entries with one vectorised assignment instead of O(#values)
  ``VectorInBasis`` additions per input direction.
* ``assemble.hk`` (tracr's view of haiku): ``init`` only traces the model for
  parameter shapes and returns zeros plus the embedding matrices, which is all
  ``assemble_craft_model`` keeps of it; ``assemble.np.zeros_like`` allocates
  lazily (calloc), so unused padding of the weight matrices costs no memory.

Bit-identity holds because every replaced computation only ever added values
to exact zeros or multiplied them by exact ones in the original, and the
discarded random init never reaches the output.  The one case where that is
not true -- non-finite weights, where tracr's ``0 * inf`` products spread
NaNs -- is detected and handed to the original code.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tracr.compiler import assemble
from tracr.craft import bases, transformers, vectorspace_fns
from tracr.craft.chamber import numerical_mlp
from tracr.utils import errors

__all__ = ["fast_craft"]

_Space = bases.VectorSpaceWithBasis
_original_combine_in_parallel = vectorspace_fns.Linear.combine_in_parallel.__func__
_original_get_discretising_layer = numerical_mlp._get_discretising_layer  # pylint: disable=protected-access


def _vector_from_basis_direction(self: _Space, basis_direction: bases.BasisDirection) -> bases.VectorInBasis:
    """One-hot vector for ``basis_direction`` without building ``np.eye``."""
    magnitudes = np.zeros(self.num_dims)
    magnitudes[self.index_by_direction[basis_direction]] = 1.0
    return self.make_vector(magnitudes)


def _project(from_space: _Space, to_space: _Space) -> vectorspace_fns.Linear:
    """0/1 matrix mapping each direction of ``from_space`` onto ``to_space``."""
    to_index = to_space.index_by_direction
    pairs = [(i, to_index[d]) for i, d in enumerate(from_space.basis) if d in to_index]
    matrix = np.zeros((from_space.num_dims, to_space.num_dims))
    if pairs:
        rows, cols = zip(*pairs)
        matrix[list(rows), list(cols)] = 1.0
    return vectorspace_fns.Linear(from_space, to_space, matrix)


def _combine_in_parallel(cls: type, fns: Sequence[vectorspace_fns.Linear]) -> vectorspace_fns.Linear:
    """Sums the sub-matrices into the joint matrix, in tracr's fn order.

    tracr computes row ``x`` of the result as ``0 + fns[0](e_x) + fns[1](e_x)
    + ...`` over the functions whose input space contains ``x``; ``fn(e_x)`` is
    row ``index(x)`` of ``fn.matrix`` (exactly, for finite weights) and repeated
    output directions are added one after another, which ``np.add.at``
    reproduces.
    """
    if not all(np.isfinite(fn.matrix).all() for fn in fns):
        return _original_combine_in_parallel(cls, fns)
    joint_in = bases.join_vector_spaces(*[fn.input_space for fn in fns])
    joint_out = bases.join_vector_spaces(*[fn.output_space for fn in fns])
    matrix = np.zeros((joint_in.num_dims, joint_out.num_dims))
    in_index, out_index = joint_in.index_by_direction, joint_out.index_by_direction
    for fn in fns:
        src_dst = fn.input_space.index_by_direction.items()
        src_rows = np.fromiter((i for _, i in src_dst), dtype=np.intp)
        dst_rows = np.fromiter((in_index[d] for d, _ in src_dst), dtype=np.intp)
        dst_cols = np.fromiter((out_index[d] for d in fn.output_space.basis), dtype=np.intp)
        np.add.at(matrix, (dst_rows[:, None], dst_cols[None, :]), fn.matrix[src_rows])
    return cls(joint_in, joint_out, matrix)


def _get_discretising_layer(
    input_value_set: Iterable[float],
    f: Callable[[float], float],
    hidden_name: bases.Name,
    one_direction: bases.BasisDirection,
    large_number: float,
) -> numerical_mlp.DiscretisingLayerMaterials:
    """``numerical_mlp._get_discretising_layer`` with a vectorised action.

    The hidden space, output values and the vector returned for each input
    direction are the same as tracr's; the entries are written directly (tracr
    adds each one to an exact zero) rather than by summing one-hot vectors.
    Non-finite entries (where tracr's ``inf * 0`` would spread NaNs) are left to
    the original.
    """
    output_values, sorted_values = [], []
    for x in sorted(input_value_set):
        res = errors.ignoring_arithmetic_errors(f)(x)
        if res is not None:
            output_values.append(res)
            sorted_values.append(x)

    num_vals = len(sorted_values)
    value_thresholds = [(sorted_values[i] + sorted_values[i + 1]) / 2 for i in range(num_vals - 1)]

    start_direction = bases.BasisDirection(f"{hidden_name}start")
    hidden_directions = [start_direction]
    for k in range(1, num_vals):
        hidden_directions.append(bases.BasisDirection(hidden_name, (k, 0)))
        hidden_directions.append(bases.BasisDirection(hidden_name, (k, 1)))
    hidden_space = bases.VectorSpaceWithBasis(hidden_directions)

    index = hidden_space.index_by_direction
    idx0 = np.array([index[d] for d in hidden_directions[1::2]], dtype=np.intp)
    idx1 = np.array([index[d] for d in hidden_directions[2::2]], dtype=np.intp)
    # Same Python float arithmetic as tracr's per-k loop.
    one_vals0 = [1 - large_number * t for t in value_thresholds]
    one_vals1 = [0.0 - large_number * t for t in value_thresholds]
    other_val = large_number * 1.0  # tracr: 0 + (L * 1 + L * 0)
    if not np.isfinite([*one_vals0, *one_vals1, other_val]).all():
        return _original_get_discretising_layer(input_value_set, f, hidden_name, one_direction, large_number)

    def action(direction: bases.BasisDirection) -> bases.VectorInBasis:
        magnitudes = np.zeros(hidden_space.num_dims)
        if direction == one_direction:
            magnitudes[index[start_direction]] = 1.0
            magnitudes[idx0] = one_vals0
            magnitudes[idx1] = one_vals1
        else:
            magnitudes[idx0] = other_val
            magnitudes[idx1] = other_val
        return hidden_space.make_vector(magnitudes)

    return numerical_mlp.DiscretisingLayerMaterials(
        action=action, hidden_space=hidden_space, output_values=output_values
    )


# Embedding matrices handed to hk.Embed during the current shape-only init,
# keyed by module name.
_embedding_matrices: dict[str, Any] = {}


def _recording_embed(*args: Any, **kwargs: Any) -> hk.Embed:
    """``hk.Embed`` that remembers its (concrete, numpy) ``embedding_matrix``."""
    _embedding_matrices[kwargs["name"]] = kwargs["embedding_matrix"]
    return hk.Embed(*args, **kwargs)


def _shape_only_transform(f: Callable[..., Any]) -> hk.Transformed:
    """``hk.transform`` whose ``init`` neither draws random weights nor runs.

    ``assemble_craft_model`` calls ``init`` once, overwrites every parameter of
    a "transformer" module with ``np.zeros_like`` and keeps the rest, which are
    the token/position embeddings (``jnp.asarray`` of the matrices given to
    ``hk.Embed``).  Tracr's eager init instead draws ~all weights from a
    truncated normal and runs the whole model op by op (dozens of XLA compiles,
    hundreds of MB for large MLPs).  Here the forward pass is only traced
    (``jax.eval_shape``) for the parameter shapes and dtypes.
    """
    transformed = hk.transform(f)

    def init(rng: jax.Array, *args: Any) -> dict[str, dict[str, Any]]:
        _embedding_matrices.clear()
        shapes = jax.eval_shape(transformed.init, rng, *args)
        params = {
            module: {
                name: (
                    np.zeros(s.shape, s.dtype)
                    if "transformer" in module
                    else jnp.asarray(_embedding_matrices[module])
                )
                for name, s in entries.items()
            }
            for module, entries in shapes.items()
        }
        _embedding_matrices.clear()
        assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params) == (
            jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes)
        )
        return params

    init._original_fn = f  # type: ignore[attr-defined]  # for hk.without_apply_rng
    return hk.Transformed(init, transformed.apply)


# haiku as seen by tracr.compiler.assemble (its only haiku reference).
_assemble_haiku = types.SimpleNamespace(
    **{name: getattr(hk, name) for name in dir(hk) if not name.startswith("_")}
)
_assemble_haiku.transform = _shape_only_transform
_assemble_haiku.Embed = _recording_embed


def _lazy_zeros_like(a: Any) -> np.ndarray:
    """``np.zeros_like`` via ``np.zeros``: pages stay unallocated until written."""
    return np.zeros(np.shape(a), a.dtype)


# numpy as seen by tracr.compiler.assemble, which zeroes every (padded) weight
# matrix with zeros_like and then writes only the used block.
_assemble_numpy = types.SimpleNamespace(
    **{name: getattr(np, name) for name in dir(np) if not name.startswith("_")}
)
_assemble_numpy.zeros_like = _lazy_zeros_like


# (owner, attribute, replacement). Attributes are read from / written to the
# owner's __dict__, so classmethods stay classmethods when restored.
_PATCHES: list[tuple[Any, str, Any]] = [
    (bases.VectorSpaceWithBasis, "vector_from_basis_direction", _vector_from_basis_direction),
    (vectorspace_fns, "project", _project),
    (transformers, "project", _project),  # module-level alias of the above
    (vectorspace_fns.Linear, "combine_in_parallel", classmethod(_combine_in_parallel)),
    (numerical_mlp, "_get_discretising_layer", _get_discretising_layer),
    (assemble, "hk", _assemble_haiku),
    (assemble, "np", _assemble_numpy),
]


@contextlib.contextmanager
def fast_craft() -> Iterator[None]:
    """Temporarily swaps tracr's craft hot paths for the vectorised versions.

    Restores whatever was installed before entering (the stock tracr functions,
    unless nested) on exit, including when the body raises.
    """
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in _PATCHES]
    try:
        for owner, name, replacement in _PATCHES:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
