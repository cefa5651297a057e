"""Tasks stage: prompts, splits, the token bridge (SmolLM2 and GPT-2 tokenizers) and teacher targets.

The teachers are compiled once per session at each task's length (real tracr, validated
against RASP); every split the teacher can represent is bridged and fed through it, and the
teacher must give the expected answer at every answer position.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from tracr_injection.hub import load_tokenizer
from tracr_injection.programs.paper import FILLER, TRIGGER, dyck_reference
from tracr_injection.programs.registry import get_program
from tracr_injection.tasks import (
    IGNORE_INDEX,
    Example,
    Segment,
    SplitSpec,
    SymbolTokenizationError,
    Task,
    TeacherCannotRepresentError,
    TokenBridge,
    get_task,
    read_jsonl,
    task_names,
    teacher_inputs,
)
from tracr_injection.tasks.base import UnknownTeacherError
from tracr_injection.tasks.bridge import describe_split, export_bridged
from tracr_injection.tasks.targets import TeacherTargets, precompute_targets

PAPER_TASKS = ("dyck", "count", "sum")
TOKENIZERS = ("smollm2", "gpt2")


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Each registered task's teacher, compiled once into a session cache."""
    cache = tmp_path_factory.mktemp("teachers")
    return {name: get_task(name).teacher(cache_dir=cache) for name in task_names()}


@pytest.fixture(scope="session", params=TOKENIZERS)
def tokenizer(request):
    return load_tokenizer(request.param)


def test_registered_tasks():
    assert set(PAPER_TASKS) | {"reverse"} <= set(task_names())
    with pytest.raises(KeyError, match="Unknown task 'nope'"):
        get_task("nope")


def test_dyck_frac_is_dyck_with_another_teacher():
    dyck, frac = get_task("dyck"), get_task("dyck_frac")
    assert (dyck.program, frac.program) == ("dyck_trigger", "dyck_frac_trigger")
    assert frac.split_names == dyck.split_names
    for split in ("test", "almost_balanced"):
        assert [e.prompt_text for e in frac.examples(split)] == [e.prompt_text for e in dyck.examples(split)]


def test_dyck_can_be_taught_by_the_authors_program():
    dyck = get_task("dyck")
    assert dyck.teacher_program() == dyck.teacher_program("dyck_trigger") == "dyck_trigger"
    assert dyck.teacher_program("dyck_authors_trigger") == "dyck_authors_trigger"
    with pytest.raises(UnknownTeacherError, match="'count_trigger'; its teachers: dyck_trigger, dyck_auth"):
        dyck.teacher_program("count_trigger")


def test_every_teacher_of_a_task_reads_the_same_symbols():
    """Splits say what the teacher can represent from its symbols and length, so a task's other
    teachers must read exactly the default teacher's symbols."""
    for name in task_names():
        task = get_task(name)
        for program in task.teachers:
            assert get_program(program).vocab == get_program(task.program).vocab, (name, program)


# ----------------------------------------------------------------------------- prompts


def test_prompts_render_as_in_the_paper():
    dyck = get_task("dyck").examples("test")[0]
    brackets = "".join(s.symbol for s in dyck.prompt if s.symbol)
    assert dyck.prompt_text == f"Are parenthesis here correctly matched? {brackets}\nAnswer:"
    assert dyck.answer_text == " " + dyck_reference(list(brackets), ("()", "[]", "{}", "<>"))

    count = get_task("count").examples("test")[0]
    words = [s.text.strip() for s in count.prompt[1:-1]]
    assert count.prompt_text == f"What is the number of 'X' in this text? {' '.join(words)}\nAnswer:"
    assert count.answer_text == f" {words.count('x')}"

    for example in get_task("sum").examples("test")[:50]:
        a, b = example.meta["a"], example.meta["b"]
        assert example.prompt_text == f"{a} + {b} ="
        assert example.answer_text == f" {a + b}"
    decimal = get_task("sum").examples("decimals")[0]
    a, b = decimal.meta["a"], decimal.meta["b"]
    assert decimal.prompt_text == f"{a:.2f} + {b:.2f} ="
    assert decimal.answer_text == f" {a + b:.2f}"

    rev = get_task("reverse").examples("test")[0]
    letters = [s.symbol for s in rev.prompt if s.symbol]
    assert rev.prompt_text == f"Reverse the letters: {' '.join(letters)}\nAnswer:"
    assert rev.answer_text == " " + " ".join(reversed(letters))


