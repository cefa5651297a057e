"""Shared fixtures: every test gets its own teacher cache so runs never touch ~/.cache; modules that compile
teachers share one cache; tiny random Llama models over SmolLM2's real tokenizer."""

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the artifact cache at a per-test temporary folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRACR_INJECTION_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One teacher/targets/KL cache per test module (keyed by content hashes, so sharing is safe)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def shared_cache(isolated_cache, module_cache, monkeypatch):
    """Use the module's cache instead of the per-test one (`pytestmark = pytest.mark.usefixtures(...)`)."""
    monkeypatch.setenv("TRACR_INJECTION_CACHE", str(module_cache))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny matmuls on a shared 2-core machine run far faster (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama_config(tokenizer: Any, **overrides: Any) -> LlamaConfig:
    """A 4-block, hidden-32 Llama config over `tokenizer`'s vocabulary (pad and EOS from the tokenizer)."""
    fields = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": True, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
    }  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})


def build_tiny_llama(tokenizer: Any, **overrides: Any) -> LlamaForCausalLM:
    """A `tiny_llama_config` model randomly initialised with seed 0."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides))


def save_tiny_llama(folder: Path, tokenizer: Any, **overrides: Any) -> str:
    """`build_tiny_llama` saved with its tokenizer as a local model folder; returns the folder."""
    build_tiny_llama(tokenizer, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
