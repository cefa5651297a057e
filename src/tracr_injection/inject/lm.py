"""Architecture-agnostic access to Hugging Face causal LMs: decoder blocks, sizes, hidden states, block hooks.

In: a model name or folder (`load_causal_lm`) or a loaded causal LM and its inputs.  Out: the model, its
decoder blocks, hidden size and block count, its hidden states and logits at chosen positions, forward hooks
that edit a block's output, and `layer_mapping` (teacher levels -> hidden-state indices).

Injection aligns a linear map of the LM's hidden states to the teacher's residual streams level by level,
and edits a later block's output with a forward hook ("detach-and-roll"). This module hides how each
architecture names its blocks and shapes its outputs.

Hidden-state indices (the tuple `hidden_states` returns, length `num_blocks(model) + 1`):

- index 0 is the input of block 0: the embedding output (with position embeddings added for GPT-2/OPT,
  scaled by sqrt(hidden) for Gemma);
- index k, 1 <= k <= num_blocks - 1, is the raw output of block k - 1 (= the input of block k);
- the LAST index has the model's final norm applied (transformers overwrites it with
  `last_hidden_state`), so it is NOT the raw output of the last block. Align teacher levels to indices
  0..num_blocks - 1 only; `layer_mapping` never returns the last index.

In transformers 5.x most decoder layers return a bare tensor; a few (BLOOM, Falcon) still return a tuple
whose first element is the hidden state. `block_output_hidden` / `replace_block_output` handle both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils.hooks import RemovableHandle

from tracr_injection.errors import ArtifactError, InvalidArgumentError, TracrInjectionError
from tracr_injection.hub import ModelNotFoundError, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma/Gemma2/Gemma3, Phi3, OLMo, SmolLM2
    "transformer.h",  # GPT-2, GPT-J, BLOOM, Falcon
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "layers",  # bare decoder models (LlamaModel, GPTNeoXModel, ...)
    "h",  # bare GPT2Model / GPTJModel / BloomModel / FalconModel
    "decoder.layers",  # bare OPTModel
)
"""Attribute paths (dotted, from the model) tried in order before the generic ModuleList search."""

HIDDEN_SIZE_KEYS: tuple[str, ...] = ("hidden_size", "n_embd", "d_model")
NUM_LAYERS_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYER_MAPPING_STRATEGIES: tuple[str, ...] = ("identity", "strided", "spaced")

BlockOutput = torch.Tensor | tuple[Any, ...] | list[Any]


class UnsupportedArchitectureError(TracrInjectionError):
    """The model's decoder blocks, sizes or block outputs cannot be found generically, or it is not a causal LM."""


class LayerMappingError(TracrInjectionError, ValueError):
    """Teacher levels cannot be mapped onto the LM's hidden states (too few LM blocks, or bad arguments)."""


# --------------------------------------------------------------------------------------------- loading


