"""Natural-text windows, the top-k KL cache and the top-k + tail KL, on tiny random Llama models.

The tokenizer is a real character-level `tokenizers` BPE (no merges) over printable ASCII plus a few
special tokens, so its 101 ids fit the tiny models' 128-token vocabulary.
"""

import itertools
import math
import string

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tracr_injection.errors import TracrInjectionError
from tracr_injection.inject.kl_cache import KLCache, KLCacheError, build_kl_cache, topk_of_logits
from tracr_injection.inject.natural_text import (
    NaturalTextError,
    document_start_ids,
    opening_prompts,
    text_windows,
)
from tracr_injection.inject.objective import exact_kl, topk_kl

VOCAB = 128
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>"]
TEXT = (
    "Natural text keeps a language model honest. The quick brown fox jumps over the lazy dog, "
    "and the dog does not mind at all because it is asleep in the warm afternoon sun.\n"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def char_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per printable ASCII character, plus <unk>, <s>, </s>, <|endoftext|>."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """A 2-layer Llama with a 128-token vocabulary, randomly initialised from `seed`, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,  # peaked distributions, so top-k truncation matters
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def original():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def student():
    return tiny_llama(1)


def random_logits(seed: int, shape=(3, 5, 16), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def cache_batch(original_logits_BTV: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """What `KLCache.batch` returns for these original logits (without the input ids)."""
    ids, logp, tail = topk_of_logits(original_logits_BTV, top_k)
    return {"topk_ids": ids.long(), "topk_logp": logp, "log_tail": tail}


# ---------------------------------------------------------------------------------------------- KL


def test_topk_kl_with_k_equal_to_vocab_is_exact():
    p, q = random_logits(0), random_logits(1)
    assert topk_kl(q, cache_batch(p, 16)).item() == pytest.approx(exact_kl(p, q).item(), abs=1e-5)


def test_topk_kl_is_a_lower_bound_that_grows_to_the_exact_kl():
    p, q = random_logits(2, (4, 6, 64)), random_logits(3, (4, 6, 64))
    exact = exact_kl(p, q).item()
    values = [topk_kl(q, cache_batch(p, k)).item() for k in (1, 2, 4, 8, 16, 32, 63, 64)]
    assert all(v <= exact + 1e-5 for v in values)
    assert all(a <= b + 1e-5 for a, b in itertools.pairwise(values))  # coarser partition, lower KL
    assert values[0] < 0.9 * exact and values[-1] == pytest.approx(exact, abs=1e-5)
    assert abs(values[-2] - exact) < abs(values[2] - exact)


def test_topk_kl_is_zero_for_the_original_itself():
    p = random_logits(4)
    for k in (1, 5, 16):
        assert topk_kl(p.clone(), cache_batch(p, k)).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_on_a_hand_computed_four_token_example():
    # p = (.5, .25, .15, .10), q uniform, k = 2: buckets {0}, {1}, tail {2, 3} with p = .25 and q = .5:
    # KL = .5 ln(.5/.25) + .25 ln(.25/.25) + .25 ln(.25/.5) = .25 ln 2.
    p = torch.tensor([0.5, 0.25, 0.15, 0.10]).log().view(1, 1, 4)
    q = torch.zeros(1, 1, 4)
    assert topk_kl(q, cache_batch(p, 2)).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    exact = 0.5 * math.log(2) + 0.15 * math.log(0.6) + 0.10 * math.log(0.4)
    assert exact_kl(p, q).item() == pytest.approx(exact, abs=1e-6)
    assert topk_kl(q, cache_batch(p, 4)).item() == pytest.approx(exact, abs=1e-6)


def test_topk_kl_gradient_matches_the_exact_gradient_at_k_equal_to_vocab():
    p = random_logits(5)
    q_exact = random_logits(6).requires_grad_()
    q_topk = q_exact.detach().clone().requires_grad_()
    exact_kl(p, q_exact).backward()
    topk_kl(q_topk, cache_batch(p, 16)).backward()
    torch.testing.assert_close(q_topk.grad, q_exact.grad, atol=1e-6, rtol=1e-5)


def test_topk_kl_gradient_is_finite_and_points_back_to_the_original():
    p = random_logits(7)
    for k in (1, 3, 16):
        q = random_logits(8).requires_grad_()
        topk_kl(q, cache_batch(p, k)).backward()
        assert torch.isfinite(q.grad).all()
        # one gradient step towards the original lowers the (approximate) KL
        stepped = (q - 0.5 * q.grad / q.grad.norm()).detach()
        assert topk_kl(stepped, cache_batch(p, k)) < topk_kl(q.detach(), cache_batch(p, k))


def test_topk_kl_rejects_a_student_of_the_wrong_shape():
    p = random_logits(9)
    with pytest.raises(KLCacheError, match="do not match"):
        topk_kl(random_logits(10, (3, 4, 16)), cache_batch(p, 4))
    with pytest.raises(KLCacheError, match="vocabulary"):
        topk_kl(random_logits(10, (3, 5, 8)), cache_batch(p, 4))


# ------------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def windows(original, tokenizer):
    return text_windows("self", tokenizer, 6, window_len=12, seed=0, model=original)


def test_build_kl_cache_keeps_the_original_top_k(original, windows):
    cache = build_kl_cache(original, windows, top_k=8, batch_size=4)
    assert len(cache) == 6 and cache.top_k == 8 and cache.window_len == 12 and cache.vocab_size == VOCAB
    assert cache.topk_ids_NTK.dtype == torch.int32 and cache.topk_logp_NTK.dtype == torch.float32
    with torch.no_grad():
        logp_NTV = original(input_ids=windows).logits.log_softmax(-1)
    top_logp, top_ids = logp_NTV.topk(8, dim=-1)
    assert torch.equal(cache.topk_ids_NTK.long(), top_ids)
    torch.testing.assert_close(cache.topk_logp_NTK, top_logp)
    total = cache.topk_logp_NTK.exp().sum(-1) + cache.log_tail_NT.exp()
    torch.testing.assert_close(total, torch.ones_like(total))
    assert torch.equal(cache.input_ids_NT, windows)


def test_build_kl_cache_restores_training_mode_and_checks_k(original, windows):
    original.train()
    try:
        build_kl_cache(original, windows[:2], top_k=2)
        assert original.training
    finally:
        original.eval()
    with pytest.raises(KLCacheError, match="top_k"):
        build_kl_cache(original, windows, top_k=VOCAB + 1)


def test_cached_topk_kl_equals_exact_kl_on_models_at_full_k(original, student, windows):
    cache = build_kl_cache(original, windows, top_k=VOCAB)
    rows = cache.batch([0, 2, 5])
    with torch.no_grad():
        p, q = original(input_ids=rows["input_ids"]).logits, student(input_ids=rows["input_ids"]).logits
    exact = exact_kl(p, q).item()
    assert exact > 0.1
    assert topk_kl(q, rows).item() == pytest.approx(exact, abs=1e-5)
    small = build_kl_cache(original, windows, top_k=4).batch([0, 2, 5])
    assert topk_kl(q, small).item() <= exact + 1e-5


def test_kl_cache_round_trip_and_batch_rows(original, windows, tmp_path):
    cache = build_kl_cache(original, windows, top_k=5)
    path = cache.save(tmp_path / "sub" / "kl.safetensors")
    loaded = KLCache.load(path)
    assert len(loaded) == len(cache) and loaded.vocab_size == cache.vocab_size and loaded.top_k == 5
    for a, b in zip(cache._tensors(), loaded._tensors()):
        assert torch.equal(a, b) and a.dtype == b.dtype
    rows = loaded.batch(torch.tensor([4, 1]))
    assert set(rows) == {"input_ids", "topk_ids", "topk_logp", "log_tail"}
    assert rows["topk_ids"].dtype == torch.long and rows["topk_ids"].shape == (2, 12, 5)
    assert torch.equal(rows["input_ids"], windows[[4, 1]])
    assert torch.equal(rows["topk_logp"][1], cache.topk_logp_NTK[1])
    assert torch.equal(loaded.batch(slice(1, 3))["log_tail"], cache.log_tail_NT[1:3])


def test_kl_cache_load_errors_are_clear(original, windows, tmp_path):
    with pytest.raises(KLCacheError, match="no KL cache"):
        KLCache.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(KLCacheError, match="cannot read"):
        KLCache.load(garbage)
    cache = build_kl_cache(original, windows, top_k=3)
    metadata = cache._metadata()
    mismatched = tmp_path / "mismatched.safetensors"
    tensors = dict(zip(("input_ids", "topk_ids", "topk_logp", "log_tail"), cache._tensors()))
    save_file({**tensors, "log_tail": tensors["log_tail"][:, :-1].contiguous()}, str(mismatched), metadata)
    with pytest.raises(KLCacheError, match="inconsistent"):
        KLCache.load(mismatched)
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), {"format": "something-else"})
    with pytest.raises(KLCacheError, match="not a version"):
        KLCache.load(foreign)
    assert issubclass(KLCacheError, TracrInjectionError)


# ----------------------------------------------------------------------------------------- windows


def test_self_windows_are_deterministic_per_seed(original, tokenizer, windows):
    assert windows.shape == (6, 12) and windows.dtype == torch.long
    again = text_windows("self", tokenizer, 6, window_len=12, seed=0, model=original)
    assert torch.equal(windows, again)
    other = text_windows("self", tokenizer, 6, window_len=12, seed=1, model=original)
    assert not torch.equal(windows, other)


def test_self_windows_start_at_a_document_and_sample_no_special_tokens(original, tokenizer, windows):
    assert document_start_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    prompts = {tuple(p) for p in opening_prompts(tokenizer)}
    for row in windows.tolist():
        assert any(tuple(row[: len(p)]) == p for p in prompts)
        special = set(tokenizer.all_special_ids)
        assert not special & set(row[1:])
        assert max(row) < len(tokenizer)  # never an output row the tokenizer cannot decode


def test_self_windows_use_the_bos_a_tokenizer_adds_itself(original):
    with_bos = char_tokenizer(adds_bos=True)
    assert document_start_ids(with_bos) == []
    assert all(prompt[0] == with_bos.bos_token_id for prompt in opening_prompts(with_bos))
    windows_NT = text_windows("self", with_bos, 3, window_len=10, seed=0, model=original)
    assert (windows_NT[:, 0] == with_bos.bos_token_id).all()


def test_self_windows_need_a_model(tokenizer):
    with pytest.raises(NaturalTextError, match="model="):
        text_windows("self", tokenizer, 2)


def write_corpus(folder, repeats: int) -> None:
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT * repeats, encoding="utf-8")
    (folder / "nested").mkdir()
    (folder / "nested" / "b.md").write_text(TEXT.upper() * repeats, encoding="utf-8")
    (folder / "ignored.py").write_text("x = 1\n" * 1000, encoding="utf-8")


