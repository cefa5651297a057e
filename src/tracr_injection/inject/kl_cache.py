"""The KL term's data: the original model's next-token distributions on fixed natural-text windows, cached.

In: a `TrainConfig` (model, text source, window count and length, k, seed), the original model and its
tokenizer.  Out: a `KLCache`, one safetensors file under `paths.kl_dir()` (`kl_cache_path`): the windows and,
per position, the original model's top-k token ids, their log-probs and the log of the remaining ("tail")
mass.  Those distributions never change during training, so `load_or_build_kl_cache` runs the model once
(`build_kl_cache`) and every later run with the same settings reads the file; the objective's `topk_kl`
scores a student against a batch of it with k + 1 buckets instead of running a frozen copy every step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tracr_injection.errors import TracrInjectionError
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.natural_text import text_windows
from tracr_injection.paths import kl_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_FORMAT = "tracr-injection-kl-cache"
CACHE_VERSION = 1
CACHE_KEYS = ("input_ids", "topk_ids", "topk_logp", "log_tail")


class KLCacheError(TracrInjectionError, OSError):
    """A KL cache file is missing, corrupt, or its tensors do not fit together (or fit the student)."""


def kl_cache_path(config: TrainConfig) -> Path:
    """Where the KL cache of this config's model, text source, window shape, k and seed is stored."""
    source = config.kl_source.replace("/", "_")
    shape = f"{config.kl_windows}x{config.kl_window_len}-k{config.kl_top_k}-s{config.seed}"
    return kl_dir() / f"{Path(str(config.model)).name}-{source}-{shape}.safetensors"


