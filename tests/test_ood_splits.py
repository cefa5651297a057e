"""The Dyck splits that separate generalisation from bias: `balanced_long` (all yes) and the authors'
`length_5_90`; lengths, answers, disjointness and determinism, checked against the Dyck reference."""

from __future__ import annotations

from tracr_injection.programs.paper import DYCK_PAIRS, dyck_reference
from tracr_injection.tasks import get_task


def brackets_of(example) -> list[str]:
    """The bracket string of a Dyck example (its symbol segments)."""
    return [s.symbol for s in example.prompt if s.symbol is not None]


def test_balanced_long_is_all_yes_at_lengths_32_to_90():
    task = get_task("dyck")
    examples = task.examples("balanced_long")
    assert len(examples) == 1000
    lengths = [e.meta["length"] for e in examples]
    assert min(lengths) >= 32 and max(lengths) <= 90 and all(n % 2 == 0 for n in lengths)
    assert {e.answer_text for e in examples} == {" yes"}
    assert all(dyck_reference(brackets_of(e), DYCK_PAIRS) == "yes" for e in examples)


def test_length_5_90_draws_the_authors_lengths_half_balanced():
    examples = get_task("dyck").examples("length_5_90")
    lengths = [e.meta["length"] for e in examples]
    assert min(lengths) == 5 and max(lengths) == 90
    balanced = sum(e.meta["source"] == "balanced" for e in examples)
    assert 430 <= balanced <= 570  # a fair coin over 1,000 draws
    assert all(dyck_reference(brackets_of(e), DYCK_PAIRS) == e.answer_text.strip() for e in examples)
    assert sum(n <= 30 for n in lengths) > 200  # the short strings the authors' split keeps


def test_new_splits_are_disjoint_from_every_other_and_deterministic():
    task = get_task("dyck")
    prompts = {s: {e.prompt_text for e in task.examples(s)} for s in task.split_names}
    for new in ("balanced_long", "length_5_90"):
        for other, texts in prompts.items():
            assert other == new or not prompts[new] & texts, (new, other)
        spec = task.split_spec(new)
        exclude = set().union(*(prompts[o] for o in ("train", *spec.disjoint_from)))
        assert [e.prompt_text for e in spec.generate(exclude)] == [e.prompt_text for e in task.examples(new)]
    assert get_task("dyck_frac").split_names == task.split_names