def test_local_folder_windows(tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    write_corpus(folder, repeats=3)  # 3 * 170 characters = 512 tokens per file: 42 windows of 12 each
    windows_NT = text_windows(folder, tokenizer, 80, window_len=12, seed=0)
    assert windows_NT.shape == (80, 12)
    assert torch.equal(windows_NT, text_windows(str(folder), tokenizer, 80, window_len=12, seed=0))
    assert not torch.equal(windows_NT, text_windows(folder, tokenizer, 80, window_len=12, seed=1))
    texts = [tokenizer.decode(row) for row in windows_NT.tolist()]
    assert all(text in TEXT * 3 or text in TEXT.upper() * 3 for text in texts)
    assert any(text.isupper() for text in texts) and "x = 1" not in "".join(texts)
    single = text_windows(folder / "a.txt", tokenizer, 10, window_len=12, seed=0)
    assert all(tokenizer.decode(row) in TEXT * 3 for row in single.tolist())


def test_too_little_local_text_is_a_clear_error(tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    write_corpus(folder, repeats=1)
    with pytest.raises(NaturalTextError, match=r"only \d+ windows .* fewer than the 500"):
        text_windows(folder, tokenizer, 500, window_len=12)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NaturalTextError, match="no .txt or .md"):
        text_windows(tmp_path / "empty", tokenizer, 1)
    with pytest.raises(NaturalTextError, match="unknown natural-text source"):
        text_windows(tmp_path / "nowhere", tokenizer, 1)


def test_hugging_face_source_fails_clearly_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NaturalTextError, match=r"needs the `datasets` package and network.*\"self\""):
        text_windows("hf:HuggingFaceFW/fineweb-edu:sample-10BT:train", tokenizer, 4)
    with pytest.raises(NaturalTextError, match="hf:NAME"):
        text_windows("hf:only-a-name", tokenizer, 4)
