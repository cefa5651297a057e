"""The LM adapter on real tiny random models of many architectures, built from configs (nothing downloaded)."""

import itertools
import json

import pytest
import torch
import transformers
from torch import nn

from tracr_injection.errors import TracrInjectionError
from tracr_injection.hub import ModelNotFoundError
from tracr_injection.inject.lm import (
    BLOCK_PATHS,
    LayerMappingError,
    UnsupportedArchitectureError,
    block_output_hidden,
    decoder_blocks,
    edit_block_output,
    forward_precision,
    hidden_size,
    hidden_states,
    layer_mapping,
    load_causal_lm,
    logits_at,
    num_blocks,
    replace_block_output,
)

VOCAB, HIDDEN, LAYERS = 100, 32, 3
LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GEMMA_LIKE = {**LLAMA_LIKE, "head_dim": 8, "num_key_value_heads": 1}

# architecture -> (config factory, path of its decoder blocks)
ARCHITECTURES = {
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "transformer.h",
    ),
    "gptj": (
        lambda: transformers.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            rotary_dim=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "transformer.h",
    ),
    "bloom": (
        lambda: transformers.BloomConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4, bos_token_id=1, eos_token_id=2
        ),
        "transformer.h",
    ),
    "falcon": (
        lambda: transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4
        ),
        "transformer.h",
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "gpt_neox.layers",
    ),
    "opt": (
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "model.decoder.layers",
    ),
    "llama": (lambda: transformers.LlamaConfig(**LLAMA_LIKE), "model.layers"),
    "mistral": (lambda: transformers.MistralConfig(**LLAMA_LIKE), "model.layers"),
    "qwen2": (lambda: transformers.Qwen2Config(**LLAMA_LIKE), "model.layers"),
    "phi3": (lambda: transformers.Phi3Config(**LLAMA_LIKE), "model.layers"),
    "olmo": (lambda: transformers.OlmoConfig(**LLAMA_LIKE), "model.layers"),
    "gemma": (lambda: transformers.GemmaConfig(**GEMMA_LIKE), "model.layers"),
    "gemma2": (lambda: transformers.Gemma2Config(**GEMMA_LIKE, sliding_window=4), "model.layers"),
    "gemma3": (lambda: transformers.Gemma3TextConfig(**GEMMA_LIKE, sliding_window=4), "model.layers"),
}


