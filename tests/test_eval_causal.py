"""Causal tests on a tiny Llama briefly trained on Dyck (accuracy strictly between 0 and 1): zero noise and
self-interchange change nothing, noise has the asked norm inside the subspace, ablation leaves a state
orthogonal to it, and a full-space interchange at the last block reproduces the source run exactly.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import build_tiny_llama

from tracr_injection.evaluate.causal import (
    CausalTestError,
    ablate_edit,
    aligned_source,
    answers_hit,
    block_output,
    causal_tests,
    edited_accuracy,
    edited_answer_logits,
    edited_block,
    interchange_edit,
    interchange_pairs,
    interchange_rates,
    interchanged_logits,
    noise_curve,
    noise_edit,
    random_subspace,
    row_space_basis,
    spliced_batch,
)
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.answers import answer_positions, answers_correct, exact_match_accuracy
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import decoder_blocks, hidden_states
from tracr_injection.inject.objective import output_projector, task_loss

D = 32
COUNT = 48


@pytest.fixture(scope="module")
def data():
    """48 Dyck test examples bridged for SmolLM2's tokenizer (no teacher needed)."""
    return TaskData("dyck", "test", load_tokenizer("smollm2"), "smollm2", max_examples=COUNT, progress=False)


@pytest.fixture(scope="module")
def model(data):
    """A 4-block random Llama trained for a few full-batch steps on the answers: it is right on some examples."""
    lm = build_tiny_llama(load_tokenizer("smollm2"), hidden_size=D)
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-2)
    batch = data.collate(range(len(data)))
    b_idx, pos, target = answer_positions(batch["labels"])
    for _ in range(24):
        hidden = lm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        loss = task_loss(lm.lm_head(hidden[b_idx, pos]), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lm.eval()


def batch_of(data: TaskData, indices) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in data.collate(list(indices)).items() if k in ("input_ids", "attention_mask", "labels")
    }


def projector(basis_KD: torch.Tensor) -> torch.Tensor:
    return basis_KD.T @ basis_KD


# --------------------------------------------------------------------------------------- subspaces


def test_random_subspace_is_orthonormal_and_seeded():
    rows = random_subspace(D, 5, seed=3)
    assert rows.shape == (5, D)
    assert torch.allclose(rows @ rows.T, torch.eye(5), atol=1e-6)
    assert torch.equal(rows, random_subspace(D, 5, seed=3))
    assert not torch.allclose(rows, random_subspace(D, 5, seed=4))
    with pytest.raises(CausalTestError, match="k <= d_lm"):
        random_subspace(D, D + 1, seed=0)


def test_row_space_basis_gives_output_projectors_projector_and_the_rank():
    torch.manual_seed(0)
    amap = AlignmentMap(D, 6)
    basis = row_space_basis(amap.linear.weight[[1, 3, 4]])
    assert basis.shape == (3, D)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(projector(basis), output_projector(amap, [1, 3, 4]), atol=1e-5)
    r0, r1 = torch.randn(2, D)
    dependent = torch.stack([r0, r1, r0 + 2 * r1])
    basis = row_space_basis(dependent)
    assert basis.shape == (2, D)
    assert torch.allclose(dependent @ projector(basis), dependent, atol=1e-5)
    with pytest.raises(CausalTestError, match="all zero"):
        row_space_basis(torch.zeros(2, D))


# ------------------------------------------------------------------------------------------- noise


