"""Trigger-style (causal) RASP programs for the paper's three tasks.

In: a program's parameters (bracket pairs, maximum count, operand digits).  Out: the RASP SOp
(`make_*_trigger`), its vocabulary (`*_vocab`) and a plain-Python reference (`*_reference`: the
program's output for a symbol list), plus the shared symbols `FILLER`, `TRIGGER`, `END`.

Every program here is meant to be compiled by tracr with ``causal=True`` and
distilled into a causal language model.  Each LM token position is one program
input symbol:

* the task's own symbols (brackets, ``"x"``/``"y"``, digits, ``"+"``),
* ``TRIGGER = "compute"``: the position at which the LM must predict the first
  answer token (the prompt's ``"="``/answer cue),
* ``FILLER = "_"``: every other token (prompt words, spaces, newlines, ...).

Fillers may appear anywhere and in any number.  tracr prepends its own BOS;
:func:`tracr.rasp.causal_eval.evaluate` takes the raw symbol list.  The value
of the program's output at a position is the token the LM must predict *next*.
Where no answer is due the output is a fixed "don't care" value (see each
program), so the output is deterministic at every position and identical
under the compiled model and under ``causal_eval.evaluate``.

Design rules used throughout (they are what keeps the models small):

* Counting is done with categorical ``SelectorWidth`` (one attention head plus
  one MLP, exact under causal masking); its output is categorical 0..N.
* A selector's predicate may depend on the *query* token, so one
  ``SelectorWidth`` can count different things at different kinds of
  positions (e.g. "closers of my type" at a closer, "all openers" at the
  trigger).  This replaces several per-type counters by one.
* Numerical aggregates are only used for "does any selected position exist"
  (the mean of a constant 1 over the selected positions is 1, else the
  default 0).  tracr's basis inference assumes a mean of a 0/1 variable only
  takes the values {0} and {1/n}; a test ``x > 0`` is exact under that
  assumption, a test like ``x > 1/2`` would not be.
* Categorical ``Aggregate`` is only used where exactly one position is
  selected at every query (RASP's evaluator cannot average strings and tracr
  would produce a null vector when nothing is selected).
* Every SOp is named with ``.named(...)`` so residual-stream labels are stable.

Recommended compile settings: ``causal=True``, ``compiler_bos="BOS"`` (any
name not in the vocab) and ``mlp_exactness`` >= ``2*(N+1)*(N+2)`` (see
:mod:`tracr_injection.compile.exactness`), because ``SelectorWidth``'s MLP must
tell ``1/(N+1)`` from ``1/N`` apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from tracr.rasp import rasp

from tracr_injection.errors import InvalidArgumentError
from tracr_injection.programs.annotations import fraction_mean

__all__ = [
    "DIGITS",
    "DYCK_PAIRS",
    "END",
    "FILLER",
    "TRIGGER",
    "count_reference",
    "count_vocab",
    "dyck_reference",
    "dyck_vocab",
    "make_count_trigger",
    "make_dyck_authors_trigger",
    "make_dyck_frac_trigger",
    "make_dyck_trigger",
    "make_sum_trigger",
    "sum_reference",
    "sum_vocab",
]

FILLER = "_"
"""Input symbol for every LM token that is not a program symbol; also the
"don't care" output value of the categorical programs."""

TRIGGER = "compute"
"""Input symbol of the position at which the first answer token is due."""

END = "end"
"""Output value after the last answer digit (Count and Sum)."""

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))

DYCK_PAIRS: tuple[str, ...] = ("()", "[]", "{}")


def _check_pairs(pairs: Sequence[str]) -> tuple[str, ...]:
    pairs = tuple(pairs)
    chars = [c for p in pairs for c in p]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise InvalidArgumentError(f"pairs must be 2-character strings, got {pairs!r}")
    if len(set(chars)) != len(chars) or {FILLER, TRIGGER} & set(chars):
        raise InvalidArgumentError(f"bracket characters must be distinct symbols: {pairs!r}")
    return pairs


def dyck_vocab(pairs: Sequence[str] = DYCK_PAIRS) -> set[str]:
    """Input vocabulary of :func:`make_dyck_trigger`."""
    pairs = _check_pairs(pairs)
    return {c for p in pairs for c in p} | {FILLER, TRIGGER}


def count_vocab() -> set[str]:
    """Input vocabulary of :func:`make_count_trigger`."""
    return {"x", "y", FILLER, TRIGGER, *DIGITS}


def sum_vocab() -> set[str]:
    """Input vocabulary of :func:`make_sum_trigger`."""
    return {*DIGITS, "+", FILLER, TRIGGER}


# ---------------------------------------------------------------------------
# Shuffle-Dyck
# ---------------------------------------------------------------------------


def make_dyck_trigger(pairs: Sequence[str] = DYCK_PAIRS, mask_non_trigger: bool = False) -> rasp.SOp:
    """Shuffle-Dyck-k recogniser with the verdict due at the trigger.

    Output ``dyck_verdict`` (categorical, ``"yes"``/``"no"``):

    * at a ``TRIGGER`` position: ``"yes"`` iff the brackets before it are
      shuffle-balanced, i.e. for every pair type no prefix has more closers than
      openers and the counts are equal at the trigger;
    * at any other position (default, ``mask_non_trigger=False``): the running
      verdict ``"yes"`` iff no prefix so far has more closers than openers of
      some type (and no earlier trigger saw an unbalanced string).  It is a
      deterministic "don't care" value; the LM is only supervised at triggers.
    * with ``mask_non_trigger=True`` non-trigger positions give ``FILLER``
      instead, at the price of one more MLP layer (variable ``dyck_answer``).

    Variables (N = max_seq_len, all categorical unless said otherwise):

    * ``dyck_lhs`` (SelectorWidth, 0..N): at a closer ``c``, the number of
      ``c`` up to and including here; at the trigger, the number of openers of
      any type so far; 0 elsewhere.
    * ``dyck_rhs`` (SelectorWidth, 0..N): at a closer ``c``, the number of its
      opener so far; at the trigger, the number of closers of any type so far;
      0 elsewhere.
    * ``dyck_bad`` (bool): ``lhs > rhs``.  At a closer this says "this closer
      makes its own type's balance negative"; a type's balance can only become
      negative at one of its own closers, so "some prefix is negative" is
      exactly "some position is bad".  At the trigger it says "more openers
      than closers in total"; given no negative prefix (each type has
      closers <= openers) this is exactly "some type is unbalanced".
    * ``dyck_can_be_bad`` (numerical): 1 at closers and triggers (the only
      positions that can be bad), 0 elsewhere.
    * ``dyck_any_bad`` (numerical): mean of ``dyck_can_be_bad`` over the bad
      positions up to here: 1 if there is one, else the default 0.
    * ``dyck_verdict``: ``"no"`` if ``dyck_any_bad > 0`` else ``"yes"``.

    Depth: 3 layers (SelectorWidth = attention + MLP; SequenceMap = MLP;
    existence aggregate = attention; final map = MLP).  Counting needs one
    attention, comparing counts an MLP, "in any prefix" a second attention and
    the yes/no read-out a final MLP, so 3 layers is the minimum tracr can
    schedule this in (the second layer's attention is idle).  Only two counters
    are needed for any number of pair types.
    """
    pairs = _check_pairs(pairs)
    opener_of = {p[1]: p[0] for p in pairs}
    openers = {p[0] for p in pairs}
    closers = set(opener_of)

    def lhs_pred(key, query):
        if query in closers:
            return key == query
        if query == TRIGGER:
            return key in openers
        return False

    def rhs_pred(key, query):
        if query in closers:
            return key == opener_of[query]
        if query == TRIGGER:
            return key in closers
        return False

    lhs = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, lhs_pred).named("dyck_lhs_select")).named(
        "dyck_lhs"
    )
    rhs = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rhs_pred).named("dyck_rhs_select")).named(
        "dyck_rhs"
    )
    bad = rasp.SequenceMap(lambda a, b: a > b, lhs, rhs).named("dyck_bad")
    return _dyck_verdict(bad, closers, mask_non_trigger)


def _dyck_verdict(bad: rasp.SOp, closers: set[str], mask_non_trigger: bool) -> rasp.SOp:
    """``dyck_verdict`` (and ``dyck_answer`` when masking) from the per-position ``dyck_bad`` flag:
    "no" from the first bad position on, else "yes"."""
    # 1 at every position that can be bad (closers, trigger), 0 elsewhere; the
    # 0 matters: it puts 0 into the inferred value set of ``dyck_any_bad``.
    one = rasp.numerical(rasp.Map(lambda t: 1 if (t in closers or t == TRIGGER) else 0, rasp.tokens)).named(
        "dyck_can_be_bad"
    )
    bad_select = rasp.Select(bad, rasp.tokens, lambda k, q: k is True).named("dyck_bad_select")
    any_bad = rasp.numerical(rasp.Aggregate(bad_select, one, default=0)).named("dyck_any_bad")
    verdict = rasp.Map(lambda x: "no" if x > 0 else "yes", any_bad).named("dyck_verdict")
    if not mask_non_trigger:
        return verdict
    return rasp.SequenceMap(lambda v, t: v if t == TRIGGER else FILLER, verdict, rasp.tokens).named(
        "dyck_answer"
    )


def make_dyck_frac_trigger(pairs: Sequence[str] = DYCK_PAIRS, mask_non_trigger: bool = False) -> rasp.SOp:
    """Shuffle-Dyck-k recogniser like :func:`make_dyck_trigger`, with a numerical counter.

    Same output ``dyck_verdict`` at every position.  Instead of two categorical counts
    (one-hot over 0..N, so a count the LM never saw in training has no direction to be mapped
    from), the balance is one fraction computed by a causal mean, the way attention computes it
    natively and at any length:

    * ``dyck_open_frac`` (numerical, marked :func:`fraction_mean`): at a closer ``c``, the share
      of openers of ``c``'s type among the brackets of that type up to and including here; at the
      trigger, the share of openers among all brackets so far; 0 where nothing is selected
      (fillers, or a trigger with no bracket before it).
    * ``dyck_open_share`` (categorical ``"lt"``/``"eq"``/``"gt"``): ``dyck_open_frac`` against 1/2.
    * ``dyck_bad`` (bool): at a closer, ``"lt"`` (this closer makes its type's balance negative;
      a type's balance can only turn negative at one of its closers); at the trigger, ``"gt"``
      (more openers than closers in total: given no negative prefix, some type is unbalanced).
    * ``dyck_can_be_bad``, ``dyck_any_bad``, ``dyck_verdict``: as in :func:`make_dyck_trigger`.

    Depth: 4 layers (the opener indicator is an MLP the mean's attention must wait for; then
    comparison and flag are two MLPs, existence an attention, the read-out an MLP), one more than
    :func:`make_dyck_trigger`, so it aligns one more LM level.  The comparison MLP discretises the
    fraction at every midpoint between the ~0.3 N^2 values it can take (2 hidden units each), and
    its exactness must separate fractions 1/(N(N-1)) apart.
    """
    pairs = _check_pairs(pairs)
    pair_of = {c: p for p in pairs for c in p}
    openers = {p[0] for p in pairs}
    closers = {p[1] for p in pairs}

    def same_type_bracket(key, query):
        if query in closers:
            return pair_of.get(key) == pair_of[query]
        if query == TRIGGER:
            return key in pair_of
        return False

    is_opener = rasp.numerical(rasp.Map(lambda t: 1 if t in openers else 0, rasp.tokens))
    is_opener = is_opener.named("dyck_is_opener")
    select = rasp.Select(rasp.tokens, rasp.tokens, same_type_bracket).named("dyck_type_select")
    frac = fraction_mean(rasp.numerical(rasp.Aggregate(select, is_opener, default=0))).named("dyck_open_frac")
    share = rasp.Map(lambda x: "lt" if x < 0.5 else ("eq" if x == 0.5 else "gt"), frac)
    share = share.named("dyck_open_share")
    bad = rasp.SequenceMap(
        lambda s, t: (t in closers and s == "lt") or (t == TRIGGER and s == "gt"), share, rasp.tokens
    ).named("dyck_bad")
    return _dyck_verdict(bad, closers, mask_non_trigger)


PAIR_NAMES = {"()": "round", "[]": "square", "{}": "curly", "<>": "angle"}
"""Readable variable-name stems of the bracket types (other pairs are named by position)."""


def make_dyck_authors_trigger(pairs: Sequence[str] = DYCK_PAIRS, max_seq_len: int = 112) -> rasp.SOp:
    """Shuffle-Dyck-k recogniser built as the paper's authors built theirs: per-type differences.

    Follows ``shuffle_dyck`` in ``compile_model/compile_dyck.py`` of
    github.com/tvergara/language-model-repair (commit 6b1983f): for every bracket type a categorical
    count of its openers and of its closers so far, their difference, and a count of the positions so
    far where that difference was negative; then "some type has a negative count > 0" and "some type
    has a difference != 0", and the verdict "neither", kept only at the trigger.  Unlike
    :func:`make_dyck_trigger` (total opener and closer counts), the verdict on an almost-balanced
    string rests on per-type differences of 0 or 1, values a model trained on short strings has seen.

    Output ``dyck_verdict`` (categorical): ``"yes"`` at a ``TRIGGER`` whose preceding brackets are
    shuffle-balanced, ``"no"`` at every other position (the authors' ``False``).

    Variables (``{t}`` = the type's stem, e.g. ``round`` for ``()``; N = ``max_seq_len``):

    * ``dyck_{t}_opens`` / ``dyck_{t}_closes`` (SelectorWidth, 0..N): openers / closers of the
      type so far (the authors' ``start_counts`` / ``end_counts``).
    * ``dyck_{t}_opens_num`` / ``dyck_{t}_closes_num`` (numerical): the same counts times
      ``2**-b`` (the smallest power of two with ``2**b > N``); ``dyck_{t}_diff_num`` (numerical,
      linear): their difference, in (-1, 1).
    * ``dyck_{t}_diff`` (categorical, -N..N): openers minus closers (the authors' ``diffs``).
    * ``dyck_{t}_below`` / ``dyck_{t}_nonzero`` (bool): difference < 0 / != 0 here.
    * ``dyck_{t}_negatives`` (SelectorWidth, 0..N): positions so far where the difference was
      negative (the authors' ``negative_counters``); ``dyck_{t}_negative`` (bool): that count > 0.
    * ``dyck_any_negative`` / ``dyck_any_nonzero`` (bool): over the types (``..._{k}``: over the
      first k+1 types); the authors' ``aggregated_negatives`` / ``aggregated_diffs``.
    * ``dyck_balanced`` (bool): neither (the authors' ``unfiltered_result``).

    Departures that keep the model small at the task's N=112 (tracr pads every layer's MLP to the
    widest and every head to the widest key space); the first three cost 2, 1 and 1 blocks:

    * The authors subtract the categorical counts with a categorical SequenceMap, (N+1)**2 hidden
      units per type (~38k in one layer, padded into every layer: about 1e9 parameters at N=112,
      estimated).  Here the counts are copied to numerical scalars, subtracted linearly and made
      categorical again (2 units per value).  The
      power-of-two scale makes every difference exact in float32 and keeps tracr's discretising MLP
      (slope ``mlp_exactness``) far from float32's limits.
    * The negative counter selects on ``dyck_{t}_below`` instead of on the difference itself (a
      key space of 2, not 2N+1: the wider one made the model three times larger).
    * The flags are Maps before the ORs: the authors' first OR is a SequenceMap over two counts
      ((N+1)**2 units) or two differences ((2N+1)**2 units).
    * The verdict is ``"yes"``/``"no"`` instead of True/False, as :func:`make_dyck_trigger`'s.

    Depth: 11 blocks (the authors' at N=40: 7).  At N=40: residual width 711 (theirs: 684).
    """
    pairs = _check_pairs(pairs)
    scale = 2.0 ** -max(1, max_seq_len).bit_length()
    negatives, nonzero = [], []
    for i, (opener, closer) in enumerate(pairs):
        stem = f"dyck_{PAIR_NAMES.get(opener + closer, f'pair{i}')}"
        opens = _count_of(opener, f"{stem}_opens")
        closes = _count_of(closer, f"{stem}_closes")
        opens_num = rasp.numerical(rasp.Map(lambda k: k * scale, opens)).named(f"{stem}_opens_num")
        closes_num = rasp.numerical(rasp.Map(lambda k: k * scale, closes)).named(f"{stem}_closes_num")
        diff_num = rasp.numerical(rasp.LinearSequenceMap(opens_num, closes_num, 1, -1))
        diff_num = diff_num.named(f"{stem}_diff_num")
        diff = rasp.categorical(rasp.Map(lambda x: round(x / scale), diff_num)).named(f"{stem}_diff")
        # simplify=False: rasp.Map would fold a Map of a Map into one Map of diff_num, which drops
        # the categorical difference from the model.
        below = rasp.Map(lambda d: d < 0, diff, simplify=False).named(f"{stem}_below")
        negative_select = rasp.Select(below, rasp.tokens, lambda k, q: k).named(f"{stem}_negatives_select")
        negative_count = rasp.SelectorWidth(negative_select).named(f"{stem}_negatives")
        negatives.append(rasp.Map(lambda n: n > 0, negative_count).named(f"{stem}_negative"))
        nonzero.append(rasp.Map(lambda d: d != 0, diff, simplify=False).named(f"{stem}_nonzero"))
    any_negative = _any(negatives, "dyck_any_negative")
    any_nonzero = _any(nonzero, "dyck_any_nonzero")
    balanced = rasp.SequenceMap(lambda n, z: not n and not z, any_negative, any_nonzero)
    balanced = balanced.named("dyck_balanced")
    return rasp.SequenceMap(lambda b, t: "yes" if b and t == TRIGGER else "no", balanced, rasp.tokens).named(
        "dyck_verdict"
    )


def _count_of(symbol: str, name: str) -> rasp.SOp:
    """Categorical count of ``symbol`` at or before each position (causal ``SelectorWidth``)."""
    select = rasp.Select(rasp.tokens, rasp.tokens, lambda k, q: k == symbol).named(f"{name}_select")
    return rasp.SelectorWidth(select).named(name)


def _any(flags: list[rasp.SOp], name: str) -> rasp.SOp:
    """OR of boolean SOps folded left with SequenceMaps (intermediates ``{name}_{k}``, the last ``name``)."""
    out = flags[0]
    for k, flag in enumerate(flags[1:], start=1):
        label = name if k == len(flags) - 1 else f"{name}_{k}"
        out = rasp.SequenceMap(lambda a, b: a or b, out, flag).named(label)
    return out


def dyck_reference(tokens: Sequence[str], pairs: Sequence[str] = DYCK_PAIRS) -> str:
    """Plain-Python verdict for the brackets in ``tokens`` (other symbols ignored)."""
    pairs = _check_pairs(pairs)
    for op, cl in pairs:
        depth = 0
        for t in tokens:
            depth += (t == op) - (t == cl)
            if depth < 0:
                return "no"
        if depth != 0:
            return "no"
    return "yes"


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


def make_count_trigger(max_count: int, compact: bool = False) -> rasp.SOp:
    """Decimal count of ``"x"`` tokens, emitted digit by digit after the trigger.

    Input: ``x``/``y``/fillers, then ``TRIGGER``, then the answer digits the LM
    has emitted so far (teacher forcing).  Output ``count_out``:

    * at the trigger: the first digit of ``n`` = number of ``"x"`` so far;
    * at the k-th answer digit: digit k+1 of ``n``, or ``END`` after the last;
    * ``FILLER`` at every position before the trigger.

    ``n`` saturates at ``max_count`` (an input with more x's is answered with
    the digits of ``max_count``).  The x's are counted over the whole prefix;
    only digits follow the trigger in the task format, so this is the number
    of x's before the trigger.

    Variables:

    * ``count_x`` (SelectorWidth, 0..N): number of ``"x"`` so far.
    * ``count_step`` (SelectorWidth, 0..N): 0 at ordinary positions; at the
      trigger the number of triggers so far (1); at a digit the number of
      digits and triggers so far (k+1 at the k-th answer digit).  So
      ``step - 1`` is the index of the answer digit due next.
    * ``count_out``: lookup on (``count_x``, ``count_step``).

    Depth: 2 layers (two counters in one attention layer + their MLPs, then
    one lookup MLP) -- the minimum, as an answer depends on a count (attention +
    MLP to make it categorical) and on the output step (a second count), which
    must be combined by another MLP.  The lookup has (N+1)**2 hidden units.

    ``compact=True`` first clips the step to 0..len(str(max_count))+1
    (``count_step_clipped``, one more MLP layer, 3 layers in all) so the lookup
    has only (N+1)*(digits+2) hidden units -- far fewer parameters for long N.
    """
    if max_count < 0:
        raise InvalidArgumentError("max_count must be >= 0")
    digits = set(DIGITS)

    def step_pred(key, query):
        if query == TRIGGER:
            return key == TRIGGER
        if query in digits:
            return key in digits or key == TRIGGER
        return False

    n = rasp.SelectorWidth(
        rasp.Select(rasp.tokens, rasp.tokens, lambda k, q: k == "x").named("count_x_select")
    ).named("count_x")
    step = rasp.SelectorWidth(
        rasp.Select(rasp.tokens, rasp.tokens, step_pred).named("count_step_select")
    ).named("count_step")

    def answer(count, stp):
        if stp == 0:
            return FILLER
        text = str(min(count, max_count))
        return text[stp - 1] if stp - 1 < len(text) else END

    if compact:
        last = len(str(max_count)) + 1
        step = rasp.Map(lambda v: min(v, last), step).named("count_step_clipped")
    return rasp.SequenceMap(answer, n, step).named("count_out")


def count_reference(tokens: Sequence[str], max_count: int) -> list[str]:
    """Expected output at every position for a well-formed count input."""
    out = []
    trig = None
    for i, t in enumerate(tokens):
        if t == TRIGGER and trig is None:
            trig = i
        if trig is None:
            out.append(FILLER)
            continue
        text = str(min(tokens[:trig].count("x"), max_count))
        k = sum(1 for u in tokens[trig : i + 1] if u in DIGITS)
        out.append(text[k] if k < len(text) else END)
    return out


# ---------------------------------------------------------------------------
# Addition
# ---------------------------------------------------------------------------


def make_sum_trigger(max_digits: int = 3) -> rasp.SOp:
    """Decimal ``a + b``, emitted most significant digit first after the trigger.

    Input domain: one teacher-forced sequence (or any prefix of it)
    ``<fillers> digits(a) <fillers> + <fillers> digits(b) <fillers> compute
    d1 d2 ...`` with fillers anywhere (also between digits), exactly one
    ``"+"`` and at most one trigger, operands of 1..``max_digits`` digits.
    Output ``sum_out``: at the trigger the first digit of ``a+b`` (no leading
    zeros, ``"0"`` for 0), at the k-th emitted answer digit digit k+1, after the
    last one ``END``; ``FILLER`` at every other position (before the trigger
    and at fillers).  Outside the domain (two ``"+"``, two triggers, too many
    digits) the output is unspecified but still identical in tracr and RASP
    as long as no position has two ``"+"``/triggers before it.

    Variables (N = max_seq_len; "non-filler" = digit, ``"+"`` or trigger):

    * ``sum_pos`` (SelectorWidth, 0..N): at a non-filler, the number of
      non-fillers so far (its "compact position", unique per non-filler); 0 at
      fillers.  So a has compact positions 1..La, ``"+"`` La+1, b
      La+2..La+Lb+1, the trigger Q = La+Lb+2 and answer digit m is at Q+m.
    * ``sum_plus_pos`` (SelectorWidth): at ``"+"`` its compact position
      P = La+1; elsewhere the number of ``"+"`` so far (0 before it, 1 after).
    * ``sum_trig_pos`` (SelectorWidth): likewise Q at the trigger, elsewhere
      the number of triggers so far.
    * ``sum_digit`` (0..9): the digit value of a digit token, 0 otherwise.
    * ``sum_P`` / ``sum_Q`` (categorical Aggregate): P and Q copied to every
      position after ``"+"``/the trigger; 0 before.  The selector picks the
      single ``"+"`` (trigger) key once one exists, else every key, all of
      which then hold 0 -- so exactly one value is moved at every position
      and nothing is ever undefined.
    * ``sum_b_digit`` (0..9): ``sum_digit`` at digits after ``"+"`` (b and the
      answer), 0 elsewhere (computed from ``sum_P``, which is >= 1 exactly at
      and after ``"+"``).
    * ``sum_a_query`` / ``sum_b_query``: P (Q) where known, else the
      position's own compact position (tagged ``("self", pos)``), used as the
      query of the digit fetches so they always select exactly one key (or
      only fillers, which all hold digit 0).
    * ``sum_step``: at the trigger and the answer digits, the index m of the
      answer digit due (clipped to max_digits+1), ``FILLER`` elsewhere.
    * ``sum_a{p}`` / ``sum_b{p}`` (p = 0..max_digits-1, categorical
      Aggregate): the digit of a (b) with place value 10**p, 0 if the operand
      is shorter.  a's place p sits at compact position P-1-p, b's at Q-1-p.
    * ``sum_t{p}`` (0..18): ``a_p + b_p``.
    * ``sum_low`` (D >= 3): ``sum_{q < D-1} t_q * 10**q`` folded by
      SequenceMaps; ``sum_high``: (t_{D-1}, step) or ``FILLER``.
    * ``sum_out``: ``str(10**(D-1) * t_{D-1} + low)[step]`` or ``END``.

    Depth (D=3): 5 layers -- counters (attn+MLP), P/Q copies (attn), fetch
    queries (MLP), digit fetches (attn), t_p (MLP), low/high (MLP), output
    (MLP).  The digit sums of all places plus the step are 7 values that
    2-input SequenceMaps need three MLP levels to combine.
    """
    if max_digits < 1:
        raise InvalidArgumentError("max_digits must be >= 1")
    D = max_digits
    digit_set = set(DIGITS)
    non_filler = digit_set | {"+", TRIGGER}

    def pos_pred(key, query):
        return query in non_filler and key in non_filler

    def marker_pos_pred(marker):
        def pred(key, query):
            if query == marker:
                return key in non_filler
            return key == marker

        return pred

    pos = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, pos_pred).named("sum_pos_select")).named(
        "sum_pos"
    )
    plus_pos = rasp.SelectorWidth(
        rasp.Select(rasp.tokens, rasp.tokens, marker_pos_pred("+")).named("sum_plus_pos_select")
    ).named("sum_plus_pos")
    trig_pos = rasp.SelectorWidth(
        rasp.Select(rasp.tokens, rasp.tokens, marker_pos_pred(TRIGGER)).named("sum_trig_pos_select")
    ).named("sum_trig_pos")
    digit = rasp.Map(lambda t: int(t) if t in digit_set else 0, rasp.tokens).named("sum_digit")

    def copy_marker(marker_pos, marker, name):
        # Query value 0: no marker yet -> select every key (all hold 0).
        # Query value >= 1: the marker is at or before here -> select it.
        sel = rasp.Select(rasp.tokens, marker_pos, lambda k, q: q == 0 or k == marker).named(name + "_select")
        return rasp.Aggregate(sel, marker_pos).named(name)

    P = copy_marker(plus_pos, "+", "sum_P")
    Q = copy_marker(trig_pos, TRIGGER, "sum_Q")

    # Reads P (not sum_plus_pos) on purpose: same information (P >= 1 iff a
    # "+" is at or before here), but it puts this MLP at the same graph depth
    # as the other fetch-preparation MLPs, which lets tracr's layer allocator
    # merge that depth into the P/Q attention layer (saves one layer).
    b_digit = rasp.SequenceMap(
        lambda t, pp: int(t) if (t in digit_set and pp >= 1) else 0, rasp.tokens, P
    ).named("sum_b_digit")

    def fetch_query(marker, own):
        return marker if marker >= 1 else ("self", own)

    a_query = rasp.SequenceMap(fetch_query, P, pos).named("sum_a_query")
    b_query = rasp.SequenceMap(fetch_query, Q, pos).named("sum_b_query")

    def step_fn(p, q):
        if q >= 1 and p >= q:
            return min(p - q, D + 1)
        return FILLER

    step = rasp.SequenceMap(step_fn, pos, Q).named("sum_step")

    def place_pred(place):
        def pred(key, query):
            if isinstance(query, tuple):  # marker unknown: fetch own position
                return key == query[1]
            target = query - 1 - place
            return key == (target if target >= 1 else query)

        return pred

    t = []
    for p in range(D):
        a_p = rasp.Aggregate(rasp.Select(pos, a_query, place_pred(p)).named(f"sum_a{p}_select"), digit).named(
            f"sum_a{p}"
        )
        b_p = rasp.Aggregate(
            rasp.Select(pos, b_query, place_pred(p)).named(f"sum_b{p}_select"), b_digit
        ).named(f"sum_b{p}")
        t.append(rasp.SequenceMap(lambda x, y: x + y, a_p, b_p).named(f"sum_t{p}"))

    def high_fn(top, stp):
        return FILLER if stp == FILLER else (top, stp)

    high = rasp.SequenceMap(high_fn, t[D - 1], step).named("sum_high")
    if D == 1:

        def out_fn(h, low_unused):
            del low_unused
            if h == FILLER:
                return FILLER
            top, m = h
            text = str(top)
            return text[m] if m < len(text) else END

        return rasp.Map(lambda h: out_fn(h, 0), high).named("sum_out")

    low = t[0]
    for q in range(1, D - 1):
        low = rasp.SequenceMap(lambda x, y, q=q: x * 10**q + y, t[q], low).named(
            "sum_low" if q == D - 2 else f"sum_low{q}"
        )

    def out_fn(h, lo):
        if h == FILLER:
            return FILLER
        top, m = h
        text = str(top * 10 ** (D - 1) + lo)
        return text[m] if m < len(text) else END

    return rasp.SequenceMap(out_fn, high, low).named("sum_out")


def sum_reference(tokens: Sequence[str]) -> list[str]:
    """Expected output at every position for a well-formed sum input."""
    out = []
    trig = None
    for i, tok in enumerate(tokens):
        if tok == TRIGGER and trig is None:
            trig = i
        if trig is None or (tok != TRIGGER and tok not in DIGITS):
            out.append(FILLER)
            continue
        before = tokens[:trig]
        plus = before.index("+")
        a = int("".join(x for x in before[:plus] if x in DIGITS))
        b = int("".join(x for x in before[plus + 1 :] if x in DIGITS))
        text = str(a + b)
        m = sum(1 for x in tokens[trig + 1 : i + 1] if x in DIGITS)
        out.append(text[m] if m < len(text) else END)
    return out
