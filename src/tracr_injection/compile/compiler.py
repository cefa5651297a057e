"""`compile_program`: RASP program in, validated and cached PyTorch teacher out.

The stages: check the vocabulary and that tracr supports the program; look the program up
in the artifact cache (a hit loads safetensors + JSON, no JAX); otherwise compile with
tracr (fast matrix assembly) at an automatically chosen `mlp_exactness`, convert to
torch, validate against the RASP evaluator on random inputs up to `max_seq_len`, retry
with a larger exactness if validation fails, and save the artifact.  `compile_spec` does the
same for a registered `ProgramSpec` (its build, vocabulary, causal flag and sampled inputs).
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracr.rasp import rasp

from tracr_injection.compile.convert import teacher_from_compilation
from tracr_injection.compile.errors import CompiledModelMismatchError, InvalidInputError
from tracr_injection.compile.exactness import exactness_candidates
from tracr_injection.compile.fingerprint import program_hash
from tracr_injection.compile.teacher import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, TeacherModel
from tracr_injection.compile.tracr_pipeline import (
    check_supported,
    check_supported_on_inputs,
    check_vocab,
    run_tracr,
)
from tracr_injection.compile.validate import ValidationReport, random_inputs, validate_teacher
from tracr_injection.errors import InvalidArgumentError
from tracr_injection.paths import teachers_dir

if TYPE_CHECKING:
    from tracr_injection.programs.registry import ProgramSpec

log = logging.getLogger(__name__)

MAX_REPORTED_MISMATCHES = 5


def tracr_version() -> str:
    """The installed tracr distribution's version."""
    return importlib.metadata.version("tracr-pypi")