def test_split_distributions_match_the_paper():
    dyck = get_task("dyck")
    train = dyck.examples("train")
    assert len(train) == 20_000 and all(5 <= e.meta["length"] <= 30 for e in train)
    sources = [e.meta["source"] for e in train]
    assert 0.45 < sources.count("balanced") / len(train) < 0.55
    assert all(e.answer_text == " yes" for e in train if e.meta["source"] == "balanced")
    almost = dyck.examples("almost_balanced")
    assert all(e.answer_text == " no" and 15 <= e.meta["length"] <= 89 for e in almost)
    assert all("<" in e.prompt_text or ">" in e.prompt_text for e in dyck.examples("new_token"))
    assert all(31 <= e.meta["length"] <= 90 for e in dyck.examples("length"))

    count = get_task("count")
    assert all(5 <= e.meta["length"] <= 40 and " y" in e.prompt_text for e in count.examples("train"))
    assert [e.meta["count"] for e in count.examples("x_only")] == list(range(1, 41))
    assert all(" y" not in e.prompt_text and " z" in e.prompt_text for e in count.examples("replace_y"))
    assert all(41 <= e.meta["length"] <= 120 for e in count.examples("length"))

    add = get_task("sum")
    pairs = {(e.meta["a"], e.meta["b"]) for e in add.examples("train")}
    held_out = {(e.meta["a"], e.meta["b"]) for e in add.examples("test")}
    cascade = {a for a in range(100, 1000, 100)}
    grid = {(a, b) for a in range(450) for b in range(450)}
    assert pairs | held_out == {p for p in grid if sum(p) not in cascade}
    assert all(sum((e.meta["a"], e.meta["b"])) in cascade for e in add.examples("cascading_overflow"))
    assert all(max(e.meta["a"], e.meta["b"]) >= 1000 for e in add.examples("length"))


@pytest.mark.parametrize("name", [*PAPER_TASKS, "reverse"])
def test_splits_are_deterministic_and_never_overlap(name):
    task = get_task(name)
    prompts = {split: [e.prompt_text for e in task.examples(split)] for split in task.split_names}
    for split, texts in prompts.items():
        assert len(texts) == len(set(texts)) == task.split_spec(split).size or split == "train"
    for a, b in itertools.combinations(prompts, 2):
        assert not set(prompts[a]) & set(prompts[b]), f"{name}: {a} and {b} overlap"
    spec = task.split_spec("test")
    again = spec.generate({e.prompt_text for e in task.examples("train")})
    assert [e.prompt_text for e in again] == prompts["test"]


def test_jsonl_export_round_trip(tmp_path):
    task = get_task("count")
    examples = task.examples("x_only")
    bridge = TokenBridge(load_tokenizer("smollm2"), task)
    path = export_bridged(examples, bridge, tmp_path / "x_only.jsonl")
    assert read_jsonl(path) == examples
    record = json.loads(path.read_text().splitlines()[3])
    assert record["answer"] == " 4" and record["teacher_symbols"].count("x") == 4


# ----------------------------------------------------------------------------- bridge


@pytest.mark.parametrize("name", [*PAPER_TASKS, "reverse"])
def test_bridge_gives_one_symbol_per_token(name, tokenizer):
    task = get_task(name)
    bridge = TokenBridge(tokenizer, task)
    for split in task.split_names:
        for example in task.examples(split)[:200]:
            b = bridge(example)
            assert len(b.input_ids) == len(b.tokens) == len(b.teacher_symbols) == len(b.labels)
            text = tokenizer.decode(b.input_ids[: len(b.input_ids) - 1])
            assert text == example.prompt_text + example.answer_text
            wanted = [s.symbol for s in example.prompt + example.answer if s.symbol]
            got = [s for s in b.teacher_symbols if s not in (FILLER, TRIGGER)]
            assert got == wanted
            for token, symbol in zip(b.tokens, b.teacher_symbols):
                if symbol not in (FILLER, TRIGGER):
                    assert token.strip() == symbol
            assert b.teacher_symbols.count(TRIGGER) == 1
            answer = [i for i, label in enumerate(b.labels) if label != IGNORE_INDEX]
            assert answer == list(range(b.prompt_len, len(b.input_ids)))
            assert b.input_ids[-1] == tokenizer.eos_token_id


