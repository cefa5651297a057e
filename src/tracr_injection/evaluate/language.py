"""Kept language ability: how much the trained model's next-token predictions moved on held-out text.

In: the original and the trained causal LM, held-out natural-text windows from the source training's
KL term used (`heldout_windows`), optionally a saved model folder and lm-evaluation-harness task names.
Out: `LanguageMetrics` (perplexity of each model, their ratio and difference, mean KL(original ‖
trained) over the full vocabulary, top-1 agreement) and `LmEvalResult` (harness scores, or a clear
status saying why none were computed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tracr_injection.errors import TracrInjectionError
from tracr_injection.inject.lm import inference
from tracr_injection.inject.natural_text import SELF_SOURCE, sample_self_windows, text_windows
from tracr_injection.paths import heldout_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HELDOUT_SEED_OFFSET = 1_000_003  # "self" held-out text is sampled with train_seed + this, never train_seed
LM_EVAL_MISSING = "lm-evaluation-harness is not installed (pip install lm-eval)"
LM_EVAL_OK = "ok"
KL_CHUNK_POSITIONS = 128  # positions upcast to float64 at once: 128 x 49,152 doubles = 50 MB


class LanguageEvalError(TracrInjectionError, ValueError):
    """Held-out text cannot be had from the source (too little beyond training's windows), or the
    windows to score are not a non-empty [N, T >= 2] batch of token ids."""


# --------------------------------------------------------------------------------------------------
# Held-out windows
# --------------------------------------------------------------------------------------------------


def heldout_windows(
    source: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    num_windows: int,
    window_len: int,
    *,
    train_seed: int,
    train_windows: int,
    model: PreTrainedModel | None = None,
    training_NT: torch.Tensor | None = None,
    model_key: str | None = None,
) -> torch.LongTensor:
    """Up to `num_windows` windows [M, T] from the source of training's KL term that training never saw.

    Local folders and "hf:" sources draw `train_windows + num_windows` windows with the training seed:
    both draws are prefix-stable, so the first `train_windows` are exactly training's windows and the
    rest are other text. "self" samples fresh text from `model` (the ORIGINAL model) with the seed
    `train_seed + HELDOUT_SEED_OFFSET`. Held-out windows identical to a training window are dropped, so
    fewer than `num_windows` may come back: training's windows are `training_NT` when given (e.g. the
    run's KL cache `input_ids`), else the regenerated prefix; for "self" without `training_NT` nothing is
    checked, since re-sampling would cost as much as training's draw (a repeat needs every sampled token
    to repeat).  With `model_key` (what identifies the original model's weights), "self" samples are kept
    on disk (`cached_self_windows`).
    """
    if os.fspath(source) == SELF_SOURCE:
        if model is None:
            raise LanguageEvalError('held-out "self" text is sampled from the original model: pass model=...')
        seed = train_seed + HELDOUT_SEED_OFFSET
        windows_NT = cached_self_windows(model, tokenizer, num_windows, window_len, seed, model_key)
        known_NT = training_NT
    else:
        drawn_NT = _draw_past_training(source, tokenizer, num_windows, window_len, train_seed, train_windows)
        windows_NT = drawn_NT[train_windows:]
        known_NT = drawn_NT[:train_windows] if training_NT is None else training_NT
    kept_NT = drop_known_windows(windows_NT, known_NT) if known_NT is not None else windows_NT
    if len(kept_NT) == 0:
        raise LanguageEvalError(
            f"every held-out window of {os.fspath(source)!r} repeats a training window: add different text"
        )
    return kept_NT


def cached_self_windows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_windows: int,
    window_len: int,
    seed: int,
    model_key: str | None,
) -> torch.LongTensor:
    """`sample_self_windows` of the original model, kept under `<cache>/heldout/` when `model_key` is given:
    the draw depends only on the model, tokenizer, count, length and seed, so every run of one base model
    and seed shares it (sampling token by token is most of the language metrics' time)."""
    if model_key is None:
        return sample_self_windows(model, tokenizer, num_windows, window_len, seed=seed)
    key = json.dumps([model_key, tokenizer.name_or_path, len(tokenizer), num_windows, window_len, seed])
    path = heldout_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    windows_NT = sample_self_windows(model, tokenizer, num_windows, window_len, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(windows_NT, partial)
    partial.replace(path)  # atomic: a concurrent evaluation never reads half a file
    return windows_NT


def _draw_past_training(
    source: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    num_windows: int,
    window_len: int,
    train_seed: int,
    train_windows: int,
) -> torch.LongTensor:
    """Training's seeded draw of a local or "hf:" source, extended by `num_windows` windows past it."""
    try:
        return text_windows(source, tokenizer, train_windows + num_windows, window_len, seed=train_seed)
    except TracrInjectionError as error:
        raise LanguageEvalError(
            f"held-out text comes after the {train_windows} windows training took from {os.fspath(source)!r}, "
            f"so it needs {train_windows + num_windows} windows of {window_len} tokens in all: {error}"
        ) from error


def drop_known_windows(windows_NT: torch.Tensor, known_KT: torch.Tensor) -> torch.LongTensor:
    """The rows of `windows_NT` that are not identical to any row of `known_KT`, in order."""
    known = {tuple(row) for row in known_KT.tolist()}
    keep_N = torch.tensor([tuple(row) not in known for row in windows_NT.tolist()], dtype=torch.bool)
    return windows_NT[keep_N]


# --------------------------------------------------------------------------------------------------
# Perplexity, KL and top-1 agreement
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LanguageMetrics:
    """How the trained model's next-token predictions compare with the original's on held-out windows.

    Perplexities average over the `num_predicted` next tokens inside the windows (T - 1 per window);
    KL and top-1 agreement compare the two distributions at every one of the `num_positions` positions.
    """

    num_windows: int
    num_positions: int
    num_predicted: int
    perplexity_original: float
    perplexity_trained: float
    perplexity_ratio: float
    perplexity_difference: float
    kl_original_trained: float
    top1_agreement: float
    same_model: bool

    def to_dict(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Totals:
    """Sums over batches, turned into means at the end."""

    nll_original: float = 0.0
    nll_trained: float = 0.0
    kl: float = 0.0
    agreements: int = 0


@torch.no_grad()
def language_metrics(
    original: PreTrainedModel, trained: PreTrainedModel, windows_NT: torch.Tensor, *, batch_size: int = 16
) -> LanguageMetrics:
    """Perplexity of both models, mean KL(original ‖ trained) per position over the full vocabulary, and
    top-1 agreement on `windows_NT`, batch by batch with float32 logits (full-vocabulary logits are large).

    `original is trained` (the untrained model) runs the model once; its logits then serve as both,
    so KL is exactly 0 and agreement exactly 1.
    """
    windows_NT = _checked_windows(windows_NT)
    num_windows, window_len = windows_NT.shape
    same_model = original is trained
    totals = _Totals()
    with inference(original, trained):
        for chunk_BT in windows_NT.split(batch_size):
            original_BTV = _logits(original, chunk_BT)
            trained_BTV = original_BTV if same_model else _logits(trained, chunk_BT)
            _add_batch(totals, chunk_BT, original_BTV, trained_BTV)
    num_positions, num_predicted = num_windows * window_len, num_windows * (window_len - 1)
    ppl_original = math.exp(totals.nll_original / num_predicted)
    ppl_trained = math.exp(totals.nll_trained / num_predicted)
    return LanguageMetrics(
        num_windows=num_windows,
        num_positions=num_positions,
        num_predicted=num_predicted,
        perplexity_original=ppl_original,
        perplexity_trained=ppl_trained,
        perplexity_ratio=ppl_trained / ppl_original,
        perplexity_difference=ppl_trained - ppl_original,
        kl_original_trained=totals.kl / num_positions,
        top1_agreement=totals.agreements / num_positions,
        same_model=same_model,
    )


def _checked_windows(windows_NT: torch.Tensor) -> torch.LongTensor:
    """The windows as a long tensor [N, T] with N >= 1 and T >= 2, or a clear error."""
    windows_NT = torch.as_tensor(windows_NT, dtype=torch.long)
    if windows_NT.dim() != 2 or windows_NT.shape[0] < 1 or windows_NT.shape[1] < 2:
        raise LanguageEvalError(
            f"language metrics need windows [N >= 1, T >= 2] of token ids, got shape {tuple(windows_NT.shape)}"
        )
    return windows_NT


def _logits(model: PreTrainedModel, ids_BT: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits [B, T, V] of the model on `ids_BT`, computed on the model's device."""
    device = model.get_output_embeddings().weight.device
    return model(input_ids=ids_BT.to(device)).logits.float()


def _add_batch(
    totals: _Totals, ids_BT: torch.Tensor, original_BTV: torch.Tensor, trained_BTV: torch.Tensor
) -> None:
    """Add one batch's summed next-token NLLs, summed KL and count of agreeing argmaxes to `totals`."""
    totals.nll_original += _summed_nll(original_BTV, ids_BT)
    totals.nll_trained += _summed_nll(trained_BTV, ids_BT)
    totals.kl += summed_kl(original_BTV, trained_BTV)
    totals.agreements += int((original_BTV.argmax(-1) == trained_BTV.argmax(-1)).sum())


def summed_kl(original_BTV: torch.Tensor, trained_BTV: torch.Tensor) -> float:
    """Sum over positions of KL(original ‖ trained) over the full vocabulary, in float64 a few positions at
    a time: float32 log-softmax over ~49k tokens is off by ~1e-7 nats per position (6e-5 relative at a KL
    of 2e-3 on a tiny model, negative below 1e-7), too coarse for a well-kept model's small KL."""
    total = 0.0
    original_PV, trained_PV = original_BTV.flatten(0, 1), trained_BTV.flatten(0, 1)
    for p_CV, q_CV in zip(original_PV.split(KL_CHUNK_POSITIONS), trained_PV.split(KL_CHUNK_POSITIONS)):
        logp_CV, logq_CV = p_CV.double().log_softmax(-1), q_CV.double().log_softmax(-1)
        total += float((logp_CV.exp() * (logp_CV - logq_CV)).sum())
    return total


def _summed_nll(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> float:
    """Sum of -log p(next token) over the T - 1 predicted tokens of each window (logits at t predict t + 1)."""
    targets = ids_BT[:, 1:].to(logits_BTV.device)
    return float(F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"))


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LmEvalResult:
    """lm-evaluation-harness scores per task (metric name -> value), or a status saying why there are none."""

    tasks: list[str]
    status: str
    scores: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the harness ran and returned scores."""
        return self.status == LM_EVAL_OK

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "ok": self.ok}


def run_lm_eval(
    model_dir: str | os.PathLike[str], tasks: list[str], *, limit: int | None = None
) -> LmEvalResult:
    """Run lm-evaluation-harness's `tasks` on the saved model folder when the harness is installed; when it
    is not, or its task data cannot be fetched (e.g. no network), return a status saying so instead of failing.
    """
    try:
        lm_eval = importlib.import_module("lm_eval")
    except ImportError:
        return LmEvalResult(tasks=list(tasks), status=LM_EVAL_MISSING)
    try:
        output = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={os.fspath(model_dir)}", tasks=list(tasks), limit=limit
        )
    except Exception as error:  # noqa: BLE001 (harness and `datasets` raise many types; never crash)
        return LmEvalResult(
            tasks=list(tasks),
            status=(
                f"lm-evaluation-harness could not run {list(tasks)} (is the task data downloadable here? "
                f"it is fetched from the Hugging Face hub): {type(error).__name__}: {error}"
            ),
        )
    return LmEvalResult(tasks=list(tasks), status=LM_EVAL_OK, scores=numeric_scores(output))


def numeric_scores(output: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per task, the numeric entries of `simple_evaluate`'s "results" (drops aliases and "N/A" strings)."""
    results = (output or {}).get("results", {})
    return {
        task: {
            name: float(value)
            for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for task, metrics in results.items()
    }