@contextmanager
def inference(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; each model's training flag is restored after."""
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for model, flag in zip(models, was_training):
            model.train(flag)


def use_training_attention(model: nn.Module, device: torch.device) -> None:
    """Train with `eager` attention on a CPU where the model would use SDPA: SDPA's CPU flash-attention
    backward was ~17% of a bf16 SmolLM2 step at this project's sequence lengths (<= ~130 tokens); eager
    made the bf16 step 1.26x faster and left fp32 steps and forward-only passes as they were
    (`benchmarks/results/step_kernels.json`).  Other devices keep SDPA."""
    if device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation("eager")


EVAL_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@contextmanager
def forward_precision(precision: str, *models: nn.Module) -> Iterator[None]:
    """Run each model's forward passes (and the hooks inside them) under bf16 autocast for the block when
    `precision` is "bf16"; "fp32" changes nothing.  Only the LMs' own passes: what the caller computes from
    their outputs (a teacher, linear decoders, a ridge fit) stays fp32, and the weights are not cast.  Why:
    evaluation is LM-bound, and a CPU with AMX (or a GPU) runs bf16 matmuls several times faster."""
    if precision not in EVAL_PRECISIONS:
        raise InvalidArgumentError(f"Unknown precision {precision!r}; choose from {', '.join(EVAL_PRECISIONS)}.")
    patched = [] if precision == "fp32" else list({id(m): m for m in models}.values())
    saved = [(model, model.__dict__.get("forward")) for model in patched]
    for model in patched:
        device = next(model.parameters()).device.type
        model.forward = torch.autocast(device, dtype=torch.bfloat16)(model.forward)
    try:
        yield
    finally:
        for model, own in reversed(saved):
            if own is None:
                del model.forward
            else:
                model.forward = own


def load_causal_lm(
    name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> PreTrainedModel:
    """Load a causal LM offline (None/"smollm2" -> bundled SmolLM2, a local folder, or a cached hub id).

    Raises `ModelNotFoundError` for a model not on this machine and `UnsupportedArchitectureError` for a
    config transformers does not know or that is not a causal LM; extra kwargs go to `from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    source = str(resolve_model(name_or_path))
    config = _load_config(source)
    if not _is_causal_lm_config(config):
        raise UnsupportedArchitectureError(
            f"{source!r} is a {type(config).__name__} (model_type {config.model_type!r}), which has no causal "
            f"LM head in transformers (AutoModelForCausalLM). Pass a decoder-only causal language model."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, local_files_only=True, **kwargs
        )
    except OSError as error:
        raise ModelNotFoundError(
            f"Cannot load the weights of {source!r}: {error}. Pass a folder holding config.json and its "
            f"weights (model.safetensors or pytorch_model.bin), e.g. one written by `save_pretrained`."
        ) from error
    except SafetensorError as error:
        damaged = ", ".join(map(str, damaged_safetensors(Path(source)))) or source
        raise ArtifactError(f"{damaged} is damaged or truncated ({error}); re-train or restore it.") from error


def damaged_safetensors(folder: Path) -> list[Path]:
    """The safetensors files in `folder` whose header does not cover the file (truncated or overwritten)."""
    damaged = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError:
            damaged.append(path)
    return damaged


def vocab_size(name_or_path: str | Path | None) -> int:
    """The width of the model's logits (its config's vocab_size), read without loading the weights."""
    return int(_load_config(str(resolve_model(name_or_path))).get_text_config().vocab_size)


def _load_config(source: str) -> Any:
    """The model's `PretrainedConfig`, or `UnsupportedArchitectureError` when transformers cannot parse it."""
    import transformers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except ValueError as error:
        raise UnsupportedArchitectureError(
            f"transformers {transformers.__version__} does not recognise the model in {source!r} "
            f"(its config.json's model_type, or it needs remote code, which is never run here): {error}"
        ) from error


def _is_causal_lm_config(config: Any) -> bool:
    """Whether `AutoModelForCausalLM` has a model class registered for this config class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


# ----------------------------------------------------------------------------------------- config sizes


def _text_config(model: nn.Module) -> Any:
    """The model's (text/decoder) config, or None for a module without one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config


def _config_int(model: nn.Module, keys: Sequence[str], what: str) -> int:
    """The first integer config attribute among `keys`, else `UnsupportedArchitectureError`."""
    config = _text_config(model)
    for key in keys:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise UnsupportedArchitectureError(
        f"Cannot read the {what} of {type(model).__name__}: its config has none of {list(keys)}"
        f"{'' if config is not None else ' (it has no `config` attribute)'}."
    )


def hidden_size(model: nn.Module) -> int:
    """The LM's residual-stream width d_model, read from its config (hidden_size / n_embd / d_model)."""
    return _config_int(model, HIDDEN_SIZE_KEYS, "hidden size")


def num_blocks(model: nn.Module) -> int:
    """The number of decoder blocks, read from the config (num_hidden_layers / n_layer / ...)."""
    return _config_int(model, NUM_LAYERS_KEYS, "number of decoder layers")


# --------------------------------------------------------------------------------------- decoder blocks


def _get_path(model: nn.Module, path: str) -> Any:
    """The attribute at dotted `path` below `model`, or None if any step is missing."""
    current: Any = model
    for name in path.split("."):
        current = getattr(current, name, None)
        if current is None:
            return None
    return current


def _expected_blocks(model: nn.Module) -> int | None:
    """`num_blocks(model)` when the config says, else None."""
    try:
        return num_blocks(model)
    except UnsupportedArchitectureError:
        return None


def _blocks_at_known_path(model: nn.Module, expected: int | None) -> nn.ModuleList | None:
    """The first `BLOCK_PATHS` entry that is a ModuleList of the expected length (any length if unknown)."""
    for path in BLOCK_PATHS:
        candidate = _get_path(model, path)
        if isinstance(candidate, nn.ModuleList) and (expected is None or len(candidate) == expected):
            return candidate
    return None


def _blocks_by_search(model: nn.Module, expected: int | None) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList in the model (name, list) whose length equals the config's layer count."""
    if expected is None:
        return []
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == expected
    ]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: a known attribute path, else the unique ModuleList of length num_blocks.

    Raises `UnsupportedArchitectureError` naming the class and the paths tried when none (or several) match.
    """
    expected = _expected_blocks(model)
    found = _blocks_at_known_path(model, expected)
    if found is not None:
        return found
    candidates = _blocks_by_search(model, expected)
    if len(candidates) == 1:
        return candidates[0][1]
    if expected is None:
        why = "its config gives no layer count (num_hidden_layers / n_layer), so no ModuleList can be matched"
    elif candidates:
        why = f"several ModuleLists have {expected} entries: {[name for name, _ in candidates]}"
    else:
        why = f"no ModuleList in it has {expected} entries (the config's layer count)"
    raise UnsupportedArchitectureError(
        f"Cannot find the decoder blocks of {type(model).__name__}: none of the known paths "
        f"{list(BLOCK_PATHS)} holds them and {why}. Pass a model whose decoder layers are one "
        f"nn.ModuleList, or add its attribute path to tracr_injection.inject.lm.BLOCK_PATHS."
    )


# ---------------------------------------------------------------------------------------- block outputs


def block_output_hidden(output: BlockOutput) -> torch.Tensor:
    """The hidden state (batch, pos, d_model) in a decoder block's forward output: a tensor or a tuple's first item.

    Which one an architecture returns differs across models and transformers versions.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedArchitectureError(
        f"A decoder block returned {type(output).__name__}; expected a tensor or a tuple whose first "
        f"element is the hidden-state tensor."
    )