def artifact_dir(name: str, digest: str, cache_dir: Path | None = None) -> Path:
    """Where the artifact of program `name` with hash `digest` lives in the cache."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return (cache_dir or teachers_dir()) / f"{safe}-{digest[:16]}"


def compile_program(
    program: rasp.SOp,
    vocab: Iterable[Any],
    max_seq_len: int,
    causal: bool = False,
    *,
    name: str | None = None,
    mlp_exactness: int | None = None,
    validation_inputs: Sequence[Sequence[Any]] = (),
    num_random_inputs: int = 256,
    seed: int = 0,
    accept_mismatch: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> TeacherModel:
    """Compile a RASP program with tracr into a validated PyTorch `TeacherModel`.

    Args:
      program: any `tracr.rasp` SOp (it must use `rasp.tokens`).
      vocab: the input symbols (must not contain the compiler's BOS/PAD names).
      max_seq_len: longest input (without BOS) the teacher accepts.
      causal: compile with a causal attention mask (and validate with `causal_eval`).
      name: artifact name; defaults to the program's name.
      mlp_exactness: force tracr's exactness; by default candidates are chosen from
        `max_seq_len` and tried until one validates.
      validation_inputs: inputs to validate on besides `num_random_inputs` random ones
        (e.g. balanced strings for Dyck, which uniform sampling rarely produces).
      accept_mismatch: keep a model that disagrees with RASP (recorded in its manifest)
        instead of raising `CompiledModelMismatchError`.
      cache_dir: artifact cache (default `paths.teachers_dir()`: `$TRACR_INJECTION_CACHE/teachers`).
      use_cache: load a cached artifact when one exists (a fresh compile is always saved).
    """
    check_max_seq_len(max_seq_len)
    vocab_set = check_vocab(vocab)
    check_supported(program)
    vocab_list = sorted(vocab_set, key=repr)
    name = name or program.name
    candidates = [mlp_exactness] if mlp_exactness else exactness_candidates(max_seq_len)
    digest = program_hash(
        program, vocab_list, max_seq_len, causal, candidates, tracr_version(), FORMAT_VERSION
    )
    target = artifact_dir(name, digest, Path(cache_dir) if cache_dir else None)
    if use_cache and (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file():
        log.info("Loading cached teacher %s", target)
        return TeacherModel.from_pretrained(target)

    inputs = [list(t) for t in validation_inputs] + random_inputs(
        vocab_list, max_seq_len, num_random_inputs, seed
    )
    for tokens in inputs:
        if len(tokens) > max_seq_len:
            raise InvalidInputError(f"Validation input of length {len(tokens)} exceeds max_seq_len {max_seq_len}.")
    check_supported_on_inputs(program, inputs, causal)

    attempts: list[tuple[TeacherModel, ValidationReport]] = []
    unsettled_means: list[str] = []
    for exactness in candidates:
        start = time.perf_counter()
        compilation = run_tracr(program, vocab_set, max_seq_len, causal, exactness)
        teacher = teacher_from_compilation(
            compilation,
            program_name=name,
            program_hash=digest,
            vocab=vocab_list,
            max_seq_len=max_seq_len,
            causal=causal,
            mlp_exactness=exactness,
            tracr_version=tracr_version(),
        )
        teacher.config.compile_seconds = round(time.perf_counter() - start, 3)
        unsettled_means = compilation.unsettled_means
        expressions = {v.name: v.expr for v in compilation.variables.values()}
        report = validate_teacher(teacher, expressions, inputs)
        teacher.config.validation = report.summary()
        attempts.append((teacher, report))
        if report.passed:
            break
        log.warning("mlp_exactness=%s failed validation: %s", exactness, report.mismatches[0])

    teacher, report = min(attempts, key=lambda a: len(a[1].mismatches))
    if not report.passed and not accept_mismatch:
        raise CompiledModelMismatchError(describe_failure(name, attempts, unsettled_means))
    save_artifact(teacher, target)
    return teacher


def compile_spec(spec: ProgramSpec, max_seq_len: int | None = None, **kwargs: Any) -> TeacherModel:
    """Compile (or load from cache) the teacher of a registered program at `max_seq_len` (default: the
    spec's), validated on its sampled inputs too (only on those when uniform random inputs are
    meaningless for it); `kwargs` go to `compile_program`."""
    length = spec.max_seq_len if max_seq_len is None else max_seq_len
    if length < 1:
        raise InvalidArgumentError(f"max_seq_len (--max-len) must be >= 1, got {length}.")
    kwargs.setdefault(
        "validation_inputs",
        spec.validation_inputs(length, count=256 if not spec.uniform_random_inputs else 64),
    )
    if not spec.uniform_random_inputs:
        kwargs.setdefault("num_random_inputs", 0)
    return compile_program(spec.build(length), spec.vocab, length, spec.causal, name=spec.name, **kwargs)


def check_max_seq_len(max_seq_len: Any) -> None:
    """Raise `InvalidInputError` unless `max_seq_len` is a positive integer."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise InvalidInputError(
            f"max_seq_len must be a positive integer (the longest input, without BOS, the teacher "
            f"accepts), got {max_seq_len!r}: pass e.g. max_seq_len=16."
        )


def describe_failure(
    name: str, attempts: list[tuple[TeacherModel, ValidationReport]], unsettled_means: Sequence[str] = ()
) -> str:
    """Error text naming the inputs and variables where each attempt went wrong, and the numerical
    means whose values could not be settled (`compile.value_sets`), with `fraction_mean` as their fix."""
    lines = [f"The compiled model of {name!r} disagrees with the RASP evaluator:"]
    for teacher, report in attempts:
        lines.append(
            f"  mlp_exactness={teacher.config.mlp_exactness}: {len(report.mismatches)} mismatches, e.g."
        )
        lines.extend(f"    - {m}" for m in report.mismatches[:MAX_REPORTED_MISMATCHES])
    if unsettled_means:
        lines.append(
            f"The numerical mean(s) {', '.join(unsettled_means)} may average several 0/1 values into "
            "shares k/n, which tracr's value inference does not list (too many values to check here): "
            "if so, mark each with tracr_injection.fraction_mean(rasp.numerical(rasp.Aggregate(...)))."
        )
    lines.append(
        "Pass mlp_exactness=... to try another value, shorten max_seq_len, or "
        "accept_mismatch=True to keep the model anyway (recorded in its manifest)."
    )
    return "\n".join(lines)


def save_artifact(teacher: TeacherModel, target: Path) -> Path:
    """Save atomically: write to a temporary sibling folder, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    teacher.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
