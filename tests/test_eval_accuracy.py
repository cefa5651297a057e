"""Evaluate stage, task accuracy: batched greedy decoding against one-by-one `generate` and a plain
no-cache argmax loop (tiny random Llama and GPT-2 with SmolLM2's tokenizer), and the accuracy metrics
against hand-computed counts for models whose answers are known by construction.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import build_tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tracr_injection.evaluate.accuracy import (
    breakdown,
    length_bin,
    operand_digits,
    split_accuracy,
    task_accuracy,
)
from tracr_injection.evaluate.generation import (
    GenerationError,
    generate_one_by_one,
    greedy_generate,
    left_padded,
    until_eos,
)
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.answers import answers_correct
from tracr_injection.inject.data import TaskData, run_subset
from tracr_injection.tasks import TokenBridge, get_task
from tracr_injection.tasks.count import count_example
from tracr_injection.tasks.sum import decimal_example, sum_example

MAX_NEW = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def boost_eos(model: torch.nn.Module, eos: int) -> torch.nn.Module:
    """Scale the EOS row of the (untied) LM head so some, not all, continuations stop early."""
    with torch.no_grad():
        model.lm_head.weight[eos] *= 4
    return model.eval()


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """A 4-block random Llama with wide-spread weights, so greedy outputs vary by prompt and step."""
    model = build_tiny_llama(
        tokenizer, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.5
    )
    return boost_eos(model, tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer):
    """A 2-block random GPT-2 (learned absolute positions) over SmolLM2's vocabulary."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(2)
    return boost_eos(GPT2LMHeadModel(config), tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """12 Dyck and 12 Count test prompts as bridged token ids (of 17 to 52 tokens)."""
    out = []
    for name in ("dyck", "count"):
        task = get_task(name)
        bridge = TokenBridge(tokenizer, task)
        out += [b.input_ids[: b.prompt_len] for b in bridge.bridge_all(task.examples("test")[:12])]
    return out


def argmax_loop(model, prompt: list[int], eos: int, max_new: int) -> list[int]:
    """Reference greedy decoding: a full forward pass per token, no cache, no padding, no `generate`."""
    ids: list[int] = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt) :]