def replace_block_output(output: BlockOutput, new_hidden_BPD: torch.Tensor) -> BlockOutput:
    """`output` with its hidden state replaced by `new_hidden_BPD`, same structure; for hooks editing a block."""
    block_output_hidden(output)  # validates the structure
    if isinstance(output, torch.Tensor):
        return new_hidden_BPD
    rest = list(output[1:])
    return (new_hidden_BPD, *rest) if isinstance(output, tuple) else [new_hidden_BPD, *rest]


def edit_block_output(block: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
    """Register a forward hook replacing `block`'s hidden-state output by `edit(hidden_BPD)`; returns its handle.

    The hook is prepended so that transformers' own output-capturing hooks (installed lazily, on the first
    `output_hidden_states=True` call) always see the edited state: `hidden_states[k + 1]` then reflects an
    edit of block k whatever the order of registration, and equals what block k + 1 receives.
    """

    def hook(module: nn.Module, args: Any, output: BlockOutput) -> BlockOutput:
        return replace_block_output(output, edit(block_output_hidden(output)))

    return block.register_forward_hook(hook, prepend=True)


# -------------------------------------------------------------------------------------- hidden states


class _EnoughHiddenStates(Exception):
    """Raised by a capturing hook once every hidden state asked for is in hand (the rest is skipped)."""


def hidden_states(
    model: nn.Module,
    input_ids_BP: torch.Tensor,
    attention_mask_BP: torch.Tensor | None = None,
    up_to: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Run the model with `output_hidden_states=True` and return its num_blocks + 1 hidden states.

    Index 0 is the embedding output, k in 1..num_blocks-1 the raw output of block k-1, and the last one
    has the final norm applied (see the module docstring). Gradients flow unless the caller disables them.
    With `up_to` < num_blocks only indices 0..up_to are returned, and the blocks after block up_to - 1 and
    the head never run (decoding reads the first few aligned levels of a ~30-block LM).
    """
    if up_to is not None:
        if not 0 <= up_to < num_blocks(model):
            raise InvalidArgumentError(f"up_to must be in 0..{num_blocks(model) - 1} (raw hidden states), got {up_to}.")
        return first_hidden_states(model, input_ids_BP, attention_mask_BP, up_to)
    output = model(
        input_ids=input_ids_BP, attention_mask=attention_mask_BP, output_hidden_states=True, use_cache=False
    )
    states = tuple(output.hidden_states)
    expected = num_blocks(model) + 1
    if len(states) != expected:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} returned {len(states)} hidden states, expected num_blocks + 1 = {expected}."
        )
    return states


def first_hidden_states(
    model: nn.Module, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor | None, up_to: int
) -> tuple[torch.Tensor, ...]:
    """Hidden states 0..`up_to` (block 0's input, then raw block outputs), captured by hooks; the forward
    pass stops after block `up_to` - 1.  Unlike `hidden_states`, index num_blocks is the raw output of the
    last block (no final norm)."""
    blocks = decoder_blocks(model)
    if not 0 <= up_to <= len(blocks):
        raise InvalidArgumentError(f"up_to must be in 0..{len(blocks)} (raw hidden states), got {up_to}.")
    captured: list[torch.Tensor] = []

    def capture(hidden_BPD: torch.Tensor) -> None:
        captured.append(hidden_BPD)
        if len(captured) == up_to + 1:
            raise _EnoughHiddenStates

    def keep_input(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        capture(args[0] if args else kwargs["hidden_states"])

    def keep_output(module: nn.Module, args: Any, output: BlockOutput) -> None:
        capture(block_output_hidden(output))

    handles = [blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [block.register_forward_hook(keep_output) for block in blocks[:up_to]]
    try:
        model(input_ids=input_ids_BP, attention_mask=attention_mask_BP, use_cache=False)
    except _EnoughHiddenStates:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return tuple(captured)


def logits_at(
    model: nn.Module,
    input_ids_BP: torch.Tensor,
    attention_mask_BP: torch.Tensor | None,
    rows_N: torch.Tensor,
    cols_N: torch.Tensor,
    **forward_kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Logits [N, V] at the positions (rows_N[i], cols_N[i]) only, and the model's output.

    The head runs only at the columns asked for (transformers' `logits_to_keep`): with a 49k-token
    vocabulary it costs about a fifth of SmolLM2's forward pass per position, and the evaluation needs
    the logits at a few answer positions of each row.
    """
    keep_K, column_N = torch.unique(cols_N, return_inverse=True)
    output = model(
        input_ids=input_ids_BP,
        attention_mask=attention_mask_BP,
        logits_to_keep=keep_K.to(input_ids_BP.device),
        use_cache=False,
        **forward_kwargs,
    )
    return output.logits[rows_N.to(output.logits.device), column_N.to(output.logits.device)], output


# -------------------------------------------------------------------------------------- layer mapping


def _check_mapping_args(num_teacher_levels: int, num_lm_blocks: int, strategy: str) -> None:
    """Reject an unknown strategy, no teacher levels, or an LM without blocks."""
    if strategy not in LAYER_MAPPING_STRATEGIES:
        raise LayerMappingError(
            f"Unknown layer-mapping strategy {strategy!r}; valid ones: {list(LAYER_MAPPING_STRATEGIES)}."
        )
    if num_teacher_levels < 1:
        raise LayerMappingError(
            f"num_teacher_levels must be >= 1 (level 0 = embeddings), got {num_teacher_levels}."
        )
    if num_lm_blocks < 1:
        raise LayerMappingError(f"num_lm_blocks must be >= 1, got {num_lm_blocks}.")


def _check_enough_blocks(num_teacher_levels: int, num_lm_blocks: int, strategy: str) -> None:
    """Raise unless every level gets its own hidden state 0..num_lm_blocks-1, leaving a block for the hook."""
    if num_teacher_levels <= num_lm_blocks:
        return
    raise LayerMappingError(
        f"Cannot map {num_teacher_levels} teacher levels onto an LM with {num_lm_blocks} blocks "
        f"(strategy {strategy!r}): each level needs its own LM hidden state among 0..{num_lm_blocks - 1}, "
        f"and at least one block must remain after the last aligned level for the detach-and-roll hook, so "
        f"the LM needs >= {num_teacher_levels} blocks. Every strategy needs that many; use a deeper LM or "
        f"a RASP program that compiles to fewer layers."
    )


def layer_mapping(num_teacher_levels: int, num_lm_blocks: int, strategy: str = "identity") -> list[int]:
    """LM hidden-state index for each teacher level (level 0 = teacher embeddings -> LM index 0).

    "identity" maps level i to index i (as in the paper); "strided" spreads the levels evenly over the
    LM's depth, the last one at index num_lm_blocks - 1 so that one block remains for the edit hook (and
    none after it reads the output subspace); "spaced" maps level i to i * stride with the largest stride
    that leaves at least one block after the edited one, so every level gets the same number of blocks to
    be computed in and the rest read the output (12 levels on SmolLM2's 30 blocks: stride 2, 7 blocks left).
    """
    _check_mapping_args(num_teacher_levels, num_lm_blocks, strategy)
    _check_enough_blocks(num_teacher_levels, num_lm_blocks, strategy)
    if strategy == "identity" or num_teacher_levels == 1:
        return list(range(num_teacher_levels))
    if strategy == "spaced":
        stride = max(1, (num_lm_blocks - 2) // (num_teacher_levels - 1))
        return [i * stride for i in range(num_teacher_levels)]
    steps, top = num_teacher_levels - 1, num_lm_blocks - 1
    # round(i * top / steps), half up, in exact integer arithmetic (strictly increasing since top >= steps)
    return [(2 * i * top + steps) // (2 * steps) for i in range(num_teacher_levels)]