def load_or_build_kl_cache(
    config: TrainConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> KLCache:
    """The config's natural-text windows with the original model's top-k distributions on them, built and
    saved on first use, read from `kl_cache_path` after."""
    path = kl_cache_path(config)
    if path.is_file():
        return KLCache.load(path)
    windows = text_windows(
        config.kl_source, tokenizer, config.kl_windows, config.kl_window_len, seed=config.seed, model=model
    )
    cache = build_kl_cache(model, windows, config.kl_top_k)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


@dataclasses.dataclass
class KLCache:
    """The original model's next-token distributions on fixed windows, as top-k + tail, per position.

    `input_ids_NT` are the windows; `topk_ids_NTK` (int32) and `topk_logp_NTK` (float32) the top-k
    tokens and their log-probs; `log_tail_NT` (float32) the log of the rest's mass (-inf when k = V).
    """

    input_ids_NT: torch.Tensor
    topk_ids_NTK: torch.Tensor
    topk_logp_NTK: torch.Tensor
    log_tail_NT: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        _check_cache_tensors(self.input_ids_NT, self.topk_ids_NTK, self.topk_logp_NTK, self.log_tail_NT)

    def __len__(self) -> int:
        return self.input_ids_NT.shape[0]

    @property
    def top_k(self) -> int:
        """How many tokens per position are kept exactly."""
        return self.topk_ids_NTK.shape[-1]

    @property
    def window_len(self) -> int:
        """Tokens per window (T)."""
        return self.input_ids_NT.shape[1]

    def batch(
        self, indices: Sequence[int] | torch.Tensor | slice, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Rows `indices` as a dict for `topk_kl`: input_ids [B, T] and topk_ids [B, T, K] (int64),
        topk_logp [B, T, K] and log_tail [B, T] (float32), on `device` if given."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        rows = {
            "input_ids": self.input_ids_NT[indices].long(),
            "topk_ids": self.topk_ids_NTK[indices].long(),
            "topk_logp": self.topk_logp_NTK[indices],
            "log_tail": self.log_tail_NT[indices],
        }
        return {key: value.to(device) for key, value in rows.items()} if device is not None else rows

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the cache as one safetensors file (written to a temporary name, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = dict(zip(CACHE_KEYS, self._tensors()))
        temp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=self._metadata())
        os.replace(temp, path)
        return path

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors in `CACHE_KEYS` order, on the CPU."""
        return tuple(
            t.cpu() for t in (self.input_ids_NT, self.topk_ids_NTK, self.topk_logp_NTK, self.log_tail_NT)
        )

    def _metadata(self) -> dict[str, str]:
        """String metadata saved with the tensors, checked on load."""
        return {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "vocab_size": str(self.vocab_size)}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KLCache:
        """Read a cache written by `save`; a missing, corrupt or inconsistent file is a `KLCacheError`."""
        path = Path(path)
        if not path.is_file():
            raise KLCacheError(f"no KL cache at {path}: build one with build_kl_cache(...).save(path)")
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") != CACHE_FORMAT or metadata.get("version") != str(CACHE_VERSION):
            raise KLCacheError(
                f"{path} is not a version-{CACHE_VERSION} KL cache (metadata {metadata}): rebuild it"
            )
        missing = [key for key in CACHE_KEYS if key not in tensors]
        if missing:
            raise KLCacheError(f"the KL cache {path} lacks {missing}: rebuild it")
        try:
            return cls(*(tensors[key] for key in CACHE_KEYS), vocab_size=int(metadata["vocab_size"]))
        except (KLCacheError, KeyError, ValueError) as error:
            raise KLCacheError(f"the KL cache {path} is inconsistent ({error}): rebuild it") from error


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, any failure as a `KLCacheError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise KLCacheError(
            f"cannot read the KL cache {path} ({type(error).__name__}: {error}): rebuild it"
        ) from error
    return tensors, metadata


def _check_cache_tensors(
    input_ids_NT: torch.Tensor,
    topk_ids_NTK: torch.Tensor,
    topk_logp_NTK: torch.Tensor,
    log_tail_NT: torch.Tensor,
) -> None:
    """Raise `KLCacheError` unless the four tensors have matching [N, T(, K)] shapes and the right dtypes."""
    if input_ids_NT.dim() != 2 or topk_ids_NTK.dim() != 3:
        raise KLCacheError(
            f"expected input_ids [N, T] and topk_ids [N, T, K], got "
            f"{tuple(input_ids_NT.shape)} and {tuple(topk_ids_NTK.shape)}"
        )
    if topk_logp_NTK.shape != topk_ids_NTK.shape or topk_ids_NTK.shape[:2] != input_ids_NT.shape:
        raise KLCacheError(
            f"topk_ids {tuple(topk_ids_NTK.shape)}, topk_logp {tuple(topk_logp_NTK.shape)} and "
            f"input_ids {tuple(input_ids_NT.shape)} do not fit together"
        )
    if log_tail_NT.shape != input_ids_NT.shape:
        raise KLCacheError(
            f"log_tail {tuple(log_tail_NT.shape)} does not match input_ids {tuple(input_ids_NT.shape)}"
        )
    if topk_ids_NTK.is_floating_point() or input_ids_NT.is_floating_point():
        raise KLCacheError("input_ids and topk_ids must be integer tensors")
    if not (topk_logp_NTK.is_floating_point() and log_tail_NT.is_floating_point()):
        raise KLCacheError("topk_logp and log_tail must be floating-point tensors")


@torch.no_grad()
def build_kl_cache(
    model: PreTrainedModel, windows_NT: torch.Tensor, top_k: int, batch_size: int = 16
) -> KLCache:
    """Run the original model once (eval, no grad) over the windows and keep, per position, its top-k
    token ids and log-probs and the log of the remaining mass."""
    windows_NT = torch.as_tensor(windows_NT, dtype=torch.long)
    if windows_NT.dim() != 2 or windows_NT.shape[0] == 0:
        raise KLCacheError(f"windows must be a non-empty [N, T] tensor, got shape {tuple(windows_NT.shape)}")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab_size:
        raise KLCacheError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")
    device = model.get_output_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        parts = [
            topk_of_logits(model(input_ids=chunk.to(device)).logits, top_k)
            for chunk in windows_NT.split(batch_size)
        ]
    finally:
        model.train(was_training)
    ids, logp, tail = (torch.cat(column) for column in zip(*parts))
    return KLCache(windows_NT.clone(), ids, logp, tail, vocab_size=vocab_size)


def topk_of_logits(logits_BTV: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k ids int32, their log-probs, log tail mass) of the softmax of `logits_BTV`, all on the CPU."""
    logp_BTV = logits_BTV.float().log_softmax(dim=-1)
    topk_logp_BTK, topk_ids_BTK = logp_BTV.topk(top_k, dim=-1)
    log_tail_BT = logp_BTV.scatter(-1, topk_ids_BTK, float("-inf")).logsumexp(dim=-1)
    return topk_ids_BTK.int().cpu(), topk_logp_BTK.cpu(), log_tail_BT.cpu()