def bigram_llama(tokenizer, rules: dict[int, int], default: int) -> LlamaForCausalLM:
    """A Llama whose next token is `rules[current token]`, else `default`: its answers are known.

    Blocks write nothing (zero output projections), so the last hidden state is the normalised embedding
    of the current token: dimension 0 is 1 for every token, dimension i is 10 for the i-th rule's
    source.  The LM head gives `default` +1 on dimension 0 and -2 on rule dimensions, and each rule's
    target +1 on its own dimension, so exactly one logit is positive (all others are 0).
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed_VD, head_VD = model.model.embed_tokens.weight, model.lm_head.weight
        embed_VD.zero_()
        head_VD.zero_()
        embed_VD[:, 0] = 1.0
        head_VD[default, 0] = 1.0
        for dim, (source, target) in enumerate(rules.items(), start=1):
            embed_VD[source, dim] = 10.0
            head_VD[target, dim] = 1.0
            head_VD[default, dim] = -2.0
    return model


def token_id(tokenizer, text: str) -> int:
    """The id of `text`, which must be one token."""
    (only,) = tokenizer(text, add_special_tokens=False)["input_ids"]
    return only


@pytest.fixture(scope="module")
def always_yes(tokenizer):
    """Answers ` yes` then EOS to every prompt."""
    yes = token_id(tokenizer, " yes")
    return bigram_llama(tokenizer, {yes: tokenizer.eos_token_id}, default=yes)


@pytest.fixture(scope="module")
def always_one(tokenizer):
    """Answers ` 1` (SmolLM2: `' '`, `'1'`) then EOS to every prompt."""
    space, one = token_id(tokenizer, " "), token_id(tokenizer, "1")
    return bigram_llama(tokenizer, {space: one, one: tokenizer.eos_token_id}, default=space)


# ----------------------------------------------------------------------------- generation


def test_left_padded_and_until_eos_by_hand():
    ids_BP, mask_BP = left_padded([[5, 6, 7], [8]], pad_token_id=0)
    assert ids_BP.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask_BP.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert until_eos([4, 2, 9, 2], eos_token_id=2) == [4, 2]
    assert until_eos([4, 9], eos_token_id=2) == [4, 9]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_batched_equals_one_by_one_equals_no_cache_loop(arch, prompts, tokenizer, request):
    model = request.getfixturevalue(arch)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    reference = [argmax_loop(model, p, eos, MAX_NEW) for p in prompts]
    batched = greedy_generate(
        model, prompts, eos_token_id=eos, pad_token_id=pad, max_new_tokens=MAX_NEW, batch_size=8
    )
    one_by_one = generate_one_by_one(
        model, prompts, eos_token_id=eos, pad_token_id=pad, max_new_tokens=MAX_NEW
    )
    assert batched == reference
    assert one_by_one == reference
    # the case is not degenerate: padding happens, outputs differ, some stop at EOS early and some run out
    assert len({len(p) for p in prompts}) > 8
    assert len({tuple(r) for r in reference}) > 8
    stopped = [r for r in reference if r[-1] == eos]
    assert 0 < len(stopped) < len(reference) and any(len(r) < MAX_NEW for r in stopped)


def test_eos_stops_each_row_and_order_survives_length_sorting(tiny_gpt2, prompts, tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs = {"eos_token_id": eos, "pad_token_id": pad, "max_new_tokens": MAX_NEW}
    outputs = greedy_generate(tiny_gpt2, prompts, batch_size=64, **kwargs)
    for out in outputs:
        assert eos not in out[:-1]
        assert out[-1] == eos or len(out) == MAX_NEW
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled = greedy_generate(tiny_gpt2, [prompts[i] for i in order], batch_size=7, **kwargs)
    assert shuffled == [outputs[i] for i in order]
    assert greedy_generate(tiny_gpt2, prompts, batch_size=1, **kwargs) == outputs


def test_generation_refuses_impossible_arguments(tiny_llama):
    with pytest.raises(GenerationError, match="empty"):
        greedy_generate(tiny_llama, [[1, 2], []], eos_token_id=2, pad_token_id=2, max_new_tokens=2)
    with pytest.raises(GenerationError, match="batch_size"):
        greedy_generate(tiny_llama, [[1, 2]], eos_token_id=2, pad_token_id=2, max_new_tokens=2, batch_size=0)


def test_generation_restores_training_mode(tiny_llama, prompts, tokenizer):
    tiny_llama.train()
    try:
        greedy_generate(tiny_llama, prompts[:2], eos_token_id=2, pad_token_id=2, max_new_tokens=1)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


# ----------------------------------------------------------------------------- metrics


def test_breakdown_keys_by_hand():
    assert operand_digits(sum_example(12, 345)) == "2+3"
    assert operand_digits(decimal_example(105, 30)) == "3+3"  # 1.05 + 0.30
    assert [length_bin(count_example(["x"] * n)) for n in (1, 9, 10, 40)] == ["0-9", "0-9", "10-19", "40-49"]
    examples = [count_example(["x"] * n) for n in (12, 3, 15, 4)]
    assert breakdown(examples, [True, False, False, False], length_bin) == {
        "0-9": {"n": 2, "correct": 0, "accuracy": 0.0},
        "10-19": {"n": 2, "correct": 1, "accuracy": 0.5},
    }


def test_always_yes_scores_exactly_the_balanced_strings(always_yes, tokenizer):
    dyck = get_task("dyck")
    result = split_accuracy(always_yes, tokenizer, dyck, "test", max_examples=40, batch_size=16, seed=3)
    examples = dyck.examples("test")
    chosen = [examples[i] for i in run_subset(len(examples), 40, 3)]
    balanced = sum(e.answer_text == " yes" for e in chosen)
    assert 0 < balanced < 40
    assert (result.n, result.correct, result.accuracy, result.kind) == (40, balanced, balanced / 40, "test")
    assert result.breakdowns["by_answer"] == {
        "no": {"n": 40 - balanced, "correct": 0, "accuracy": 0.0},
        "yes": {"n": balanced, "correct": balanced, "accuracy": 1.0},
    }
    assert [p.prompt for p in result.predictions] == [e.prompt_text for e in chosen]
    assert {p.generated for p in result.predictions} == {" yes<|im_end|>"}
    assert all(p.correct == (p.expected == " yes<|im_end|>") for p in result.predictions)
    summary = json.loads(json.dumps(result.to_dict()))
    assert [s["correct"] for s in summary["samples"]] == [False] * 3 + [True] * 3


def test_always_one_on_x_only_by_answer_and_input_length(always_one, tokenizer):
    result = split_accuracy(always_one, tokenizer, get_task("count"), "x_only", batch_size=16)
    # x_only holds n x's for n = 1..40: only n = 1 is answered right
    assert (result.n, result.correct, result.kind) == (40, 1, "ood")
    assert result.breakdowns["by_answer_length"] == {
        "1": {"n": 9, "correct": 1, "accuracy": 1 / 9},
        "2": {"n": 31, "correct": 0, "accuracy": 0.0},
    }
    by_length = {k: (v["n"], v["correct"]) for k, v in result.breakdowns["by_input_length"].items()}
    assert by_length == {"0-9": (9, 1), "10-19": (10, 0), "20-29": (10, 0), "30-39": (10, 0), "40-49": (1, 0)}
    assert result.predictions[0].expected == result.predictions[0].generated == " 1<|im_end|>"


def test_task_accuracy_covers_every_non_train_split(always_yes, tokenizer):
    results = task_accuracy(always_yes, tokenizer, get_task("dyck"), max_examples=8, batch_size=8)
    assert list(results) == ["test", "almost_balanced", "new_token", "length", "balanced_long", "length_5_90"]
    assert all(r.n == 8 for r in results.values())
    assert results["almost_balanced"].accuracy == 0.0  # every answer there is "no"
    assert results["balanced_long"].accuracy == 1.0  # every answer there is "yes"


@pytest.mark.parametrize(
    ("model_name", "task", "split"), [("always_yes", "dyck", "test"), ("always_one", "count", "x_only")]
)
def test_greedy_correctness_equals_teacher_forced(model_name, task, split, tokenizer, request):
    model = request.getfixturevalue(model_name)
    result = split_accuracy(model, tokenizer, get_task(task), split, max_examples=30, batch_size=8, seed=5)
    data = TaskData(task, split, tokenizer, "smollm2", max_examples=30, seed=5, progress=False)
    forced = answers_correct(model, data, len(data), batch_size=8)
    assert [p.correct for p in result.predictions] == forced.tolist()
    assert 0 < result.correct < result.n
