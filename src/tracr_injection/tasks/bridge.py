"""The token bridge: from an `Example` to LM token ids and one teacher symbol per LM token.

In: an `Example` (segments tagged with program symbols), a Hugging Face tokenizer and the
task's conventions.  Out: a `BridgedExample` with the LM's input ids, the teacher's input
symbols position by position (the compiled BOS is prepended only when the teacher runs),
the task-loss labels (exactly the answer tokens) and the program output expected at every
position that predicts an answer token.

Tokenizers merge symbols (SmolLM2 makes `' (['` one token), so each segment is tokenized on
its own: a symbol segment must become one token carrying the symbol, plus optional
whitespace-only tokens; anything else raises `SymbolTokenizationError` naming the token.
The trigger is placed positionally, on the token just before the answer's first
symbol-bearing token, so the teacher's output at a position is what the LM predicts next
(e.g. SmolLM2 writes `' 579'` as `' '`, `'5'`, `'7'`, `'9'`: the trigger is the space).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracr_injection.errors import TracrInjectionError
from tracr_injection.programs.paper import FILLER, TRIGGER
from tracr_injection.tasks.base import Example, Segment, Task

IGNORE_INDEX = -100  # Hugging Face's "no loss here" label


class SymbolTokenizationError(TracrInjectionError):
    """A program symbol that the tokenizer cannot give as a single token."""


class TeacherCannotRepresentError(TracrInjectionError):
    """Examples the compiled teacher cannot represent were about to be fed to it."""


@dataclasses.dataclass
class BridgedExample:
    """One example as LM tokens and aligned teacher symbols (all lists have one entry per LM token).

    `labels[p]` is the token id at answer tokens and IGNORE_INDEX elsewhere (Hugging Face
    convention: the model at p-1 predicts it).  `expected[p]` is the program output the
    teacher must give at p, where p predicts an answer token that carries one (else None).
    """

    input_ids: list[int]
    tokens: list[str]
    teacher_symbols: list[str]
    labels: list[int]
    expected: list[str | None]
    prompt_len: int
    trigger_index: int

    @property
    def answer_positions(self) -> list[int]:
        """Positions whose next token is an answer token (where the task loss applies)."""
        return [p - 1 for p, label in enumerate(self.labels) if label != IGNORE_INDEX]

    def __len__(self) -> int:
        return len(self.input_ids)


class TokenBridge:
    """Bridges examples of one task for one tokenizer (segment tokenizations are memoised)."""

    def __init__(self, tokenizer: Any, task: Task):
        self.tokenizer = tokenizer
        self.task = task
        self._segments: dict[str, tuple[list[int], list[str]]] = {}
        self.prefix_ids = special_prefix(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        if task.append_eos and self.eos_id is None:
            raise SymbolTokenizationError(
                f"Task {task.name!r} ends answers with the end-of-sequence token, but the tokenizer "
                f"{type(tokenizer).__name__} has none; set tokenizer.eos_token."
            )

    def tokenize_segment(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids of `text` tokenized on its own, and each token's text; checks the round trip."""
        if text not in self._segments:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces = [self.tokenizer.decode([i]) for i in ids]
            if "".join(pieces) != text:
                raise SymbolTokenizationError(
                    f"Tokenizing {text!r} on its own and decoding it gives {''.join(pieces)!r}; "
                    "the bridge needs a tokenizer that reproduces each segment's text."
                )
            self._segments[text] = (ids, pieces)
        return self._segments[text]

    def segment_symbols(self, segment: Segment) -> tuple[list[int], list[str], list[str], list[str | None]]:
        """The segment's ids, token texts, teacher symbol per token and expected output per token.

        The symbol (and the output) sit on the segment's one non-whitespace token; for a
        segment that is an output but no input symbol (Dyck's `' yes'`), on its first one.
        """
        ids, pieces = self.tokenize_segment(segment.text)
        carriers = [i for i, piece in enumerate(pieces) if piece.strip()]
        symbols: list[str] = [FILLER] * len(ids)
        outputs: list[str | None] = [None] * len(ids)
        if segment.symbol is not None:
            if len(carriers) != 1 or pieces[carriers[0]].strip() != segment.text.strip():
                raise SymbolTokenizationError(
                    f"Program symbol {segment.symbol!r} (text {segment.text!r}) is tokenized as {pieces!r} "
                    f"by {type(self.tokenizer).__name__}; it must be one token (plus whitespace-only "
                    "tokens). Choose a symbol spelling the tokenizer keeps whole, or another tokenizer."
                )
            symbols[carriers[0]] = segment.symbol
        if segment.output is not None and carriers:
            outputs[carriers[0]] = segment.output
        return ids, pieces, symbols, outputs

    def __call__(self, example: Example) -> BridgedExample:
        """Bridge one example."""
        ids = list(self.prefix_ids)
        pieces = [self.tokenizer.decode([i]) for i in ids]
        symbols = [FILLER] * len(ids)
        outputs: list[str | None] = [None] * len(ids)
        prompt_len = 0
        for part, segments in (("prompt", example.prompt), ("answer", example.answer)):
            for segment in segments:
                seg_ids, seg_pieces, seg_symbols, seg_outputs = self.segment_symbols(segment)
                ids += seg_ids
                pieces += seg_pieces
                symbols += seg_symbols
                outputs += seg_outputs
            if part == "prompt":
                prompt_len = len(ids)
        if self.task.append_eos:
            ids.append(self.eos_id)
            pieces.append(self.tokenizer.decode([self.eos_id]))
            symbols.append(FILLER)
            outputs.append(self.task.end_output)
        return self._finish(example, ids, pieces, symbols, outputs, prompt_len)

    def _finish(
        self,
        example: Example,
        ids: list[int],
        pieces: list[str],
        symbols: list[str],
        outputs: list[str | None],
        prompt_len: int,
    ) -> BridgedExample:
        """Place the trigger, the labels and the expected outputs (shifted one to the left)."""
        content = [p for p in range(prompt_len, len(ids)) if pieces[p].strip()]
        if not content or content[0] == 0:
            raise TracrInjectionError(f"Example {example.prompt_text!r} has no answer token to predict.")
        trigger = content[0] - 1
        if symbols[trigger] != FILLER:
            raise TracrInjectionError(
                f"The token before the answer ({pieces[trigger]!r}) is the program symbol "
                f"{symbols[trigger]!r}; the prompt must end with a non-symbol token for the trigger."
            )
        symbols[trigger] = TRIGGER
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        expected = outputs[1:] + [None]
        return BridgedExample(
            input_ids=ids,
            tokens=pieces,
            teacher_symbols=symbols,
            labels=labels,
            expected=expected,
            prompt_len=prompt_len,
            trigger_index=trigger,
        )

    def bridge_all(self, examples: Sequence[Example]) -> list[BridgedExample]:
        """Bridge a list of examples."""
        return [self(e) for e in examples]


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before any text (e.g. Llama's BOS); empty for GPT-2 and SmolLM2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return (
        list(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain) :] == plain else []
    )