def draw(*shape: int) -> torch.Tensor:
    """A seeded Gaussian draw of `shape`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_noise_edit_has_the_asked_norm_and_lies_in_the_subspace():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, D) * 3
    basis = random_subspace(D, 3, seed=1)
    noisy = noise_edit(hidden, basis, 5.0, relative=False, gaussian_BPK=draw(2, 5, 3))
    noise = noisy - hidden
    assert torch.allclose(noise.norm(dim=-1), torch.full((2, 5), 5.0), atol=1e-5)
    assert torch.allclose(noise @ projector(basis), noise, atol=1e-5)
    assert not torch.allclose(noise[0, 0], noise[0, 1])  # a fresh direction per position
    again = noise_edit(hidden, basis, 5.0, relative=False, gaussian_BPK=draw(2, 5, 3))
    assert torch.equal(noisy, again)
    relative = noise_edit(hidden, basis, 0.5, relative=True, gaussian_BPK=draw(2, 5, 3)) - hidden
    assert torch.allclose(relative.norm(dim=-1), 0.5 * hidden.norm(dim=-1), atol=1e-5)
    assert torch.allclose(relative @ projector(basis), relative, atol=1e-5)
    for is_relative in (False, True):
        same = noise_edit(hidden, basis, 0.0, relative=is_relative, gaussian_BPK=draw(2, 5, 3))
        assert torch.equal(same, hidden)


def test_zero_noise_in_the_model_leaves_logits_and_accuracy_unchanged(model, data):
    block = decoder_blocks(model)[1]
    basis = random_subspace(D, 3, seed=0)
    batch = batch_of(data, range(8))
    clean_logits = edited_answer_logits(model, block, batch, None)
    for relative in (False, True):
        gaussian = draw(*batch["input_ids"].shape, 3)
        edit = partial(noise_edit, basis_KD=basis, norm=0.0, relative=relative, gaussian_BPK=gaussian)
        assert torch.equal(edited_answer_logits(model, block, batch, edit), clean_logits)
    clean = exact_match_accuracy(model, data, COUNT)
    assert 0 < clean < 1  # the fixture model is right on some examples, wrong on others
    curve = noise_curve(
        model, block, basis, data, [0.0, 30.0], relative=False, count=COUNT, seed=0, batch_size=16
    )
    assert curve[0] == clean


def test_noise_seen_by_the_next_block_has_the_asked_norm_inside_the_subspace(model, data):
    batch = batch_of(data, range(4))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    basis = random_subspace(D, 3, seed=2)
    with torch.no_grad():
        clean = hidden_states(model, ids, mask)
        for norm, relative, expected in ((5.0, False, torch.full(ids.shape, 5.0)), (0.25, True, None)):
            edit = partial(
                noise_edit, basis_KD=basis, norm=norm, relative=relative, gaussian_BPK=draw(*ids.shape, 3)
            )
            with edited_block(decoder_blocks(model)[1], edit):
                noisy = hidden_states(model, ids, mask)
            assert torch.equal(noisy[1], clean[1])  # before block 1's output: untouched
            noise = noisy[2] - clean[2]  # captured by transformers' hook on block 1's output
            expected = expected if expected is not None else norm * clean[2].norm(dim=-1)
            assert torch.allclose(noise.norm(dim=-1), expected, atol=1e-4)
            assert torch.allclose(noise @ projector(basis), noise, atol=1e-4)


# ---------------------------------------------------------------------------------------- ablation


def test_ablation_removes_exactly_the_subspace_component(model, data):
    batch = batch_of(data, range(4))
    basis = random_subspace(D, 4, seed=5)
    with torch.no_grad():
        clean = hidden_states(model, batch["input_ids"], batch["attention_mask"])[3]
        with edited_block(decoder_blocks(model)[2], partial(ablate_edit, basis_KD=basis)):
            ablated = hidden_states(model, batch["input_ids"], batch["attention_mask"])[3]
    assert torch.allclose(ablated @ basis.T, torch.zeros(4, ablated.shape[1], 4), atol=1e-5)
    assert torch.allclose(ablated + clean @ projector(basis), clean, atol=1e-5)


# ------------------------------------------------------------------------------------- interchange


def test_interchange_pairs_have_different_answers_and_are_seeded(data):
    pairs = interchange_pairs(data, COUNT, 20, seed=0)
    assert len(pairs) == 20
    answer = [tuple(b.input_ids[b.prompt_len :]) for b in data.bridged]
    assert all(answer[base] != answer[source] for base, source in pairs)
    assert pairs == interchange_pairs(data, COUNT, 20, seed=0)
    assert pairs != interchange_pairs(data, COUNT, 20, seed=1)
    with pytest.raises(CausalTestError, match="different answers"):
        interchange_pairs(data, 1, 5, seed=0)


def test_spliced_batch_is_base_prompt_then_source_answer(data):
    base, source = data.bridged[0], data.bridged[1]
    batch = spliced_batch(data, [(0, 1), (1, 1)])
    ids = base.input_ids[: base.prompt_len] + source.input_ids[source.prompt_len :]
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert (
        batch["labels"][0, : len(ids)].tolist()
        == [-100] * base.prompt_len + source.labels[source.prompt_len :]
    )
    assert batch["attention_mask"][0].sum() == len(ids)
    assert torch.equal(batch["input_ids"][1, : len(source)], torch.tensor(source.input_ids))


def test_aligned_source_matches_answer_positions_by_order():
    source_labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, 5, 6, 7, -100, -100]])
    target_labels = torch.tensor([[-100, -100, -100, -100, 1, 2, 3], [-100, -100, -100, -100, -100, 4, -100]])
    source = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    placed, mask = aligned_source(source, source_labels, target_labels)
    expected_mask = torch.zeros(2, 7, dtype=torch.bool)
    expected_mask[0, [3, 4]] = True  # target row 0 predicts at 3,4,5; the source has two: 2,3
    expected_mask[1, 4] = True  # target row 1 predicts at 4 only; the source's first is 0
    assert torch.equal(mask, expected_mask)
    assert torch.equal(placed[0, 3], source[0, 2]) and torch.equal(placed[0, 4], source[0, 3])
    assert torch.equal(placed[1, 4], source[1, 0])


def test_interchange_with_the_base_as_source_changes_nothing(model, data):
    block = decoder_blocks(model)[1]
    pairs = [(i, i) for i in range(6)]
    source = batch_of(data, range(6))
    source_states = block_output(model, block, source)
    clean = edited_answer_logits(model, block, source, None)
    basis = random_subspace(D, 3, seed=0)
    for target in (spliced_batch(data, pairs), source):
        assert torch.equal(target["input_ids"], source["input_ids"])
        logits = interchanged_logits(model, block, basis, source_states, source["labels"], target)
        assert torch.equal(logits, clean)


@pytest.mark.parametrize("k", [5, D])
def test_interchange_swaps_the_subspace_component_at_the_answer_positions(model, data, k):
    """Block 1's output before the edit is the clean run's (the edit only acts later): the edited state is
    h - h P + h_src P at the answer positions (h_src itself when K = d_lm) and h elsewhere."""
    pairs = interchange_pairs(data, COUNT, 6, seed=0)
    block = decoder_blocks(model)[1]
    source = batch_of(data, [s for _, s in pairs])
    source_states = block_output(model, block, source)
    target = spliced_batch(data, pairs)
    placed, mask = aligned_source(source_states, source["labels"], target["labels"])
    basis = random_subspace(D, k, seed=0)
    edit = partial(interchange_edit, basis_KD=basis, source_BPD=placed, mask_BP=mask)
    with torch.no_grad():
        clean = hidden_states(model, target["input_ids"], target["attention_mask"])[2]
        with edited_block(block, edit):
            swapped = hidden_states(model, target["input_ids"], target["attention_mask"])[2]
    b_s, p_s, _ = answer_positions(source["labels"])
    b_t, p_t, _ = answer_positions(target["labels"])
    assert mask.sum() == len(b_t) == len(b_s)
    h, h_src, P = clean[b_t, p_t], source_states[b_s, p_s], projector(basis)
    assert torch.allclose(swapped[b_t, p_t], h - h @ P + h_src @ P, atol=1e-4)
    if k == D:
        assert torch.allclose(swapped[b_t, p_t], h_src, atol=1e-4)
    assert torch.equal(swapped[~mask], clean[~mask])


def test_full_space_interchange_at_the_last_block_reproduces_the_source_answers(model, data):
    """After the last block only the final norm and head act per position, so the logits are the source's."""
    pairs = interchange_pairs(data, COUNT, 12, seed=0)
    block = decoder_blocks(model)[3]
    full = random_subspace(D, D, seed=0)
    source = batch_of(data, [s for _, s in pairs])
    source_states = block_output(model, block, source)
    source_logits = edited_answer_logits(model, block, source, None)
    target = spliced_batch(data, pairs)
    logits = interchanged_logits(model, block, full, source_states, source["labels"], target)
    b_s, p_s, _ = answer_positions(source["labels"])
    b_t, p_t, _ = answer_positions(target["labels"])
    assert torch.allclose(logits, source_logits, atol=1e-4)  # both in answer-position order
    assert len(b_t) == len(b_s) == len(logits)
    source_right = answers_hit(source_logits, source["labels"]).float().mean().item()
    assert 0 < source_right < 1
    rates = interchange_rates(model, block, {"full": full, "none": None}, data, pairs, batch_size=5)
    assert rates["full"]["source_followed"] == pytest.approx(source_right)
    right = answers_correct(model, data, COUNT)
    assert rates["none"]["base_kept"] == pytest.approx(right[[b for b, _ in pairs]].float().mean().item())


