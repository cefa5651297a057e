"""Kept-language metrics against direct computations on tiny random Llamas with SmolLM2's tokenizer,
held-out windows that never repeat a training window, and lm-evaluation-harness's clear statuses.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama

from tracr_injection.errors import TracrInjectionError
from tracr_injection.evaluate import language
from tracr_injection.evaluate.language import (
    HELDOUT_SEED_OFFSET,
    LM_EVAL_MISSING,
    LanguageEvalError,
    heldout_windows,
    language_metrics,
    run_lm_eval,
)
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.natural_text import text_windows
from tracr_injection.paths import heldout_dir

TEXTS = [
    (
        "The committee met on Tuesday to discuss the budget for the coming year, and after a long debate "
        "it agreed to fund the new library, the repairs to the bridge and a small park near the river."
    ),
    (
        "Rivers carry sediment from the mountains to the sea. Over thousands of years the deposits build "
        "deltas, wide flat plains where farmers grow rice and wheat in the rich and well watered soil."
    ),
    (
        "A good recipe lists its ingredients in the order they are used, gives quantities in weight, and "
        "says what the dough should look like at each step, so a cook can tell when something goes wrong."
    ),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def original(tokenizer):
    """A 4-block random Llama with SmolLM2's vocabulary, in eval mode."""
    return build_tiny_llama(tokenizer).eval()


@pytest.fixture(scope="module")
def perturbed(original):
    """The original with noise added to one MLP weight."""
    model = copy.deepcopy(original)
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


@pytest.fixture(scope="module")
def windows(tokenizer):
    """Five windows of 9 random token ids (5 so batches of 2 leave a ragged last batch)."""
    return torch.randint(len(tokenizer), (5, 9), generator=torch.Generator().manual_seed(2))


def direct_logits(model, windows_NT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=windows_NT).logits.double()


# ------------------------------------------------------------------------------------------ metrics


def test_identical_models_have_zero_kl_full_agreement_and_equal_perplexity(original, windows):
    twin = copy.deepcopy(original)
    metrics = language_metrics(original, twin, windows, batch_size=2)
    assert metrics.kl_original_trained < 1e-7
    assert metrics.top1_agreement == 1.0
    assert metrics.perplexity_original == metrics.perplexity_trained
    assert metrics.perplexity_ratio == 1.0 and metrics.perplexity_difference == 0.0
    assert not metrics.same_model


def test_the_same_object_is_scored_once_and_still_gets_its_perplexity(original, windows):
    metrics = language_metrics(original, original, windows, batch_size=2)
    twin = language_metrics(original, copy.deepcopy(original), windows, batch_size=2)
    assert metrics.same_model and metrics.kl_original_trained == 0.0 and metrics.top1_agreement == 1.0
    assert metrics.perplexity_original == pytest.approx(twin.perplexity_original, rel=1e-6)
    assert metrics.perplexity_original > 1.0


def test_perplexity_is_exp_of_the_cross_entropy_of_the_shifted_windows(original, perturbed, windows):
    metrics = language_metrics(original, perturbed, windows, batch_size=2)
    for model, ppl in ((original, metrics.perplexity_original), (perturbed, metrics.perplexity_trained)):
        logits_NTV = direct_logits(model, windows)
        nll = F.cross_entropy(
            logits_NTV[:, :-1].reshape(-1, logits_NTV.shape[-1]), windows[:, 1:].reshape(-1)
        )
        assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert metrics.perplexity_ratio == pytest.approx(metrics.perplexity_trained / metrics.perplexity_original)
    assert metrics.perplexity_difference == pytest.approx(
        metrics.perplexity_trained - metrics.perplexity_original
    )
    assert (metrics.num_windows, metrics.num_positions, metrics.num_predicted) == (5, 45, 40)


def test_kl_and_top1_agreement_of_a_perturbed_copy_match_direct_computations(original, perturbed, windows):
    metrics = language_metrics(original, perturbed, windows, batch_size=2)
    p_logits, q_logits = direct_logits(original, windows), direct_logits(perturbed, windows)
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    direct_kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert direct_kl > 1e-4
    assert metrics.kl_original_trained == pytest.approx(direct_kl, rel=1e-5)
    agree = sum(int(p_logits[n, t].argmax() == q_logits[n, t].argmax()) for n in range(5) for t in range(9))
    assert 0 < agree < 45  # the test can tell a wrong count from a right one
    assert metrics.top1_agreement == agree / 45


def test_metrics_restore_training_mode_and_reject_bad_windows(original, perturbed, windows):
    perturbed.train()
    language_metrics(original, perturbed, windows)
    assert perturbed.training and not original.training
    perturbed.eval()
    with pytest.raises(LanguageEvalError, match=r"\[N >= 1, T >= 2\]"):
        language_metrics(original, perturbed, windows[:, :1])
    assert issubclass(LanguageEvalError, TracrInjectionError)


def test_to_dict_holds_every_metric(original, perturbed, windows):
    row = language_metrics(original, perturbed, windows).to_dict()
    assert row["num_windows"] == 5 and 0.0 <= row["top1_agreement"] <= 1.0
    assert {"perplexity_original", "perplexity_trained", "kl_original_trained"} <= row.keys()


# ---------------------------------------------------------------------------------- held-out windows