def build(arch: str) -> nn.Module:
    """A tiny random causal LM of architecture `arch`, seeded, in eval mode (no dropout)."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch][0]()).eval()


@pytest.fixture(scope="module")
def models():
    """Every tiny model, built once for the file."""
    return {arch: build(arch) for arch in ARCHITECTURES}


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture
def batch():
    """(input_ids, attention_mask) with a left-padded row, so masks matter."""
    generator = torch.Generator().manual_seed(1)
    input_ids_BP = torch.randint(3, VOCAB, (2, 7), generator=generator)
    attention_mask_BP = torch.ones_like(input_ids_BP)
    attention_mask_BP[1, :2] = 0
    return input_ids_BP, attention_mask_BP


def get_path(model, path):
    for name in path.split("."):
        model = getattr(model, name)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1], use_cache=False).logits


# ------------------------------------------------------------------------------------------ blocks/sizes


def test_decoder_blocks_sizes(models, arch):
    model, path = models[arch], ARCHITECTURES[arch][1]
    blocks = decoder_blocks(model)
    assert blocks is get_path(model, path)
    assert len(blocks) == num_blocks(model) == LAYERS
    assert hidden_size(model) == HIDDEN
    assert any(word in type(blocks[0]).__name__ for word in ("Layer", "Block"))


class Stacked(nn.Module):
    """A non-HF model: blocks under an unusual attribute `.stack`, a decoy ModuleList of another length."""

    def __init__(self, gpt2, decoy_len=2):
        super().__init__()
        self.config = gpt2.config
        self.embed = gpt2.transformer.wte
        self.stack = gpt2.transformer.h
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(decoy_len))


def test_decoder_blocks_fallback_finds_unique_modulelist(models):
    gpt2 = models["gpt2"]
    model = Stacked(gpt2)
    assert decoder_blocks(model) is gpt2.transformer.h
    assert num_blocks(model) == LAYERS and hidden_size(model) == HIDDEN


def test_decoder_blocks_ambiguous_is_an_error(models):
    with pytest.raises(
        UnsupportedArchitectureError, match=r"Stacked.*several ModuleLists.*\['stack', 'heads'\]"
    ):
        decoder_blocks(Stacked(models["gpt2"], decoy_len=LAYERS))


def test_decoder_blocks_missing_is_an_error():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(**LLAMA_LIKE)
            self.proj = nn.Linear(HIDDEN, HIDDEN)

    with pytest.raises(UnsupportedArchitectureError) as info:
        decoder_blocks(NoBlocks())
    message = str(info.value)
    assert "NoBlocks" in message and "model.layers" in message and "BLOCK_PATHS" in message
    assert isinstance(info.value, TracrInjectionError)


def test_sizes_without_config_are_an_error():
    with pytest.raises(UnsupportedArchitectureError, match="Sequential.*no `config`"):
        num_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedArchitectureError, match="Sequential"):
        decoder_blocks(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)])))


def test_block_paths_cover_the_brief():
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        assert path in BLOCK_PATHS


# ------------------------------------------------------------------------------------------ hidden states


def test_hidden_states_are_raw_block_outputs(models, arch, batch):
    model = models[arch]
    blocks = decoder_blocks(model)
    inputs, outputs = [], []
    handles = [
        blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    ]
    handles += [
        b.register_forward_hook(lambda m, a, out: outputs.append(block_output_hidden(out))) for b in blocks
    ]
    try:
        with torch.no_grad():
            states = hidden_states(model, *batch)
    finally:
        for handle in handles:
            handle.remove()
    assert len(states) == num_blocks(model) + 1 == len(outputs) + 1
    assert states[0].shape == (2, 7, HIDDEN)
    assert torch.equal(states[0], inputs[0])
    for k in range(1, num_blocks(model)):
        assert torch.equal(states[k], outputs[k - 1]), k
    # the last hidden state has the final norm applied: it is not the raw output of the last block
    assert not torch.allclose(states[-1], outputs[-1])


def test_first_hidden_states_equal_the_full_ones_without_running_later_blocks(models, arch, batch):
    model = models[arch]
    blocks = decoder_blocks(model)
    with torch.no_grad():
        full = hidden_states(model, *batch)
        for up_to in range(num_blocks(model)):
            calls = []
            handle = blocks[-1].register_forward_hook(lambda m, a, out: calls.append(1))
            try:
                first = hidden_states(model, *batch, up_to=up_to)
            finally:
                handle.remove()
            assert len(first) == up_to + 1
            assert all(torch.equal(a, b) for a, b in zip(first, full)), up_to
            assert not calls  # the last block never ran
    with pytest.raises(ValueError, match="up_to must be in"):
        hidden_states(model, *batch, up_to=num_blocks(model))


def test_logits_at_some_positions_equal_the_full_logits_there(models, arch, batch):
    model = models[arch]
    rows_N, cols_N = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([6, 2, 6, 3, 4])
    with torch.no_grad():
        some_NV, output = logits_at(model, *batch, rows_N, cols_N, output_hidden_states=True)
    assert some_NV.shape == (5, VOCAB) and len(output.hidden_states) == num_blocks(model) + 1
    assert torch.allclose(some_NV, logits(model, batch)[rows_N, cols_N], atol=1e-5)


def test_identity_replacement_keeps_logits_and_zeroing_changes_them(models, arch, batch):
    model = models[arch]
    block = decoder_blocks(model)[0]
    reference = logits(model, batch)

    seen = []

    def identity(module, args, output):
        seen.append(type(output))
        return replace_block_output(output, block_output_hidden(output))

    handle = block.register_forward_hook(identity)
    try:
        assert torch.equal(logits(model, batch), reference)
    finally:
        handle.remove()
    assert seen  # the hook ran

    handle = block.register_forward_hook(
        lambda m, a, out: replace_block_output(out, torch.zeros_like(block_output_hidden(out)))
    )
    try:
        assert not torch.allclose(logits(model, batch), reference)
    finally:
        handle.remove()
    assert torch.equal(logits(model, batch), reference)  # removed cleanly


def test_forward_precision_runs_the_lms_passes_in_bf16_and_restores_them(models, arch, batch):
    model, other = models[arch], models["llama"]
    reference = logits(model, batch)
    with forward_precision("fp32", model):
        assert "forward" not in vars(model) and torch.equal(logits(model, batch), reference)
    dtypes = []
    handle = decoder_blocks(model)[0].register_forward_hook(
        lambda m, a, out: dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    )  # fmt: skip
    try:
        with forward_precision("bf16", model, model, other), forward_precision("bf16", model):  # nested, repeated
            half = logits(model, batch)
            outside = torch.ones(3, 4) @ torch.ones(4, 2)  # the caller's own math is not autocast
    finally:
        handle.remove()
    assert dtypes == [torch.bfloat16] and outside.dtype == torch.float32
    assert half.dtype == torch.bfloat16 and not torch.equal(half.float(), reference)
    assert torch.allclose(half.float(), reference, atol=0.1, rtol=0.05)
    assert "forward" not in vars(model) and "forward" not in vars(other)
    assert torch.equal(logits(model, batch), reference)  # restored: fp32 again
    with pytest.raises(TracrInjectionError, match="Unknown precision 'fp16'"):
        with forward_precision("fp16", model):
            pass


@pytest.mark.parametrize("capture_first", [False, True])
def test_edit_block_output_is_seen_by_hidden_states(arch, batch, capture_first):
    """transformers installs its hidden-state hooks lazily; the edit must show either way."""
    model = build(arch)
    if capture_first:  # installs transformers' capturing hooks before ours
        with torch.no_grad():
            hidden_states(model, *batch)
    edited = []

    def edit(hidden_BPD):
        edited.append(torch.randn(hidden_BPD.shape, generator=torch.Generator().manual_seed(2)))
        return edited[-1]

    handle = edit_block_output(decoder_blocks(model)[0], edit)
    try:
        with torch.no_grad():
            states = hidden_states(model, *batch)
    finally:
        handle.remove()
    assert len(edited) == 1
    assert torch.equal(states[1], edited[0])
    assert not torch.allclose(states[2], edited[0])


def test_block_output_structures():
    hidden_BPD, other = torch.ones(1, 2, 3), torch.zeros(1)
    new_BPD = torch.full((1, 2, 3), 5.0)
    assert block_output_hidden(hidden_BPD) is hidden_BPD
    assert block_output_hidden((hidden_BPD, None)) is hidden_BPD
    assert replace_block_output(hidden_BPD, new_BPD) is new_BPD
    replaced = replace_block_output((hidden_BPD, other, None), new_BPD)
    assert (
        isinstance(replaced, tuple)
        and replaced[0] is new_BPD
        and replaced[1] is other
        and replaced[2] is None
    )
    replaced_list = replace_block_output([hidden_BPD, other], new_BPD)
    assert isinstance(replaced_list, list) and replaced_list[0] is new_BPD
    for bad in ({"hidden": hidden_BPD}, (), (None, hidden_BPD)):
        with pytest.raises(UnsupportedArchitectureError, match="expected a tensor or a tuple"):
            block_output_hidden(bad)


# ------------------------------------------------------------------------------------------ layer mapping


def test_layer_mapping_identity():
    assert layer_mapping(4, 30) == [0, 1, 2, 3]
    assert layer_mapping(1, 1) == [0]
    assert layer_mapping(12, 12) == list(range(12))  # last level 11 leaves block 11 for the hook


def test_layer_mapping_strided():
    assert layer_mapping(4, 30, "strided") == [0, 10, 19, 29]
    assert layer_mapping(2, 30, "strided") == [0, 29]
    assert layer_mapping(3, 12, "strided") == [0, 6, 11]  # 5.5 rounds half up
    assert layer_mapping(1, 30, "strided") == [0]
    assert layer_mapping(12, 12, "strided") == list(range(12))
    for levels in range(1, 31):
        mapping = layer_mapping(levels, 30, "strided")
        assert mapping[0] == 0 and all(a < b for a, b in itertools.pairwise(mapping))
        assert len(mapping) == levels and mapping[-1] == (29 if levels > 1 else 0)


def test_layer_mapping_spaced_leaves_blocks_to_read_the_output():
    assert layer_mapping(12, 30, "spaced") == list(range(0, 24, 2))  # stride 28 // 11 = 2: roll block 22
    assert layer_mapping(4, 30, "spaced") == [0, 9, 18, 27]
    assert layer_mapping(2, 30, "spaced") == [0, 28]
    assert layer_mapping(12, 12, "spaced") == list(range(12))
    for levels in range(2, 31):
        mapping = layer_mapping(levels, 30, "spaced")
        strides = {b - a for a, b in itertools.pairwise(mapping)}
        assert mapping[0] == 0 and len(strides) == 1 and len(mapping) == levels
        assert mapping[-1] <= (28 if levels < 30 else 29)  # a block after the edited one reads the output


@pytest.mark.parametrize("strategy", ["identity", "strided", "spaced"])
def test_layer_mapping_too_few_blocks(strategy):
    with pytest.raises(LayerMappingError, match=r"22 teacher levels.*12 blocks.*>= 22 blocks"):
        layer_mapping(22, 12, strategy)
    with pytest.raises(LayerMappingError, match="detach-and-roll"):
        layer_mapping(13, 12, strategy)


def test_layer_mapping_bad_arguments():
    with pytest.raises(ValueError, match=r"'diagonal'.*\['identity', 'strided', 'spaced'\]"):
        layer_mapping(3, 12, "diagonal")
    with pytest.raises(LayerMappingError, match="num_teacher_levels"):
        layer_mapping(0, 12)
    with pytest.raises(LayerMappingError, match="num_lm_blocks"):
        layer_mapping(1, 0, "strided")


# ----------------------------------------------------------------------------------------------- loading


def test_load_causal_lm_round_trips(models, tmp_path, batch):
    model = models["llama"]
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm(str(tmp_path / "tiny"))
    assert type(loaded) is type(model)
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(logits(loaded.eval(), batch), logits(model, batch))
    half = load_causal_lm(tmp_path / "tiny", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_causal_lm_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not an existing folder"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        load_causal_lm("no-such-org-xyz/no-such-model-xyz")  # a hub id: looked up in the local cache only
    (tmp_path / "config_only").mkdir()
    transformers.LlamaConfig(**LLAMA_LIKE).save_pretrained(tmp_path / "config_only")
    with pytest.raises(ModelNotFoundError, match="weights"):
        load_causal_lm(str(tmp_path / "config_only"))


def test_load_causal_lm_unknown_or_non_causal(tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "definitely-not-a-model"}))
    with pytest.raises(UnsupportedArchitectureError, match="does not recognise"):
        load_causal_lm(str(unknown))
    transformers.ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(UnsupportedArchitectureError, match="ViTConfig.*no causal LM head"):
        load_causal_lm(str(tmp_path / "vit"))


@pytest.mark.slow
def test_load_smollm2():
    model = load_causal_lm("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(decoder_blocks(model)) == num_blocks(model) == 30
    assert hidden_size(model) == 576
    assert next(model.parameters()).dtype == torch.float32
    assert layer_mapping(4, num_blocks(model), "strided") == [0, 10, 19, 29]