# ------------------------------------------------------------------------------------------ runner


def test_causal_tests_reports_every_measure_deterministically(model, data):
    torch.manual_seed(1)
    rows = torch.randn(3, D)
    run = partial(
        causal_tests, model, data, rows, 2, count=32, noise_norms=(0.0, 30.0), relative_norms=(0.5,), pairs=10
    )
    report = json.loads(json.dumps(run(seed=0, batch_size=8).to_dict()))
    assert report == run(seed=0, batch_size=8).to_dict()
    assert (report["block"], report["k"], report["d_lm"], report["count"], report["pairs"]) == (
        2,
        3,
        D,
        32,
        10,
    )
    clean = exact_match_accuracy(model, data, 32)
    assert report["clean_accuracy"] == clean
    assert report["noise"]["output"][0] == clean and report["noise"]["random"][0] == clean
    assert len(report["relative_noise"]["output"]) == 1
    block = decoder_blocks(model)[2]
    ablated = edited_accuracy(model, block, partial(ablate_edit, basis_KD=row_space_basis(rows)), data, 32, 8)
    assert report["ablation"]["output"] == ablated
    assert set(report["interchange"]) == {"output", "random", "none"}
    bases = [b for b, _ in interchange_pairs(data, 32, 10, seed=0)]
    kept = answers_correct(model, data, 32)[bases].float().mean().item()
    assert report["interchange"]["none"]["base_kept"] == pytest.approx(kept)


