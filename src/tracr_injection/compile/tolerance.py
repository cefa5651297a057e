"""How far a compiled numerical value may lie from the exact one and still count as that value.

In: an exact value and the sorted values its variable can take (its grid).  Out: the tolerance at
that value: `GAP_FRACTION` of the distance to the nearest other value of the grid, at most
`MAX_TOLERANCE`.  Why local, not one number: tracr's numerical errors come mostly from the
attention's softness (logits are divided by sqrt(key_size), so BOS keeps a weight of about
exp(-50 / sqrt(key_size)) / n of a mean over n positions: 4.5e-4 at n = 1 for N = 40), which is
largest where the values are far apart (1 against 39/40) and small where they crowd (k/n with n
near N, 1/(nN) apart).  A value within a quarter of the local gap is still nearer its own value
than any other, and downstream MLPs, which cut at the midpoints, read it right; a value off by
more is refused.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

GAP_FRACTION = 0.25
MAX_TOLERANCE = 0.01
SAME_VALUE = 1e-12  # values closer than this are one value computed two ways (e.g. 0.1 + 0.2 and 0.3)


def numerical_tolerance(value: float, grid: Sequence[float]) -> float:
    """`GAP_FRACTION` of the distance from `value` to the nearest other value in sorted `grid`, capped."""
    index = bisect.bisect_left(grid, value)
    gaps = [
        abs(grid[j] - value)
        for j in nearest_other(grid, index, value, step=-1) + nearest_other(grid, index, value, step=1)
    ]
    return min([GAP_FRACTION * g for g in gaps] + [MAX_TOLERANCE])


def nearest_other(grid: Sequence[float], index: int, value: float, step: int) -> list[int]:
    """Index of the first grid value distinct from `value`, going from `index` in direction `step`."""
    j = index - 1 if step < 0 else index
    while 0 <= j < len(grid) and abs(grid[j] - value) <= SAME_VALUE:
        j += step
    return [j] if 0 <= j < len(grid) else []


def within_tolerance(compiled: float, expected: float, grid: Sequence[float]) -> bool:
    """Whether `compiled` counts as `expected` for a variable taking the values in sorted `grid`."""
    return abs(compiled - expected) <= numerical_tolerance(expected, grid)
