"""Errors of the hub module: a model or tokenizer that cannot be found on this machine.

In: nothing.  Out: `ModelNotFoundError` (raised by `resolve_model`) and its subclass
`TokenizerFilesNotFoundError` (raised by `gpt2_bpe_files`).
"""

from tracr_injection.errors import TracrInjectionError


class ModelNotFoundError(TracrInjectionError, FileNotFoundError):
    """A model (or its tokenizer) is neither a local folder nor available offline; nothing is downloaded."""


class TokenizerFilesNotFoundError(ModelNotFoundError):
    """GPT-2's BPE files (encoder.json + vocab.bpe) are not on this machine and cannot be fetched."""