def test_causal_tests_rejects_bad_arguments(model, data):
    with pytest.raises(CausalTestError, match="d_lm=32"):
        causal_tests(model, data, torch.randn(3, D + 1), 2, count=8)
    with pytest.raises(CausalTestError, match="outside the model's blocks"):
        causal_tests(model, data, torch.randn(3, D), 4, count=8)
    with pytest.raises(CausalTestError, match=">= 0"):
        causal_tests(model, data, torch.randn(3, D), 2, count=8, noise_norms=(-1.0,))


def in_order_noise_accuracy(model, block, basis, data, norm, relative, count, seed, batch_size) -> float:
    """The noise test as first written: batches in example order, each batch's noise drawn when it runs."""
    generator = torch.Generator().manual_seed(seed)
    correct = []
    for start in range(0, count, batch_size):
        batch = batch_of(data, range(start, min(count, start + batch_size)))
        gaussian = torch.randn((*batch["input_ids"].shape, basis.shape[0]), generator=generator)
        edit = partial(noise_edit, basis_KD=basis, norm=norm, relative=relative, gaussian_BPK=gaussian)
        correct.append(answers_hit(edited_answer_logits(model, block, batch, edit), batch["labels"]))
    return float(torch.cat(correct).float().mean())


@pytest.mark.parametrize("relative", [False, True])
def test_length_sorted_noise_curve_equals_the_in_order_reference(model, data, relative):
    """Batching by length replays each example's own noise draws: the same accuracies as in-order batches."""
    block = decoder_blocks(model)[1]
    basis = random_subspace(D, 3, seed=4)
    norms = (1.0, 5.0) if relative else (30.0, 300.0)
    curve = noise_curve(model, block, basis, data, norms, relative=relative, count=40, seed=7, batch_size=16)
    reference = [in_order_noise_accuracy(model, block, basis, data, n, relative, 40, 7, 16) for n in norms]
    assert curve == pytest.approx(reference, abs=1e-9)
    assert len(set(curve + [exact_match_accuracy(model, data, 40)])) > 1  # the noise changes some answers