def test_bridge_splits_merged_symbols(tokenizer):
    """The tokenizer merges brackets in plain text; the bridge still gives one bracket per token."""
    task = get_task("dyck")
    bridge = TokenBridge(tokenizer, task)
    merged = 0
    for example in task.examples("test")[:100]:
        brackets = "".join(s.symbol for s in example.prompt if s.symbol)
        natural = tokenizer(example.prompt_text, add_special_tokens=False)["input_ids"]
        b = bridge(example)
        merged += len(natural) < b.prompt_len
        assert sum(s not in (FILLER, TRIGGER) for s in b.teacher_symbols) == len(brackets)
    assert merged > 50  # most prompts would merge brackets without the bridge


def test_answer_alignment_follows_the_real_tokens():
    """SmolLM2 writes ' 579' as ' ', '5', '7', '9': the trigger sits on the space; GPT-2 on ' ='."""
    task = get_task("sum")
    example = next(e for e in task.examples("test") if e.meta["a"] + e.meta["b"] >= 100)
    digits = str(example.meta["a"] + example.meta["b"])
    smol = TokenBridge(load_tokenizer("smollm2"), task)(example)
    assert smol.tokens[smol.trigger_index] == " " and smol.trigger_index == smol.prompt_len
    gpt2 = TokenBridge(load_tokenizer("gpt2"), task)(example)
    assert gpt2.tokens[gpt2.trigger_index] == " =" and gpt2.trigger_index == gpt2.prompt_len - 1
    for b in (smol, gpt2):
        due = [b.expected[p] for p in range(b.trigger_index, len(b) - 1)]
        assert due == [*digits, "end"]
        assert b.teacher_symbols[b.trigger_index] == TRIGGER


def test_dyck_answer_is_due_at_the_colon():
    task = get_task("dyck")
    b = TokenBridge(load_tokenizer("smollm2"), task)(task.examples("test")[0])
    assert b.tokens[b.trigger_index] == ":" and b.tokens[b.trigger_index + 1] in (" yes", " no")
    assert b.expected[b.trigger_index] == b.tokens[b.trigger_index + 1].strip()


def test_symbol_that_cannot_be_one_token_is_a_clear_error():
    task = Task(
        name="bad",
        program="count_trigger",
        teacher_max_len=16,
        description="",
        splits=[SplitSpec("train", 1, 0, "", lambda rng: None, kind="train")],
    )
    bridge = TokenBridge(load_tokenizer("gpt2"), task)
    example = Example((Segment("Count:"), Segment(" xylophone", symbol="x"), Segment(" =")), (Segment(" 1"),))
    with pytest.raises(SymbolTokenizationError, match=r"'x' \(text ' xylophone'\) is tokenized as \[.*\]"):
        bridge(example)


def test_lm_only_splits_never_reach_the_teacher():
    tokenizer = load_tokenizer("smollm2")
    for name, split, reason in [
        ("dyck", "new_token", "'<' and '>'"),
        ("sum", "decimals", "decimal point"),
        ("sum", "length", "4-digit"),
    ]:
        task = get_task(name)
        bridged = TokenBridge(tokenizer, task).bridge_all(task.examples(split)[:20])
        with pytest.raises(TeacherCannotRepresentError, match=reason):
            teacher_inputs(bridged, task, split, task.teacher_max_len)
    task = get_task("count")
    bridged = TokenBridge(tokenizer, task).bridge_all(task.examples("length")[:50])
    with pytest.raises(TeacherCannotRepresentError, match="longer .* than the teacher's max_seq_len 40"):
        teacher_inputs(bridged, task, "length", 40)
    assert describe_split(task, "length", TokenBridge(tokenizer, task))["teacher_blocker"] is None


# ----------------------------------------------------------------------------- teacher


@pytest.mark.parametrize("name", [*PAPER_TASKS, "dyck_frac", "reverse"])
def test_teacher_answers_every_representable_split(name, teachers, tmp_path):
    """1,000 examples per split (SmolLM2 tokens): the teacher's output is right at every answer position."""
    task, teacher = get_task(name), teachers[name]
    assert teacher.config.max_seq_len == task.teacher_max_len
    bridge = TokenBridge(load_tokenizer("smollm2"), task)
    checked = []
    for split in task.split_names[1:]:
        if task.split_spec(split).teacher_blocker:
            continue
        bridged = bridge.bridge_all(task.examples(split)[:1000])
        teacher_inputs(bridged, task, split, teacher.config.max_seq_len)
        manifest = precompute_targets(
            teacher, bridged, tmp_path / split, task=name, split=split, tokenizer="smollm2", progress=False
        )
        assert manifest.answer_accuracy == 1.0, (split, manifest.answer_accuracy)
        assert manifest.max_level_error <= 1e-5 and manifest.max_float16_error <= 1e-3
        checked.append(split)
    assert "test" in checked


