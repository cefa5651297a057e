"""Causal "reverse" task (beyond the paper): emit the items before the trigger in reverse order.

In: the maximum number of items.  Out: the RASP program (`make_reverse_trigger`), its vocabulary,
a plain-Python reference and an input sampler, and the program registered as `reverse_trigger`.

Input symbols: the items ``ITEMS`` (``"a"``..``"h"``), ``paper.FILLER`` and
``paper.TRIGGER``.  One teacher-forced sequence (or any prefix of it) reads
``<fillers> x1 .. xL (fillers anywhere between) compute r1 r2 ...`` where
``r_k`` are the answer items emitted so far (also from ``ITEMS``).  Output
``reverse_out``: ``FILLER`` before the trigger, at the trigger ``xL``, at the
k-th answer item ``x(L-k)`` and ``paper.END`` once all L items are emitted,
``FILLER`` at fillers after the trigger.  The conventions of
:mod:`tracr_injection.programs.paper` apply (compile with ``causal=True``;
the output at a position is the token due next).

This module also registers the program as ``reverse_trigger`` with a sampler
of task-shaped validation inputs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tracr.rasp import rasp

from tracr_injection.errors import InvalidArgumentError
from tracr_injection.programs import paper
from tracr_injection.programs.registry import ProgramSpec, register

__all__ = [
    "ITEMS",
    "REVERSE_MAX_ITEMS",
    "make_reverse_trigger",
    "reverse_input",
    "reverse_reference",
    "reverse_vocab",
]

ITEMS: tuple[str, ...] = ("a", "b", "c", "d", "e", "f", "g", "h")
F, T, END = paper.FILLER, paper.TRIGGER, paper.END

# Integer code of each input symbol, moved by the item fetch (integers, not strings, so
# the RASP evaluator can "average" several selected fillers, which all hold 0), and the
# output symbol of each code: the trigger's code stands for END.
_CODE = {F: 0, **{item: i + 1 for i, item in enumerate(ITEMS)}, T: len(ITEMS) + 1}
_SYMBOL = {0: F, **{i + 1: item for i, item in enumerate(ITEMS)}, len(ITEMS) + 1: END}


def reverse_vocab() -> set[str]:
    """Input vocabulary of :func:`make_reverse_trigger`."""
    return {*ITEMS, F, T}


def make_reverse_trigger(max_items: int = 8) -> rasp.SOp:
    """The items before the trigger in reverse order, one per position from the trigger on.

    Input domain: ``<fillers> x1 .. xL <fillers> compute r1 r2 ...`` (or a prefix)
    with fillers anywhere (also between items and answers), at most one trigger and
    1 <= L <= ``max_items``.  Output ``reverse_out`` (categorical): ``FILLER`` at
    every position before the trigger and at fillers; at the trigger ``xL``; at the
    k-th item after the trigger ``x(L-k)``, or ``END`` once k >= L.  The program
    itself works for any L (``max_items`` only bounds the task domain and is checked);
    with L = 0 the trigger answers ``END``; the output equals
    :func:`reverse_reference` on every input with at most one trigger.  From a
    second trigger on it is unspecified (and tracr and RASP may disagree there).

    Variables (N = max_seq_len; "non-filler" = item or trigger):

    * ``reverse_pos`` (SelectorWidth, 0..N): at a non-filler, the number of
      non-fillers so far (its "compact position", unique per non-filler); 0 at
      fillers.  So the items have compact positions 1..L, the trigger
      Q = L+1 and the k-th answer item Q+k.
    * ``reverse_trig_pos`` (SelectorWidth, 0..N): at the trigger its compact
      position Q; elsewhere the number of triggers so far (0 before it, 1 after).
    * ``reverse_code`` (0..9): the symbol's integer code (``FILLER`` 0, items
      1..8, trigger 9 standing for ``END``).
    * ``reverse_Q`` (categorical Aggregate): Q copied to every position from the
      trigger on, 0 before.  The selector picks the single trigger key once one
      exists, else every key, all of which then hold 0.
    * ``reverse_after`` (bool): ``reverse_Q >= 1``, i.e. at or after the trigger.
    * ``reverse_query`` (0..N): which compact position to fetch.  At a non-filler
      at or after the trigger with compact position p, the mirror image
      2Q - 1 - p of p about the trigger (Q-1 = L at the trigger, L-k at the k-th
      answer), or Q (the trigger itself) once that is < 1; at a non-filler before
      the trigger its own p; at a filler 0.
    * ``reverse_item`` (categorical Aggregate, 0..9): ``reverse_code`` of the
      non-filler at compact position ``reverse_query``: exactly one key, except at
      fillers, which select every filler so far (all hold code 0).
    * ``reverse_out``: ``FILLER`` if not ``reverse_after``, else the symbol of
      ``reverse_item`` (``FILLER`` at fillers, the item, ``END`` for the trigger).

    Depth: 3 layers -- the two counters (attention + MLP, plus the code map),
    the Q copy (attention) and query/after (MLP), the item fetch (attention)
    and the output (MLP).  The minimum: the fetch needs a query that depends on
    the trigger's compact position, which a position after the trigger can only
    read by attention once that position is known, i.e. after a first
    counting layer; combining it with the own position takes an MLP.  The
    ``reverse_query`` MLP is a lookup on (``reverse_pos``, ``reverse_Q``) with
    about (N+1)**2 hidden units, the bulk of the parameters.
    """
    if max_items < 1:
        raise InvalidArgumentError("max_items must be >= 1")
    non_filler = {*ITEMS, T}

    def pos_pred(key, query):
        return query in non_filler and key in non_filler

    def trig_pos_pred(key, query):
        if query == T:
            return key in non_filler
        return key == T

    pos = rasp.SelectorWidth(
        rasp.Select(rasp.tokens, rasp.tokens, pos_pred).named("reverse_pos_select")
    ).named("reverse_pos")
    trig_pos = rasp.SelectorWidth(
        rasp.Select(rasp.tokens, rasp.tokens, trig_pos_pred).named("reverse_trig_pos_select")
    ).named("reverse_trig_pos")
    code = rasp.Map(lambda t: _CODE[t], rasp.tokens).named("reverse_code")

    # Query value 0: no trigger yet -> select every key (all hold 0).
    # Query value >= 1: the trigger is at or before here -> select it.
    q_select = rasp.Select(rasp.tokens, trig_pos, lambda k, q: q == 0 or k == T).named("reverse_Q_select")
    Q = rasp.Aggregate(q_select, trig_pos).named("reverse_Q")
    after = rasp.Map(lambda q: q >= 1, Q).named("reverse_after")

    def query_fn(p, q):
        if p == 0:  # filler: select the fillers (code 0)
            return 0
        if q == 0:  # before the trigger: select yourself
            return p
        if p < q:  # impossible (a non-filler at or after the trigger has p >= Q)
            return 0
        mirror = 2 * q - 1 - p
        return mirror if mirror >= 1 else q

    query = rasp.SequenceMap(query_fn, pos, Q).named("reverse_query")
    item = rasp.Aggregate(
        rasp.Select(pos, query, lambda k, q: k == q).named("reverse_item_select"), code
    ).named("reverse_item")
    # ``_SYMBOL[c]`` also accepts the RASP evaluator's mean 0.0 of several fillers' 0.
    return rasp.SequenceMap(lambda c, a: _SYMBOL[c] if a else F, item, after).named("reverse_out")


def reverse_reference(tokens: Sequence[str]) -> list[str]:
    """Expected output at every position (plain Python)."""
    out = []
    trig = None
    for i, tok in enumerate(tokens):
        if tok == T and trig is None:
            trig = i
        if trig is None or tok == F:
            out.append(F)
            continue
        items = [x for x in tokens[:trig] if x in ITEMS]
        k = sum(1 for x in tokens[trig + 1 : i + 1] if x in ITEMS)
        out.append(items[len(items) - 1 - k] if k < len(items) else END)
    return out


def reverse_input(rng: random.Random, max_len: int, max_items: int) -> list[str]:
    """Items with fillers, the trigger, the reversed items (sometimes cut short).

    Filler density varies; every fourth input or so is padded with leading
    fillers to exactly ``max_len``.
    """
    while True:
        items = [rng.choice(ITEMS) for _ in range(rng.randint(1, max_items))]
        most = rng.choice([0, 0, 1, 2])
        tokens = [F] * rng.randint(0, most)
        for symbol in items:
            tokens += [symbol] + [F] * rng.randint(0, most)
        tokens += [T] + items[::-1]
        if len(tokens) > max_len:
            continue
        if rng.random() < 0.3:
            tokens = tokens[: rng.randint(1, len(tokens))]
        if rng.random() < 0.25:
            tokens = [F] * (max_len - len(tokens)) + tokens
        return tokens


REVERSE_MAX_ITEMS = 8

register(
    ProgramSpec(
        name="reverse_trigger",
        build=lambda n: make_reverse_trigger(REVERSE_MAX_ITEMS),
        vocab=frozenset(reverse_vocab()),
        max_seq_len=32,
        causal=True,
        description="the (up to 8) items before the trigger in reverse order, one per position",
        sample_inputs=lambda n, count, rng: [reverse_input(rng, n, REVERSE_MAX_ITEMS) for _ in range(count)],
        uniform_random_inputs=False,
    )
)
