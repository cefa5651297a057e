"""fast_craft() must reproduce unpatched tracr bit for bit and clean up after itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tracr.compiler import assemble, compiling, lib
from tracr.craft import bases, transformers, vectorspace_fns
from tracr.craft.chamber import numerical_mlp
from tracr.rasp import rasp

from tracr_injection.compile import fast_craft as fast_craft_module
from tracr_injection.compile.fast_craft import fast_craft

MLP_EXACTNESS = 10000
ABC = {"a", "b", "c"}
BRACKETS = {"(", ")", "[", "]", "{", "}"}


def _numerical_map_of_frac_prevs() -> rasp.SOp:
    """Numerical -> numerical Map (map_numerical_mlp) on a many-valued input."""
    frac = lib.make_frac_prevs(rasp.tokens == "a")
    return rasp.numerical(rasp.Map(lambda x: 2 * x - 1, frac)).named("scaled")


def _numerical_selector_width() -> rasp.SOp:
    same = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.EQ)
    return rasp.numerical(rasp.SelectorWidth(same)).named("num_width")


# name -> (builder, vocab, max_seq_len, causal values to try)
PROGRAMS: dict[str, Any] = {
    "length": (lib.make_length, ABC, 5, (False, True)),
    "reverse": (lambda: lib.make_reverse(rasp.tokens), ABC, 5, (False,)),
    "hist": (lib.make_hist, ABC, 5, (False,)),
    "sort_unique": (lambda: lib.make_sort_unique(rasp.tokens, rasp.tokens), {1, 2, 3, 4}, 4, (False,)),
    "sort_freq": (lambda: lib.make_sort_freq(4), ABC, 4, (False,)),
    "frac_prevs": (lambda: lib.make_frac_prevs(rasp.tokens == "a"), ABC, 6, (False, True)),
    "pair_balance": (lambda: lib.make_pair_balance(rasp.tokens, "(", ")"), {"(", ")"}, 6, (True,)),
    "shuffle_dyck1": (lambda: lib.make_shuffle_dyck(["()"]), {"(", ")"}, 6, (False, True)),
    "shuffle_dyck3": (lambda: lib.make_shuffle_dyck(["()", "[]", "{}"]), BRACKETS, 8, (False,)),
    "detect_pattern": (lambda: lib.detect_pattern(rasp.tokens, "abc"), ABC, 5, (True,)),
    "numerical_map": (_numerical_map_of_frac_prevs, ABC, 6, (False,)),
    "numerical_selector_width": (_numerical_selector_width, ABC, 5, (False,)),
}

CASES = [(name, causal) for name, (_, _, _, causals) in PROGRAMS.items() for causal in causals]


def _compile(
    program: rasp.SOp, vocab: set[Any], max_seq_len: int, causal: bool
) -> assemble.AssembledTransformerModel:
    return compiling.compile_rasp_to_model(
        program, vocab, max_seq_len, causal=causal, compiler_bos="BOS", mlp_exactness=MLP_EXACTNESS
    )


def _assert_same_model(
    fast: assemble.AssembledTransformerModel, plain: assemble.AssembledTransformerModel
) -> None:
    assert fast.residual_labels == plain.residual_labels
    assert fast.model_config == plain.model_config
    assert list(fast.params) == list(plain.params)
    for module, params in plain.params.items():
        assert list(fast.params[module]) == list(params), module
        for name, plain_value in params.items():
            a, b = np.asarray(fast.params[module][name]), np.asarray(plain_value)
            assert a.dtype == b.dtype and a.shape == b.shape, (module, name)
            assert np.array_equal(a, b), (module, name)
            assert a.tobytes() == b.tobytes(), (module, name)  # even the zero signs


@pytest.mark.parametrize("name,causal", CASES)
def test_fast_craft_matches_plain_tracr(name: str, causal: bool) -> None:
    build, vocab, max_seq_len, _ = PROGRAMS[name]
    program = build()  # built once: RASP labels come from a global counter
    plain = _compile(program, vocab, max_seq_len, causal)
    with fast_craft():
        fast = _compile(program, vocab, max_seq_len, causal)
    _assert_same_model(fast, plain)
    if name == "shuffle_dyck1":  # the forward function still works
        tokens = ["BOS", "(", ")", "(", "(", ")", ")"]
        assert fast.apply(tokens).decoded == plain.apply(tokens).decoded


def _space(name: str, values: Any) -> bases.VectorSpaceWithBasis:
    return bases.VectorSpaceWithBasis.from_values(name, values)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("fill", [1.0, np.inf])
def test_combine_in_parallel_overlapping_spaces(fill: float) -> None:
    """Overlapping inputs/outputs are summed in order; inf/NaN behave as tracr."""
    rng = np.random.default_rng(0)
    spaces = [
        (_space("x", range(4)), _space("y", range(3))),
        (_space("x", range(2, 6)), _space("y", range(1, 5))),
        (_space("z", [None, "q"]), _space("y", range(2))),
    ]
    fns = []
    for in_space, out_space in spaces:
        matrix = rng.normal(size=(in_space.num_dims, out_space.num_dims))
        matrix[0, 0] = fill
        fns.append(vectorspace_fns.Linear(in_space, out_space, matrix))
    plain = vectorspace_fns.Linear.combine_in_parallel(fns)
    with fast_craft():
        fast = vectorspace_fns.Linear.combine_in_parallel(fns)
    assert fast.input_space == plain.input_space
    assert fast.output_space == plain.output_space
    np.testing.assert_array_equal(fast.matrix, plain.matrix)


def test_project_partial_overlap() -> None:
    from_space = bases.join_vector_spaces(
        _space("x", range(5)), bases.VectorSpaceWithBasis.from_names(["one"])
    )
    to_space = bases.join_vector_spaces(_space("x", range(3, 8)), _space("w", "ab"))
    plain = vectorspace_fns.project(from_space, to_space)
    with fast_craft():
        fast = vectorspace_fns.project(from_space, to_space)
    assert fast.matrix.dtype == plain.matrix.dtype
    assert fast.matrix.tobytes() == plain.matrix.tobytes()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "values",
    [
        {0, 0.25, 1 / 3, 0.5, 1.0, -1.0},
        {-0.5, 0.5, 2.0},  # a threshold of exactly 0
        {0.0, 1.0, 1e308, 1.5e308},  # L * threshold overflows to inf
        {3.0},  # no thresholds at all
    ],
)
def test_discretising_layer_matches(values: set[float]) -> None:
    one = bases.BasisDirection("one")
    x = bases.BasisDirection("x")
    args = (values, lambda v: 2 * v, "_h_", one, MLP_EXACTNESS)
    plain = numerical_mlp._get_discretising_layer(*args)  # pylint: disable=protected-access
    with fast_craft():
        fast = numerical_mlp._get_discretising_layer(*args)  # pylint: disable=protected-access
    assert fast.hidden_space == plain.hidden_space
    assert fast.output_values == plain.output_values
    for direction in (one, x):
        expected, got = plain.action(direction), fast.action(direction)
        assert got.basis_directions == expected.basis_directions
        np.testing.assert_array_equal(got.magnitudes, expected.magnitudes)


# Everything fast_craft() may replace: (owner, attribute in the owner's __dict__).
EXPECTED_PATCHES = {
    (bases.VectorSpaceWithBasis, "vector_from_basis_direction"),
    (vectorspace_fns, "project"),
    (transformers, "project"),  # bound by name at import time
    (vectorspace_fns.Linear, "combine_in_parallel"),
    (numerical_mlp, "_get_discretising_layer"),
    (assemble, "hk"),
    (assemble, "np"),
}


def _snapshot() -> dict[tuple[Any, str], Any]:
    """Raw __dict__ entries, so a classmethod must come back as the same object."""
    return {(owner, name): vars(owner)[name] for owner, name in EXPECTED_PATCHES}


def test_every_patch_is_checked_here() -> None:
    patched = {(owner, name) for owner, name, _ in fast_craft_module._PATCHES}  # pylint: disable=protected-access
    assert patched == EXPECTED_PATCHES


def test_originals_restored_after_exit_and_exception() -> None:
    before = _snapshot()

    with fast_craft():
        inside = _snapshot()
    assert all(inside[key] is not before[key] for key in before)
    assert all(value is before[key] for key, value in _snapshot().items())

    with pytest.raises(RuntimeError, match="boom"), fast_craft():
        raise RuntimeError("boom")
    assert all(value is before[key] for key, value in _snapshot().items())

    with fast_craft():  # nesting keeps the patches until the outermost exit
        with fast_craft():
            pass
        assert all(value is inside[key] for key, value in _snapshot().items())
    assert all(value is before[key] for key, value in _snapshot().items())
