"""Task accuracy: greedy exact match on the in-distribution test split and every OOD split.

In: a causal LM, its tokenizer and a `Task`.  Out: per split a `SplitAccuracy` (examples,
correct answers, accuracy, a breakdown table per task, e.g. Dyck by yes/no and Count/Sum by
answer and input length, and every prediction as text).  Prompts and answers come from the
token bridge, so the LM is scored on exactly the tokens it was trained on: an answer is right
iff greedy decoding emits its tokens and then EOS.  Splits the teacher cannot represent are
scored too: the LM needs no teacher.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from tracr_injection.evaluate.generation import greedy_generate
from tracr_injection.inject.data import run_subset
from tracr_injection.tasks import Example, Task, TokenBridge

SAMPLES_PER_OUTCOME = 3
LENGTH_BIN = 10

BreakdownKey = Callable[[Example], str]


def answer_word(example: Example) -> str:
    """The answer without its leading space (Dyck: "yes" = balanced, "no" = unbalanced)."""
    return example.answer_text.strip()


def answer_digits(example: Example) -> str:
    """How many digits the answer has."""
    return str(sum(ch.isdigit() for ch in example.answer_text))


def answer_symbols(example: Example) -> str:
    """How many answer segments (symbols) the answer has: the generic answer length."""
    return str(len(example.answer))


def length_bin(example: Example) -> str:
    """The input length (`meta["length"]`, in symbols) as a bin of width LENGTH_BIN, e.g. "30-39"."""
    low = example.meta["length"] // LENGTH_BIN * LENGTH_BIN
    return f"{low}-{low + LENGTH_BIN - 1}"


def operand_digits(example: Example) -> str:
    """Digits of each operand of a `a + b =` prompt, e.g. "3+4"."""
    operands = example.prompt_text.removesuffix(" =").split(" + ")
    return "+".join(str(sum(ch.isdigit() for ch in operand)) for operand in operands)


BREAKDOWNS: dict[str, dict[str, BreakdownKey]] = {
    "dyck": {"by_answer": answer_word, "by_input_length": length_bin},
    "dyck_frac": {"by_answer": answer_word, "by_input_length": length_bin},
    "count": {"by_answer_length": answer_digits, "by_input_length": length_bin},
    "sum": {"by_answer_length": answer_digits, "by_input_length": operand_digits},
}
DEFAULT_BREAKDOWNS: dict[str, BreakdownKey] = {"by_answer_length": answer_symbols}
"""Per task, the named ways to group its examples (a key function each); other tasks get the default."""


@dataclasses.dataclass
class Prediction:
    """One scored example: prompt, expected and generated text (EOS written out), and the verdict."""

    prompt: str
    expected: str
    generated: str
    correct: bool
    meta: dict[str, Any]


@dataclasses.dataclass
class SplitAccuracy:
    """Greedy exact-match accuracy of one split, its breakdowns and every prediction."""

    task: str
    split: str
    kind: str
    n: int
    correct: int
    accuracy: float
    breakdowns: dict[str, dict[str, dict[str, float]]]
    predictions: list[Prediction]

    def samples(self) -> list[Prediction]:
        """A few wrong and a few right predictions (the first SAMPLES_PER_OUTCOME of each)."""
        wrong = [p for p in self.predictions if not p.correct][:SAMPLES_PER_OUTCOME]
        right = [p for p in self.predictions if p.correct][:SAMPLES_PER_OUTCOME]
        return wrong + right

    def to_dict(self, all_predictions: bool = False) -> dict[str, Any]:
        """JSON-ready summary with `samples` (a few predictions), plus `predictions` (all) if asked."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "predictions"}
        out["samples"] = [dataclasses.asdict(p) for p in self.samples()]
        if all_predictions:
            out["predictions"] = [dataclasses.asdict(p) for p in self.predictions]
        return out


def natural_order(key: str) -> tuple[list[int], str]:
    """Sort key putting "5-9" before "10-19" and "2+3" before "3+3" (numbers compared as numbers)."""
    return [int(n) for n in re.findall(r"\d+", key)], key


def breakdown(
    examples: Sequence[Example], correct: Sequence[bool], key: BreakdownKey
) -> dict[str, dict[str, float]]:
    """Per group of `key`: examples, correct ones and accuracy, groups in natural order."""
    groups: dict[str, list[bool]] = {}
    for example, ok in zip(examples, correct):
        groups.setdefault(key(example), []).append(ok)
    return {
        name: {
            "n": len(groups[name]),
            "correct": sum(groups[name]),
            "accuracy": sum(groups[name]) / len(groups[name]),
        }
        for name in sorted(groups, key=natural_order)
    }


def split_accuracy(
    model: Any,
    tokenizer: Any,
    task: Task,
    split: str,
    *,
    max_examples: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    forced_correct: Sequence[bool] | None = None,
) -> SplitAccuracy:
    """Greedy exact-match accuracy on one split (a seeded subset of `max_examples` if given).

    Decodes at most as many tokens as the longest answer (EOS included): enough to decide every
    example, since an answer is right iff its tokens come first.  `forced_correct`, per chosen example
    whether teacher forcing gets the whole answer right (`split_pass`), is the same verdict (see
    `inject.answers.answers_correct`): given it, only the wrong examples are decoded, for their text.
    """
    examples = task.examples(split)
    chosen = [examples[i] for i in run_subset(len(examples), max_examples or len(examples), seed)]
    bridged = TokenBridge(tokenizer, task).bridge_all(chosen)
    prompts = [b.input_ids[: b.prompt_len] for b in bridged]
    answers = [b.input_ids[b.prompt_len :] for b in bridged]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoded = [i for i in range(len(chosen)) if forced_correct is None or not forced_correct[i]]
    generated = [list(a) for a in answers]  # a right answer is generated as itself, EOS included
    if decoded:
        new_tokens = greedy_generate(
            model,
            [prompts[i] for i in decoded],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            max_new_tokens=max(len(a) for a in answers),
            batch_size=batch_size,
        )
        for i, tokens in zip(decoded, new_tokens):
            generated[i] = tokens
    # `generated` stops at its first EOS, so with the EOS ending `a` this prefix test is exact match
    correct = [g[: len(a)] == a for g, a in zip(generated, answers)]
    keys = BREAKDOWNS.get(task.name, DEFAULT_BREAKDOWNS)
    return SplitAccuracy(
        task=task.name,
        split=split,
        kind=task.split_spec(split).kind,
        n=len(chosen),
        correct=sum(correct),
        accuracy=sum(correct) / len(chosen),
        breakdowns={name: breakdown(chosen, correct, key) for name, key in keys.items()},
        predictions=[
            Prediction(e.prompt_text, tokenizer.decode(a), tokenizer.decode(g), ok, e.meta)
            for e, a, g, ok in zip(chosen, answers, generated, correct)
        ],
    )


def task_accuracy(
    model: Any,
    tokenizer: Any,
    task: Task,
    splits: Sequence[str] | None = None,
    *,
    max_examples: int | None = None,
    batch_size: int = 64,
) -> dict[str, SplitAccuracy]:
    """`split_accuracy` on each of `splits` (default: every split but train, LM-only ones included)."""
    names = splits if splits is not None else [s.name for s in task.splits if s.kind != "train"]
    return {
        name: split_accuracy(model, tokenizer, task, name, max_examples=max_examples, batch_size=batch_size)
        for name in names
    }