def teacher_inputs(
    bridged: Sequence[BridgedExample], task: Task, split: str, max_seq_len: int
) -> list[list[str]]:
    """Teacher symbol sequences of a split, refusing a split the teacher cannot represent."""
    reason = teacher_blocker(bridged, task, split, max_seq_len)
    if reason:
        raise TeacherCannotRepresentError(
            f"Split {split!r} of task {task.name!r} is for evaluating the LM only: {reason}."
        )
    return [b.teacher_symbols for b in bridged]


def teacher_blocker(
    bridged: Sequence[BridgedExample], task: Task, split: str, max_seq_len: int
) -> str | None:
    """Why the teacher cannot represent this bridged split (None if it can)."""
    static = task.split_spec(split).teacher_blocker
    if static:
        return static
    too_long = [len(b) for b in bridged if len(b) > max_seq_len]
    if too_long:
        return (
            f"{len(too_long)} of {len(bridged)} examples are longer (up to {max(too_long)} tokens) "
            f"than the teacher's max_seq_len {max_seq_len}"
        )
    return None


def describe_split(task: Task, split: str, bridge: TokenBridge) -> dict[str, Any]:
    """Facts about a split for this tokenizer: size, description, token lengths, teacher reach."""
    spec = task.split_spec(split)
    bridged = bridge.bridge_all(task.examples(split))
    lengths = [len(b) for b in bridged]
    return {
        "split": split,
        "kind": spec.kind,
        "size": len(bridged),
        "seed": spec.seed,
        "description": spec.description,
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "teacher_max_seq_len": task.teacher_max_len,
        "teacher_blocker": teacher_blocker(bridged, task, split, task.teacher_max_len),
    }


def export_bridged(examples: Sequence[Example], bridge: TokenBridge, path: str | Path) -> Path:
    """Write examples with their LM tokens and teacher symbols to JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for example in examples:
            record = example.to_json()
            bridged = bridge(example)
            record.update(
                input_ids=bridged.input_ids,
                lm_tokens=bridged.tokens,
                teacher_symbols=bridged.teacher_symbols,
                answer_positions=bridged.answer_positions,
            )
            f.write(json.dumps(record) + "\n")
    return path
