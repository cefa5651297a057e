"""Natural text for the language-preserving KL term, and the original model's distributions on it, cached.

The injection loss keeps the model's language ability with KL(original ‖ student) of next-token
distributions on natural text.  The original model's distributions on a fixed set of windows never
change during training, so `build_kl_cache` runs it once and keeps, per position, the top-k token ids,
their log-probs and the log of the remaining ("tail") mass; `topk_kl` then scores a student against
that cache with k + 1 buckets instead of running a frozen copy of the model every step.

Merging the non-top-k tokens into one bucket can only lower a KL (log-sum inequality), so `topk_kl`
is a lower bound of `exact_kl` that grows with k and equals it at k = V.

Text comes from `text_windows`: sampled from the original model itself (`"self"`, needs no data),
cut from local `.txt`/`.md` files, or streamed from a Hugging Face dataset (`"hf:NAME[:CONFIG]:SPLIT"`,
needs the `datasets` package and network).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tracr_injection.errors import TracrInjectionError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SELF_SOURCE = "self"
DOCUMENT_SEPARATOR = "<|endoftext|>"
HF_PREFIX = "hf:"
LOCAL_SUFFIXES = (".txt", ".md")
OPENING_WORDS = (
    "The", "In", "A", "When", "It", "This", "One", "There",
    "Many", "We", "If", "For", "As", "Some", "After", "Most",
)  # fmt: skip
DEFAULT_TOP_P = 0.95
DEFAULT_TEMPERATURE = 1.0
SAMPLE_BATCH_SIZE = 32
HF_MAX_DOCUMENTS = 100_000
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
CACHE_FORMAT = "tracr-injection-kl-cache"
CACHE_VERSION = 1
CACHE_KEYS = ("input_ids", "topk_ids", "topk_logp", "log_tail")
MASKED_LOGIT = -1e30  # finite stand-in for -inf, so an empty tail never turns gradients into NaN


class NaturalTextError(TracrInjectionError, ValueError):
    """A natural-text source is unknown, unusable here, or gives too few windows."""


class KLCacheError(TracrInjectionError, OSError):
    """A KL cache file is missing, corrupt, or its tensors do not fit together (or fit the student)."""


# --------------------------------------------------------------------------------------------------
# Natural-text windows
# --------------------------------------------------------------------------------------------------


def text_windows(
    source: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    num_windows: int,
    window_len: int = 30,
    seed: int = 0,
    model: PreTrainedModel | None = None,
    *,
    top_p: float = DEFAULT_TOP_P,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = SAMPLE_BATCH_SIZE,
) -> torch.LongTensor:
    """`num_windows` token windows [N, T] of natural text from `source`, the same for the same seed.

    `source` is `"self"` (sampled from `model`), a local `.txt` file or folder of `.txt`/`.md`
    files, or `"hf:NAME[:CONFIG]:SPLIT"` (a Hugging Face dataset; needs `datasets` and network).
    """
    _check_counts(num_windows, window_len)
    source_str = os.fspath(source)
    if source_str == SELF_SOURCE:
        if model is None:
            raise NaturalTextError('text_windows("self", ...) samples from the model: pass model=...')
        return sample_self_windows(
            model,
            tokenizer,
            num_windows,
            window_len,
            seed,
            top_p=top_p,
            temperature=temperature,
            batch_size=batch_size,
        )
    if source_str.startswith(HF_PREFIX):
        return hf_windows(source_str, tokenizer, num_windows, window_len, seed)
    return local_windows(Path(source_str).expanduser(), tokenizer, num_windows, window_len, seed)


def _check_counts(num_windows: int, window_len: int) -> None:
    """Reject non-positive window counts or lengths up front, with the offending value."""
    if num_windows < 1:
        raise NaturalTextError(f"num_windows must be at least 1, got {num_windows}")
    if window_len < 2:
        raise NaturalTextError(f"window_len must be at least 2 tokens, got {window_len}")


def sample_self_windows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_windows: int,
    window_len: int = 30,
    seed: int = 0,
    *,
    top_p: float = DEFAULT_TOP_P,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = SAMPLE_BATCH_SIZE,
) -> torch.LongTensor:
    """Windows [N, T] sampled from the model itself, each starting with a document-start token and an
    opening word; needs no data, and is the model's own notion of natural text."""
    _check_counts(num_windows, window_len)
    if not (temperature > 0 and 0 < top_p <= 1):
        raise NaturalTextError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    generator = torch.Generator().manual_seed(seed)
    prompts = opening_prompts(tokenizer)
    prompt_of_N = torch.randint(len(prompts), (num_windows,), generator=generator)
    banned_V = _banned_tokens(tokenizer, model.get_output_embeddings().weight.shape[0])
    windows_NT = torch.empty(num_windows, window_len, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for index, prompt in enumerate(prompts):
            rows = (prompt_of_N == index).nonzero().flatten()
            for chunk in rows.split(batch_size) if len(rows) else ():
                windows_NT[chunk] = _sample_batch(
                    model, prompt, len(chunk), window_len, generator, banned_V, top_p, temperature
                )
    finally:
        model.train(was_training)
    return windows_NT


def opening_prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each opening word after the document-start token, as the model saw documents begin."""
    start = document_start_ids(tokenizer)
    prompts = [start + list(tokenizer(word, add_special_tokens=True).input_ids) for word in OPENING_WORDS]
    return [list(ids) for ids in dict.fromkeys(tuple(ids) for ids in prompts if ids)]


def document_start_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What to put before a document's first word: nothing if encoding already adds BOS, else the
    `<|endoftext|>` separator if the vocabulary has one (GPT-2, SmolLM, Qwen), else BOS, else nothing.

    Without it some models treat the first token as an attention sink and continue it oddly (SmolLM2
    after a bare "The" samples "-" 42% of the time), and SmolLM2-Instruct's BOS is the chat marker
    `<|im_start|>`, after which it expects a role name, not prose.
    """
    bos = tokenizer.bos_token_id
    if bos is not None and list(tokenizer("The", add_special_tokens=True).input_ids)[:1] == [bos]:
        return []
    separator = tokenizer.get_vocab().get(DOCUMENT_SEPARATOR)
    if separator is not None:
        return [separator]
    return [bos] if bos is not None else []


def _banned_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.BoolTensor:
    """Tokens never sampled: special tokens (EOS, chat markers, the document separator) and output rows
    the tokenizer lacks, so every window is one unbroken piece of text."""
    banned_V = torch.zeros(vocab_size, dtype=torch.bool)
    banned_V[min(len(tokenizer), vocab_size) :] = True
    special_ids = [*tokenizer.all_special_ids, *document_start_ids(tokenizer)]
    special = [i for i in special_ids if i is not None and 0 <= i < vocab_size]
    banned_V[special] = True
    if banned_V.all():
        raise NaturalTextError("every output token is special or outside the tokenizer: nothing to sample")
    return banned_V


@torch.no_grad()
def _sample_batch(
    model: PreTrainedModel,
    prompt: Sequence[int],
    count: int,
    window_len: int,
    generator: torch.Generator,
    banned_V: torch.BoolTensor,
    top_p: float,
    temperature: float,
) -> torch.LongTensor:
    """`count` continuations of one prompt, [count, window_len] including the prompt, with a KV cache."""
    if len(prompt) >= window_len:
        raise NaturalTextError(
            f"the opening prompt {list(prompt)} is not shorter than window_len={window_len}"
        )
    device = model.get_output_embeddings().weight.device
    ids_BT = torch.tensor([list(prompt)] * count, dtype=torch.long)
    out = model(input_ids=ids_BT.to(device), use_cache=True, logits_to_keep=1)
    for _ in range(window_len - len(prompt)):
        next_B = sample_next(out.logits[:, -1].float().cpu(), generator, banned_V, top_p, temperature)
        ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
        if ids_BT.shape[1] == window_len:
            break
        out = model(input_ids=next_B[:, None].to(device), cache=out.cache, use_cache=True, logits_to_keep=1)
    return ids_BT


def sample_next(
    logits_BV: torch.Tensor,
    generator: torch.Generator,
    banned_V: torch.BoolTensor | None = None,
    top_p: float = DEFAULT_TOP_P,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.LongTensor:
    """One token per row by nucleus (top-p) sampling at `temperature`, never a banned token."""
    logits_BV = logits_BV.float() / temperature
    if banned_V is not None:
        logits_BV = logits_BV.masked_fill(banned_V[: logits_BV.shape[-1]], float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass strictly above each token
    sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)  # the first token always stays
    picked_B = torch.multinomial(sorted_BV, 1, generator=generator)
    return order_BV.gather(-1, picked_B).squeeze(-1)


def local_windows(
    path: Path, tokenizer: PreTrainedTokenizerBase, num_windows: int, window_len: int = 30, seed: int = 0
) -> torch.LongTensor:
    """Non-overlapping windows [N, T] cut from a `.txt` file or a folder of `.txt`/`.md` files, shuffled
    with the seed; windows never straddle two files."""
    _check_counts(num_windows, window_len)
    files = local_text_files(path)
    windows = [w for text in _read_texts(files) for w in cut_windows(_encode(tokenizer, text), window_len)]
    if len(windows) < num_windows:
        raise NaturalTextError(
            f"{path} gives only {len(windows)} windows of {window_len} tokens ({len(files)} file(s)), "
            f"fewer than the {num_windows} asked for: add text, ask for fewer or shorter windows, "
            'or use source="self"'
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:num_windows]
    return torch.tensor([windows[i] for i in order.tolist()], dtype=torch.long)


def local_text_files(path: Path) -> list[Path]:
    """The text files a local source names: the file itself, or every `.txt`/`.md` under a folder, sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if files:
            return files
        raise NaturalTextError(f"the folder {path} holds no .txt or .md files")
    raise NaturalTextError(
        f'unknown natural-text source {str(path)!r}: use "self", a local .txt file or folder of .txt/.md '
        'files, or "hf:NAME[:CONFIG]:SPLIT"'
    )


def _read_texts(files: Iterable[Path]) -> Iterator[str]:
    """Each file's text as UTF-8 (undecodable bytes replaced), skipping blank files."""
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a whole document, without special tokens and without the too-long warning."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def cut_windows(ids: Sequence[int], window_len: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of exactly `window_len` tokens; the remainder is dropped."""
    return [
        list(ids[start : start + window_len]) for start in range(0, len(ids) - window_len + 1, window_len)
    ]


def hf_windows(
    source: str, tokenizer: PreTrainedTokenizerBase, num_windows: int, window_len: int = 30, seed: int = 0
) -> torch.LongTensor:
    """Windows [N, T] from a streamed Hugging Face dataset `"hf:NAME[:CONFIG]:SPLIT"` (its "text" column);
    needs the `datasets` package and network, so it fails clearly offline."""
    _check_counts(num_windows, window_len)
    name, config, split = parse_hf_source(source)
    load_dataset = _import_datasets(source)
    try:
        stream = load_dataset(name, config, split=split, streaming=True).shuffle(seed=seed)
        windows = _windows_from_documents(stream, tokenizer, num_windows, window_len)
    except Exception as error:  # the datasets library raises many types for "offline" / "not found"
        raise NaturalTextError(
            f"could not stream {source!r} ({type(error).__name__}: {error}); it needs network access to "
            'the Hugging Face hub: use source="self" or a local folder of .txt files instead'
        ) from error
    if len(windows) < num_windows:
        raise NaturalTextError(f"{source!r} gave only {len(windows)} windows, fewer than {num_windows}")
    return torch.tensor(windows, dtype=torch.long)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """(name, config or None, split) of `"hf:NAME[:CONFIG]:SPLIT"`."""
    parts = source[len(HF_PREFIX) :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise NaturalTextError(f'a Hugging Face source looks like "hf:NAME[:CONFIG]:SPLIT", got {source!r}')
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def _import_datasets(source: str):
    """`datasets.load_dataset`, or a clear error when the package is missing or the hub is switched off."""
    offline = any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in _OFFLINE_VARS)
    try:
        from datasets import load_dataset
    except ImportError:
        load_dataset = None
    if load_dataset is None or offline:
        why = "the `datasets` package is not installed" if load_dataset is None else "the hub is set offline"
        raise NaturalTextError(
            f"{source!r} needs the `datasets` package and network access to the Hugging Face hub, "
            f'but {why}: use source="self" or a local folder of .txt files instead'
        )
    return load_dataset


def _windows_from_documents(
    documents: Iterable[dict], tokenizer: PreTrainedTokenizerBase, num_windows: int, window_len: int
) -> list[list[int]]:
    """The first `num_windows` windows cut from streamed documents' "text" fields, one window (the
    document's start) per document, so a long document does not dominate."""
    windows: list[list[int]] = []
    for index, document in enumerate(documents):
        if len(windows) >= num_windows or index >= HF_MAX_DOCUMENTS:
            break
        windows.extend(cut_windows(_encode(tokenizer, str(document.get("text", ""))), window_len)[:1])
    return windows[:num_windows]


# --------------------------------------------------------------------------------------------------
# The cache of the original model's top-k distributions
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The KL terms
# --------------------------------------------------------------------------------------------------


def topk_kl(
    student_logits_BTV: torch.Tensor, cache_batch: dict[str, torch.Tensor], reduction: str = "token_mean"
) -> torch.Tensor:
    """KL(original ‖ student) over the original's top-k tokens plus one tail bucket, mean over positions
    (`reduction="token_mean"`) or summed over each window's T positions and averaged over windows
    (`"window_sum"`, the authors' `batchmean`: T times the token mean).

    A lower bound of the exact KL (merging tokens can only lower it), exact at k = V; differentiable
    in the student logits.
    """
    ids_BTK, logp_BTK, log_tail_BT = _cache_tensors_for(student_logits_BTV, cache_batch)
    logq_BTV = student_logits_BTV.float().log_softmax(dim=-1)
    logq_BTK = logq_BTV.gather(-1, ids_BTK)
    log_q_tail_BT = logq_BTV.scatter(-1, ids_BTK, MASKED_LOGIT).logsumexp(dim=-1)
    head_BT = _plogp_ratio(logp_BTK, logq_BTK).sum(dim=-1)
    tail_BT = _plogp_ratio(log_tail_BT, log_q_tail_BT)
    kl_BT = head_BT + tail_BT
    if reduction == "window_sum":
        return kl_BT.sum(dim=-1).mean()
    if reduction != "token_mean":
        raise ValueError(f"reduction must be token_mean or window_sum, got {reduction!r}")
    return kl_BT.mean()


def _cache_tensors_for(
    student_logits_BTV: torch.Tensor, cache_batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache batch's (topk_ids int64, topk_logp, log_tail) on the student's device, shapes checked."""
    device = student_logits_BTV.device
    ids_BTK = cache_batch["topk_ids"].to(device=device, dtype=torch.long)
    logp_BTK = cache_batch["topk_logp"].to(device=device, dtype=torch.float32)
    log_tail_BT = cache_batch["log_tail"].to(device=device, dtype=torch.float32)
    if student_logits_BTV.dim() != 3 or student_logits_BTV.shape[:2] != ids_BTK.shape[:2]:
        raise KLCacheError(
            f"student logits {tuple(student_logits_BTV.shape)} do not match the cache batch's "
            f"[B, T, K] = {tuple(ids_BTK.shape)}: run the student on cache_batch['input_ids']"
        )
    if ids_BTK.numel() and int(ids_BTK.max()) >= student_logits_BTV.shape[-1]:
        raise KLCacheError(
            f"the cache holds token id {int(ids_BTK.max())}, outside the student's vocabulary of "
            f"{student_logits_BTV.shape[-1]}: the cache was built with a different model"
        )
    return ids_BTK, logp_BTK, log_tail_BT


def exact_kl(original_logits_BTV: torch.Tensor, student_logits_BTV: torch.Tensor) -> torch.Tensor:
    """Exact KL(original ‖ student) of the full next-token distributions, mean over positions."""
    if original_logits_BTV.shape != student_logits_BTV.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(original_logits_BTV.shape)} vs {tuple(student_logits_BTV.shape)}"
        )
    logp_BTV = original_logits_BTV.float().log_softmax(dim=-1)
    logq_BTV = student_logits_BTV.float().log_softmax(dim=-1)
    return _plogp_ratio(logp_BTV, logq_BTV).sum(dim=-1).mean()


def _plogp_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p - log q), taken as 0 where p = 0 (so -inf log-probs give 0, never NaN)."""
    has_mass = torch.isfinite(logp)
    safe_logp = torch.where(has_mass, logp, torch.zeros_like(logp))
    term = safe_logp.exp() * (safe_logp - logq)
    return torch.where(has_mass, term, torch.zeros_like(term))
