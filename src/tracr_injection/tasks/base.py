"""What a task is: a registered program, a prompt format, and named, seeded data splits.

In: a registered RASP program name and plain-Python generators of task instances.  Out:
`Example`s (prompt and answer as `Segment`s, each piece of text tagged with the program
symbol it stands for) in named `SplitSpec` splits, deterministic for a seed, never
overlapping the training split, exportable to JSONL.  The token bridge
(`tracr_injection.tasks.bridge`) turns an `Example` into LM tokens and teacher symbols.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tracr_injection.errors import InvalidArgumentError, TracrInjectionError


class UnknownSplitError(TracrInjectionError):
    """A split name the task does not define."""


class UnknownTeacherError(TracrInjectionError, ValueError):
    """A program that is not one of the task's teachers."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of prompt or answer text.

    `symbol` is the program input symbol the text stands for (None: the text is filler for
    the teacher); a symbol segment must become exactly one LM token carrying the symbol, plus
    optional whitespace-only tokens.  `output` is the program output expected at the position
    that predicts this segment's symbol-bearing token (answer segments only).
    """

    text: str
    symbol: str | None = None
    output: str | None = None


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: prompt and answer segments plus facts about it (`meta`)."""

    prompt: tuple[Segment, ...]
    answer: tuple[Segment, ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    @property
    def prompt_text(self) -> str:
        """The prompt as the LM reads it."""
        return "".join(s.text for s in self.prompt)

    @property
    def answer_text(self) -> str:
        """The answer the LM must produce (exact match target)."""
        return "".join(s.text for s in self.answer)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record (text, answer, segments, meta)."""
        return {
            "prompt": self.prompt_text,
            "answer": self.answer_text,
            "prompt_segments": [dataclasses.asdict(s) for s in self.prompt],
            "answer_segments": [dataclasses.asdict(s) for s in self.answer],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Example:
        """Inverse of `to_json`."""
        return cls(
            prompt=tuple(Segment(**s) for s in record["prompt_segments"]),
            answer=tuple(Segment(**s) for s in record["answer_segments"]),
            meta=record.get("meta", {}),
        )


ExampleSampler = Callable[[random.Random], Example]


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """A named split: `size` examples drawn with `seed` from `sample`.

    `exhaustive`, when given, replaces sampling: it lists every example of the split (used
    for small finite splits and for the held-out-pairs design of the sum task).
    `teacher_blocker` says why the compiled teacher cannot represent the split (a symbol
    outside its vocabulary, operands outside its domain); such a split is for evaluating
    the LM only.  `disjoint_from` names other non-train splits whose prompts this one must not reuse
    (every split already avoids the training prompts), for splits whose distribution overlaps theirs.
    """

    name: str
    size: int
    seed: int
    description: str
    sample: ExampleSampler | None = None
    exhaustive: Callable[[], list[Example]] | None = None
    teacher_blocker: str | None = None
    kind: str = "ood"  # "train", "test" (in distribution) or "ood"
    disjoint_from: tuple[str, ...] = ()

    def generate(self, exclude: set[str]) -> list[Example]:
        """The split's examples: deterministic, unique prompts, none whose prompt is in `exclude`."""
        if self.exhaustive is not None:
            return [e for e in self.exhaustive() if e.prompt_text not in exclude][: self.size]
        rng = random.Random(self.seed)
        seen = set(exclude)
        out: list[Example] = []
        attempts = 0
        while len(out) < self.size:
            attempts += 1
            if attempts > 50 * self.size + 1000:
                raise TracrInjectionError(
                    f"Split {self.name!r}: could only draw {len(out)} distinct examples of "
                    f"{self.size}; the distribution is too small for this size."
                )
            example = self.sample(rng)
            if example.prompt_text not in seen:
                seen.add(example.prompt_text)
                out.append(example)
        return out


@dataclasses.dataclass
class Task:
    """A task: program, prompt format (inside the samplers), splits and answer conventions.

    `program` names a registered program compiled at `teacher_max_len` (the default teacher);
    `teachers` names other registered programs that can teach the task instead (same symbols, same
    outputs at the answer positions); `end_output` is the program output expected where the LM must
    predict the end-of-sequence token after the answer (None: not checked).
    """

    name: str
    program: str
    teacher_max_len: int
    description: str
    splits: list[SplitSpec]
    end_output: str | None = None
    append_eos: bool = True
    teachers: tuple[str, ...] = ()
    _cache: dict[str, list[Example]] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.splits]
        if kinds.count("train") != 1:
            raise InvalidArgumentError(f"Task {self.name!r} needs exactly one train split, has {kinds.count('train')}.")
        names = [s.name for s in self.splits]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"Task {self.name!r} has duplicate split names: {names}")

    @property
    def split_names(self) -> list[str]:
        """Split names in definition order (train first by convention)."""
        return [s.name for s in self.splits]

    def split_spec(self, name: str) -> SplitSpec:
        """The `SplitSpec` called `name`, or a clear error listing the known ones."""
        for spec in self.splits:
            if spec.name == name:
                return spec
        raise UnknownSplitError(
            f"Task {self.name!r} has no split {name!r}; splits: {', '.join(self.split_names)}"
        )

    @property
    def train_split(self) -> SplitSpec:
        """The training split."""
        return next(s for s in self.splits if s.kind == "train")

    def examples(self, split: str) -> list[Example]:
        """The examples of `split` (generated once per process; non-train splits exclude train prompts)."""
        if split not in self._cache:
            spec = self.split_spec(split)
            others = () if spec.kind == "train" else ("train", *spec.disjoint_from)
            exclude = {e.prompt_text for other in others for e in self.examples(other)}
            self._cache[split] = spec.generate(exclude)
        return self._cache[split]

    def teacher_program(self, program: str | None = None) -> str:
        """The program that teaches this task: `program` if it is one of the task's teachers, the
        default (`self.program`) for None."""
        if program is None or program == self.program:
            return self.program
        if program not in self.teachers:
            raise UnknownTeacherError(
                f"Task {self.name!r} cannot be taught by {program!r}; its teachers: "
                f"{', '.join((self.program, *self.teachers))} (the first is the default)."
            )
        return program

    def teacher(self, program: str | None = None, **compile_kwargs: Any) -> Any:
        """The compiled teacher (`teacher_program(program)`; cached on disk after the first compile)."""
        from tracr_injection.compile.compiler import compile_spec
        from tracr_injection.programs.registry import get_program

        return compile_spec(get_program(self.teacher_program(program)), self.teacher_max_len, **compile_kwargs)


def export_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Write one JSON record per example to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for example in examples:
            f.write(json.dumps(example.to_json()) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples written by `export_jsonl`."""
    return [Example.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line]


def symbol_segments(symbols: Iterable[str], sep: str = " ", first_sep: str = " ") -> list[Segment]:
    """One symbol segment per symbol, `first_sep` before the first and `sep` before the others."""
    return [Segment((first_sep if i == 0 else sep) + s, symbol=s) for i, s in enumerate(symbols)]


def number_segments(number: str, lead: str = " ", answer: bool = False) -> list[Segment]:
    """A number one digit per segment (non-digits as filler text), `lead` before the first.

    For an answer, each digit is also the program output expected where it is predicted.
    """
    out = []
    for i, ch in enumerate(number):
        text = (lead if i == 0 else "") + ch
        if ch.isdigit():
            out.append(Segment(text, symbol=ch, output=ch if answer else None))
        else:
            out.append(Segment(text))
    return out
