"""RASP annotations this project's compiler reads on top of tracr's own (`name`, `encoding`).

In: a numerical `rasp.Aggregate`.  Out: the same Aggregate annotated with `FRACTION_MEAN`
(`fraction_mean`), which `compile.value_sets` reads to give it every fraction k/n as its value set.

`fraction_mean` marks a numerical mean of a 0/1 variable whose value is a fraction k/n of the
selected positions (e.g. "the share of openers among the brackets so far").  tracr's basis
inference assumes such a mean only takes the values 0 and 1/n, which holds for "is any selected
position 1" tests but not for fractions: an MLP that reads the mean discretises its input at the
midpoints between the inferred values and so answers wrongly whenever k > 1.  A marked mean gets
the value set {k/n : 0 <= k <= n <= max_seq_len} (`compile.value_sets`).  The compiler finds such
means by itself where it can list the values downstream of them; the mark is needed where it
cannot, and its mismatch error then names the means to mark.
"""

from __future__ import annotations

from tracr.rasp import rasp

FRACTION_MEAN = "fraction_mean"


def fraction_mean(mean: rasp.Aggregate) -> rasp.Aggregate:
    """`mean` (a numerical Aggregate) marked as taking every fraction k/n, not only 0 and 1/n."""
    if not isinstance(mean, rasp.Aggregate) or not rasp.is_numerical(mean):
        raise TypeError(f"fraction_mean takes a numerical rasp.Aggregate, got {mean!r}")
    return rasp.annotate(mean, **{FRACTION_MEAN: True})


def is_fraction_mean(expr: rasp.RASPExpr) -> bool:
    """Whether `expr` was marked with `fraction_mean`."""
    return bool(expr.annotations.get(FRACTION_MEAN, False)) if isinstance(expr, rasp.Aggregate) else False