def test_teacher_answers_with_gpt2_tokens(teachers, tmp_path):
    for name in PAPER_TASKS:
        task = get_task(name)
        bridged = TokenBridge(load_tokenizer("gpt2"), task).bridge_all(task.examples("test")[:300])
        manifest = precompute_targets(
            teachers[name],
            bridged,
            tmp_path / name,
            task=name,
            split="test",
            tokenizer="gpt2",
            progress=False,
        )
        assert manifest.answer_accuracy == 1.0


# ----------------------------------------------------------------------------- targets


def test_stored_targets_reproduce_every_level(teachers, tmp_path):
    task, teacher = get_task("dyck"), teachers["dyck"]
    bridge = TokenBridge(load_tokenizer("smollm2"), task)
    bridged = bridge.bridge_all(task.examples("test")[:300])
    precompute_targets(
        teacher,
        bridged,
        tmp_path,
        task="dyck",
        split="test",
        tokenizer="smollm2",
        shard_size=128,
        progress=False,
    )
    targets = TeacherTargets(tmp_path)
    targets.check_matches(bridged)
    assert len(targets) == 300 and targets.manifest.num_shards == 3
    picks = [0, 129, 299, 7]
    final, mask = targets.batch(picks)
    output, teacher_mask = teacher.run([bridged[i].teacher_symbols for i in picks])
    assert torch.equal(mask, teacher_mask[:, 1:])
    for level, resid in enumerate(output.residuals):
        want = resid[:, 1:] * mask[..., None]
        got = targets.at_level(final, level)
        assert (got - want).abs().max() <= 1e-3 * max(1.0, want.abs().max().item())
    decoded = teacher.decode_variable(final[0, : len(bridged[0])], teacher.config.output_variable)
    assert decoded == teacher.evaluate(bridged[0].teacher_symbols)


def test_targets_resume_and_reject_bad_files(teachers, tmp_path):
    task, teacher = get_task("reverse"), teachers["reverse"]
    bridged = TokenBridge(load_tokenizer("smollm2"), task).bridge_all(task.examples("test")[:200])
    kwargs = dict(task="reverse", split="test", tokenizer="smollm2", shard_size=64, progress=False)
    precompute_targets(teacher, bridged, tmp_path, **kwargs)
    first = tmp_path / "shard-00000.safetensors"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "shard-00002.safetensors").unlink()  # an interrupted run
    manifest = precompute_targets(teacher, bridged, tmp_path, **kwargs)
    assert first.stat().st_mtime_ns == stamp and manifest.answer_accuracy == 1.0
    TeacherTargets(tmp_path).check_matches(bridged)

    with pytest.raises(Exception, match="other teacher inputs"):
        TeacherTargets(tmp_path).check_matches(bridged[::-1])
    first.write_bytes(b"garbage")
    with pytest.raises(Exception, match="missing or corrupt"):
        TeacherTargets(tmp_path)
    (tmp_path / "targets.json").unlink()
    with pytest.raises(Exception, match="run the targets precompute"):
        TeacherTargets(tmp_path)


# ----------------------------------------------------------------------------- CLI


def test_cli_data_shows_tokens_and_symbols_side_by_side(tmp_path):
    from tracr_injection.cli.main import app

    out = tmp_path / "x.jsonl"
    result = CliRunner().invoke(
        app,
        ["data", "count", "--split", "x_only", "--show", "2", "--tokenizer", "gpt2", "--export", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert (
        "count/x_only example 1" in result.output and "' x'" in result.output and "compute" in result.output
    )
    assert len(read_jsonl(out)) == 40
    result = CliRunner().invoke(app, ["data", "sum", "--split", "decimals", "--targets", str(tmp_path / "t")])
    assert result.exit_code == 1 and "evaluating the LM only" in result.output
    result = CliRunner().invoke(app, ["data", "dyck", "--split", "nope"])
    assert result.exit_code == 1 and "no split 'nope'" in result.output