def rows(windows_NT: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in windows_NT.tolist()}


def all_windows(tokenizer, texts: list[str], window_len: int) -> set[tuple[int, ...]]:
    """Every non-overlapping window of each text, cut by hand."""
    found = set()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        found |= {tuple(ids[i : i + window_len]) for i in range(0, len(ids) - window_len + 1, window_len)}
    return found


def test_local_heldout_windows_are_past_the_training_draw(tokenizer, tmp_path):
    for index, text in enumerate(TEXTS):
        (tmp_path / f"{index}.txt").write_text(text, encoding="utf-8")
    training_NT = text_windows(tmp_path, tokenizer, 3, window_len=8, seed=5)
    heldout_NT = heldout_windows(tmp_path, tokenizer, 4, 8, train_seed=5, train_windows=3)
    assert heldout_NT.shape == (4, 8)
    assert not rows(heldout_NT) & rows(training_NT)
    assert rows(heldout_NT) <= all_windows(tokenizer, TEXTS, 8)  # windows of the same text, cut the same way


def test_local_heldout_windows_drop_text_identical_to_a_training_window(tokenizer, tmp_path):
    for name in ("a.txt", "b.txt"):  # the same text twice: every window has an identical twin
        (tmp_path / name).write_text(TEXTS[0], encoding="utf-8")
    total = len(text_windows(tmp_path / "a.txt", tokenizer, 4, window_len=8)) * 2
    training_NT = text_windows(tmp_path, tokenizer, 3, window_len=8, seed=5)
    heldout_NT = heldout_windows(tmp_path, tokenizer, total - 3, 8, train_seed=5, train_windows=3)
    assert not rows(heldout_NT) & rows(training_NT)
    assert len(heldout_NT) < total - 3  # at least one twin of a training window was dropped


def test_too_little_local_text_for_heldout_windows_is_a_clear_error(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    with pytest.raises(LanguageEvalError, match="after the 3 windows training took"):
        heldout_windows(tmp_path, tokenizer, 100, 8, train_seed=0, train_windows=3)


def test_self_heldout_windows_are_fresh_samples_from_the_original(original, tokenizer):
    training_NT = text_windows("self", tokenizer, 4, window_len=8, seed=3, model=original)
    heldout_NT = heldout_windows("self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original)
    assert heldout_NT.shape == (4, 8)
    assert not rows(heldout_NT) & rows(training_NT)
    resampled = text_windows("self", tokenizer, 4, window_len=8, seed=3 + HELDOUT_SEED_OFFSET, model=original)
    assert torch.equal(heldout_NT, resampled)


def test_self_heldout_windows_drop_known_training_windows(original, tokenizer):
    heldout_NT = heldout_windows("self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original)
    known_NT = torch.cat([heldout_NT[1:2], torch.zeros(1, 8, dtype=torch.long)])
    kept_NT = heldout_windows(
        "self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original, training_NT=known_NT
    )
    assert torch.equal(kept_NT, heldout_NT[[0, 2, 3]])
    with pytest.raises(LanguageEvalError, match="model="):
        heldout_windows("self", tokenizer, 4, 8, train_seed=3, train_windows=4)


def test_self_heldout_windows_are_kept_on_disk_per_model_key(original, tokenizer, monkeypatch):
    fresh_NT = heldout_windows("self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original)
    kept_NT = heldout_windows(
        "self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original, model_key="a"
    )
    assert torch.equal(kept_NT, fresh_NT) and len(list(heldout_dir().glob("*.pt"))) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(language, "sample_self_windows", no_sampling)
    again_NT = heldout_windows(
        "self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original, model_key="a"
    )
    assert torch.equal(again_NT, fresh_NT)  # read back, not sampled
    with pytest.raises(AssertionError, match="sampled again"):  # another model, another seed: sampled
        heldout_windows("self", tokenizer, 4, 8, train_seed=3, train_windows=4, model=original, model_key="b")
    with pytest.raises(AssertionError, match="sampled again"):
        heldout_windows("self", tokenizer, 4, 8, train_seed=4, train_windows=4, model=original, model_key="a")


# ----------------------------------------------------------------------------------------- lm-eval


def test_missing_lm_eval_says_so_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    result = run_lm_eval("some/model", ["hellaswag"])
    assert not result.ok and result.scores == {}
    assert result.status == LM_EVAL_MISSING == "lm-evaluation-harness is not installed (pip install lm-eval)"
    assert result.to_dict()["ok"] is False


def test_lm_eval_without_task_data_reports_the_error_instead_of_crashing(monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=offline))
    result = run_lm_eval("some/model", ["hellaswag"])
    assert not result.ok and result.scores == {}
    assert "ConnectionError" in result.status and "Couldn't reach 'Rowan/hellaswag'" in result.status


def test_lm_eval_scores_come_from_the_harness_results(monkeypatch, tmp_path):
    calls = []

    def evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": "N/A"}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=evaluate))
    result = run_lm_eval(tmp_path, ["hellaswag"], limit=10)
    assert result.ok and result.scores == {"hellaswag": {"acc,none": 0.25}}
    assert calls == [
        {"model": "hf", "model_args": f"pretrained={tmp_path}", "tasks": ["hellaswag"], "limit": 10}
    ]
