"""Load tokenizers by name, offline: GPT-2 from its local BPE files, anything else via `resolve_model`.

In: a model name or folder (None means the default SmolLM2).  Out: `load_tokenizer`, its tokenizer with
`pad_token` set (to `eos_token` where it has none), cached per source, so callers treat it as read-only.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tracr_injection.hub.gpt2_bpe import gpt2_bpe_files
from tracr_injection.hub.models import resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GPT2_NAMES = frozenset({"gpt2", "openai-community/gpt2"})
GPT2_CONTEXT = 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_gpt2(name: str | os.PathLike[str] | None) -> bool:
    """Whether `name` means GPT-2's tokenizer ("gpt2" or "openai-community/gpt2", any case)."""
    return name is not None and str(name).strip().lower() in GPT2_NAMES


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for a model name (default SmolLM2), with `pad_token` set; cached, so treat it as read-only."""
    if is_gpt2(name_or_path):
        vocab, merges = gpt2_bpe_files()
        return _gpt2_tokenizer(str(vocab), str(merges))
    return _auto_tokenizer(str(_tokenizer_source(name_or_path)))


def _tokenizer_source(name_or_path: str | os.PathLike[str] | None) -> Path | str:
    """A tokenizer-only local folder as is, else whatever `resolve_model` resolves the name to."""
    if name_or_path is not None:
        path = Path(name_or_path).expanduser()
        if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
            return path
    return resolve_model(name_or_path)


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set `pad_token` to `eos_token` when the tokenizer has none, so batches can be padded."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=8)
def _gpt2_tokenizer(vocab_file: str, merges_file: str) -> PreTrainedTokenizerBase:
    """GPT-2's byte-level BPE tokenizer built from its vocab and merges files (no hub access)."""
    from transformers import GPT2TokenizerFast

    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    # transformers 5 ignores vocab_file/merges_file in the constructor (it builds an empty BPE), so pass the contents.
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=GPT2_CONTEXT)
    return _with_pad(tokenizer)


@functools.lru_cache(maxsize=8)
def _auto_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` for a local folder or a cached hub id, never touching the network."""
    from transformers import AutoTokenizer

    return _with_pad(AutoTokenizer.from_pretrained(source, local_files_only=True))
