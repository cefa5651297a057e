"""Where the package keeps its caches: environment in, folders out (nothing here creates a folder).

In: `$TRACR_INJECTION_CACHE` (teachers, teacher targets, KL caches) and `$TRACR_INJECTION_MODELS`
(converted models, tokenizer files), both optional.  Out: the folder of each kind of cached file; by
default all of them lie under `~/.cache/tracr-injection`.  The models folder does not follow
`$TRACR_INJECTION_CACHE`, so a per-test cache does not convert the models again.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TRACR_INJECTION_CACHE"
MODELS_ENV = "TRACR_INJECTION_MODELS"


def default_cache_root() -> Path:
    """`~/.cache/tracr-injection`: the cache root when no environment variable says otherwise."""
    return Path.home() / ".cache" / "tracr-injection"


def cache_root() -> Path:
    """`$TRACR_INJECTION_CACHE`, else `default_cache_root()`."""
    return Path(os.environ.get(CACHE_ENV, default_cache_root()))


def teachers_dir() -> Path:
    """Compiled teacher artifacts: `<cache root>/teachers`."""
    return cache_root() / "teachers"


def targets_dir() -> Path:
    """Teacher targets precomputed per (task, split, tokenizer, teacher): `<cache root>/targets`."""
    return cache_root() / "targets"


def kl_dir() -> Path:
    """The original model's next-token distributions on natural text: `<cache root>/kl`."""
    return cache_root() / "kl"


def heldout_dir() -> Path:
    """Held-out windows the original model sampled, per base model and seed: `<cache root>/heldout`."""
    return cache_root() / "heldout"


def models_dir() -> Path:
    """`$TRACR_INJECTION_MODELS`, else `<default cache root>/models` (never under `$TRACR_INJECTION_CACHE`)."""
    return Path(os.environ.get(MODELS_ENV, default_cache_root() / "models")).expanduser()
