"""Natural text for the language-preserving KL term: where its token windows come from.

In: a source name, a tokenizer and a window count and length (and, for `"self"`, the original model).
Out: token windows [N, T], the same for the same seed: sampled from the original model itself (`"self"`,
needs no data), cut from local `.txt`/`.md` files, or streamed from a Hugging Face dataset
(`"hf:NAME[:CONFIG]:SPLIT"`, needs the `datasets` package and network).  `inject.kl_cache` runs the
original model over them once; evaluation's language check samples its held-out windows here too.
"""

from __future__ import annotations

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


class NaturalTextError(TracrInjectionError, ValueError):
    """A natural-text source is unknown, unusable here, or gives too few windows."""


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
