"""`exactness_candidates`: a maximum sequence length in, tracr `mlp_exactness` values to try out.

tracr's numerical MLPs discretise values such as k/n (n <= max_seq_len + 1) with slopes
proportional to `mlp_exactness`.  Its default of 100 is too coarse beyond about 10 tokens
(adjacent fractions differ by about 1/((N+1)(N+2))) and silently gives wrong answers;
values of 1e7 and above lose float32 precision.  The values come in the order to try them:
every compile is validated, and a failed validation moves on to the next candidate.
"""

import math

MIN_EXACTNESS = 1_000
MAX_EXACTNESS = 1_000_000


def exactness_candidates(max_seq_len: int) -> list[int]:
    """Exactness values to try for `max_seq_len`, the preferred one first.

    The first is the smallest power of ten at least 2(N+1)(N+2), clamped to
    [MIN_EXACTNESS, MAX_EXACTNESS]; the next ones are ten and a hundred times larger,
    still within the float32-safe range.
    """
    needed = 2 * (max_seq_len + 1) * (max_seq_len + 2)
    first = 10 ** math.ceil(math.log10(needed))
    first = min(max(first, MIN_EXACTNESS), MAX_EXACTNESS)
    candidates = [first]
    while candidates[-1] * 10 <= MAX_EXACTNESS and len(candidates) < 3:
        candidates.append(candidates[-1] * 10)
    return candidates
