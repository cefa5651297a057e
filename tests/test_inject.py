"""Inject stage: each loss term against a direct computation, detach-and-roll, and the training loop
(alignment decreases, baseline vs inject, exact resume, reloadable output) on tiny random models.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_llama
from tracr.rasp import rasp
from transformers import AutoModelForCausalLM

from tracr_injection import compile_program
from tracr_injection.errors import TracrInjectionError
from tracr_injection.experiments.budgets import get_budget
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.answers import answer_positions
from tracr_injection.inject.objective import (
    alignment_dim_scales,
    alignment_loss,
    detach_and_roll,
    detach_and_roll_at,
    donor_positions,
    first_answer_positions,
    level_alignment,
    output_projector,
    task_loss,
    teacher_inside,
)
from tracr_injection.inject.probing import is_probe_line
from tracr_injection.inject.run import RunFolder
from tracr_injection.inject.trainer import CheckpointError, checked_roll_block, train

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 4-block random Llama with SmolLM2's real tokenizer, saved as a local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer("smollm2"))


# ----------------------------------------------------------------------------- losses


def test_task_loss_is_cross_entropy_on_exactly_the_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, -100, 3, 4], [-100, -100, 7, -100, -100]])
    b, p, t = answer_positions(labels)
    assert b.tolist() == [0, 0, 1] and p.tolist() == [2, 3, 1] and t.tolist() == [3, 4, 7]
    direct = (
        -(
            F.log_softmax(logits[0, 2], -1)[3]
            + F.log_softmax(logits[0, 3], -1)[4]
            + F.log_softmax(logits[1, 1], -1)[7]
        )
        / 3
    )
    assert torch.allclose(task_loss(logits[b, p], t), direct)


def test_alignment_loss_matches_a_direct_loop():
    torch.manual_seed(0)
    amap = AlignmentMap(6, 4)
    hidden = [torch.randn(2, 3, 6) for _ in range(4)]
    final = torch.randn(2, 3, 4)
    dim_levels = torch.tensor([0, 1, 1, 2])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    layer_map = [0, 1, 3]
    total, per_level = alignment_loss(amap, hidden, layer_map, final, dim_levels, mask)
    expected = []
    for level, h in zip(range(3), layer_map):
        target = final * (dim_levels <= level)
        losses = [
            1 - F.cosine_similarity(amap(hidden[h][b, p]), target[b, p], dim=0)
            for b in range(2)
            for p in range(3)
            if mask[b, p]
        ]
        expected.append(sum(losses) / len(losses))
    assert torch.allclose(torch.stack(per_level), torch.stack(expected), atol=1e-6)
    assert torch.allclose(total, sum(expected), atol=1e-6)


def test_scaled_alignment_is_the_cosine_after_stretching_the_chosen_dims():
    # nine one-hot-like dims and a numerical share of 0.5 decoded as 0.47
    mapped = torch.tensor([[[1.0] * 9 + [0.47]]])
    target = torch.tensor([[[1.0] * 9 + [0.5]]])
    mask = torch.ones(1, 1, dtype=torch.bool)

    def by_hand(stretch: float) -> float:
        m, t = [1.0] * 9 + [0.47 * stretch], [1.0] * 9 + [0.5 * stretch]
        dot = sum(a * b for a, b in zip(m, t))
        return 1 - dot / (sum(a * a for a in m) * sum(b * b for b in t)) ** 0.5

    def scaled(stretch: float) -> float:
        return level_alignment(mapped, target, mask, torch.tensor([1.0] * 9 + [stretch])).item()

    assert level_alignment(mapped, target, mask).item() == pytest.approx(by_hand(1.0), abs=5e-7)
    for stretch in (3.0, 6.0, 100.0):
        assert scaled(stretch) == pytest.approx(by_hand(stretch), abs=5e-7)
    # the error's weight peaks near stretch = |rest| / value = 3 / 0.5 (about 10x); far beyond, the share
    # dominates the vector and its error becomes a free change of scale
    assert scaled(6.0) > 8 * by_hand(1.0) and scaled(100.0) < by_hand(1.0)


def test_alignment_dim_scales_cover_exactly_the_named_variables(tmp_path):
    is_x = rasp.numerical(rasp.Map(lambda t: 1 if t == "x" else 0, rasp.tokens))
    prevs = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ)
    frac_x = rasp.numerical(rasp.Aggregate(prevs, is_x, default=0)).named("frac_x")
    teacher = compile_program(frac_x, {"x", "y"}, 6, causal=True)
    config = teacher.config
    assert alignment_dim_scales(config, {}) is None
    share = config.variable("frac_x").dims
    scales_D = alignment_dim_scales(config, {"frac_x": 8.0})
    assert scales_D.shape == (config.d_model,)
    assert scales_D[list(share)].tolist() == [8.0] * len(share)
    assert int((scales_D == 1.0).sum()) == config.d_model - len(share)
    with pytest.raises(ValueError, match="No variable 'fraq'.*known: .*frac_x"):
        alignment_dim_scales(config, {"fraq": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        alignment_dim_scales(config, {"frac_x": 0.0})


def test_a_config_recorded_before_a_field_existed_still_matches():
    recorded = TrainConfig().resume_key()
    del recorded["alignment_scales"]
    assert TrainConfig.from_record(recorded).resume_key() == TrainConfig().resume_key()
    assert TrainConfig.from_record(recorded).resume_key() != TrainConfig(alignment_scales={"v": 2.0}).resume_key()


def test_a_config_recorded_before_the_teacher_field_means_the_tasks_own_teacher():
    recorded = TrainConfig().to_dict()
    del recorded["teacher"]
    config = TrainConfig.from_record(recorded)
    assert config.teacher is None and config.resume_key() == TrainConfig().resume_key()
    assert config.resume_key() != TrainConfig(teacher="dyck_authors_trigger").resume_key()


def test_a_teacher_the_task_cannot_use_fails_before_anything_is_loaded(tmp_path):
    config = TrainConfig(teacher="count_trigger", model=str(tmp_path / "absent"), out=str(tmp_path / "run"))
    with pytest.raises(TracrInjectionError, match="Task 'dyck' cannot be taught by 'count_trigger'"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_output_projector_is_the_orthogonal_projector_onto_the_output_rows():
    torch.manual_seed(0)
    amap = AlignmentMap(8, 5)
    P = output_projector(amap, [1, 3])
    rows = amap.linear.weight[[1, 3]].detach()
    assert torch.allclose(P @ P, P, atol=1e-5) and torch.allclose(P, P.T, atol=1e-5)
    assert torch.allclose(rows @ P, rows, atol=1e-5)
    assert torch.linalg.matrix_rank(P) == 2


def test_detach_and_roll_passes_gradient_only_through_the_output_subspace():
    torch.manual_seed(0)
    amap = AlignmentMap(8, 5)
    P = output_projector(amap, [0, 2])
    h = torch.randn(3, 4, 8, requires_grad=True)
    out = detach_and_roll(h, P)
    inside = h.detach() @ P
    outside = h.detach() - inside
    assert torch.allclose(out, inside + torch.roll(outside, 1, 0), atol=1e-6)
    assert torch.allclose(out[1] - inside[1], outside[0], atol=1e-6)  # the rest comes from another example
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(h.grad, weights @ P.T, atol=1e-5)  # no gradient outside the subspace


def test_teacher_inside_makes_the_map_read_the_teacher_output_at_the_mapped_scale():
    torch.manual_seed(0)
    amap = AlignmentMap(8, 5)
    dims = [1, 3]
    P = output_projector(amap, dims)
    h, teacher = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    forced = teacher_inside(h, amap, dims, teacher)
    assert not forced.requires_grad and torch.allclose(forced @ P, forced, atol=1e-5)  # in the subspace
    read = amap(h - h @ P + forced).detach()
    for b in range(2):
        for p in range(3):
            mapped, r = amap(h[b, p]).detach(), teacher[b, p]
            scale = torch.dot(mapped, r) / torch.dot(r, r)  # least-squares c in A h ~ c r
            assert torch.allclose(read[b, p, dims], scale * r[dims], atol=1e-4)
            others = [d for d in range(5) if d not in dims]  # the rest of what the map reads is the LM's
            assert not torch.allclose(read[b, p, others], scale * r[others], atol=1e-2)


def test_donor_positions_line_up_first_token_and_answer_position():
    anchors = torch.tensor([5, 3])  # row 0 receives row 1's states, row 1 receives row 0's
    source = donor_positions(anchors, torch.roll(anchors, 1), width=8)
    # row 0: prompt 0..5 resampled from 0..3 (round(p * 3 / 5), half to even), answer tokens 4, 5 follow
    assert source[0].tolist() == [0, 1, 1, 2, 2, 3, 4, 5]
    # row 1: prompt 0..3 from 0..5 (round(p * 5 / 3)), then 6, 7 and the edge
    assert source[1].tolist() == [0, 2, 3, 5, 6, 7, 7, 7]


def test_first_answer_positions_is_the_position_before_the_first_label():
    labels = torch.tensor([[-100, -100, -100, 7, 2, -100], [-100, 9, 9, 2, -100, -100]])
    assert first_answer_positions(labels).tolist() == [2, 0]
    assert first_answer_positions(labels).tolist() == [answer_positions(labels)[1][0].item(), 0]


def test_anchored_roll_takes_the_donors_lined_up_states_and_keeps_gradient_in_the_subspace():
    torch.manual_seed(0)
    P = output_projector(AlignmentMap(8, 5), [0, 2])
    h = torch.randn(3, 6, 8, requires_grad=True)
    anchors = torch.tensor([4, 2, 3])
    out = detach_and_roll(h, P, anchors)
    inside = h.detach() @ P
    outside = h.detach() - inside
    donor = [2, 0, 1]
    source = donor_positions(anchors, anchors[donor], 6)
    for b in range(3):
        assert torch.allclose(out[b] - inside[b], outside[donor[b], source[b]], atol=1e-6)
        # the answer position gets the donor's answer position, the first token the donor's first token
        assert torch.allclose(out[b, anchors[b]] - inside[b, anchors[b]], outside[donor[b], anchors[donor[b]]])
        assert torch.allclose(out[b, 0] - inside[b, 0], outside[donor[b], 0])
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(h.grad, weights @ P.T, atol=1e-5)


def test_detach_and_roll_hook_changes_only_what_it_should(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(0, 1000, (3, 6))
    amap = AlignmentMap(32, 10)
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
        identity = torch.eye(32)
        with detach_and_roll_at(model.model.layers[2], identity):
            same = model(ids, output_hidden_states=True)
        with detach_and_roll_at(model.model.layers[2], output_projector(amap, [0, 1])):
            rolled = model(ids, output_hidden_states=True)
    assert torch.allclose(plain.logits, same.logits, atol=1e-5)
    for k in range(3):  # hidden states up to block 2's input are untouched
        assert torch.equal(plain.hidden_states[k], rolled.hidden_states[k])
    assert not torch.allclose(plain.hidden_states[3], rolled.hidden_states[3])


def test_roll_block_defaults_after_the_aligned_levels_and_is_checked():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checked_roll_block(None, [0, 1, 2], 30) == 2
        assert checked_roll_block(15, [0, 1, 2], 30) == 15
    for bad in (1, 30, -1):
        with pytest.raises(TracrInjectionError, match=rf"roll_block {bad} is outside 2\.\.29"):
            checked_roll_block(bad, [0, 1, 2], 30)
    with pytest.warns(UserWarning, match="last block \\(29\\) leaves no block to read"):
        assert checked_roll_block(None, [0, 10, 19, 29], 30) == 29  # "strided" ends on the last block


# ----------------------------------------------------------------------------- training loop


def tiny_config(model: str, out, **kw) -> TrainConfig:
    base = dict(
        task="reverse",
        model=model,
        out=str(out),
        steps=30,
        batch_size=4,
        lr_lm=1e-3,
        lr_map=1e-2,
        warmup_steps=2,
        kl_windows=16,
        kl_window_len=8,
        kl_batch_size=2,
        kl_top_k=16,
        checkpoint_every=1000,
        eval_examples=16,
    )
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out) -> list[dict]:
    """The training steps' lines of metrics.jsonl (probe lines left out: see test_probing)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if not is_probe_line(line)]


def test_inject_run_lowers_alignment_and_saves_a_loadable_run(tiny_llama, tmp_path):
    out = tmp_path / "inject"
    manifest = train(tiny_config(tiny_llama, out), progress=False)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first = sum(m["alignment"] for m in metrics[:5]) / 5
    last = sum(m["alignment"] for m in metrics[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert {"task_ce", "kl", "alignment_L0", "alignment_L3"} <= set(metrics[0])
    assert manifest.layer_mapping == [0, 1, 2, 3] and manifest.roll_block == 3
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 4
    assert AlignmentMap.from_pretrained(out / "map").linear.out_features > 0
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["method"] == "inject" and saved["teacher_program_hash"]
    assert tensorboard_scalars(out, "alignment") == [m["alignment"] for m in metrics]


def tensorboard_scalars(out, tag: str) -> list[float]:
    """The values TensorBoard logged under `tag`, read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [pytest.approx(e.value, rel=1e-6) for e in events.Scalars(tag)]


def test_baseline_has_no_alignment_and_differs_from_inject(tiny_llama, tmp_path):
    base = train(tiny_config(tiny_llama, tmp_path / "b", method="baseline", steps=5), progress=False)
    metrics = read_metrics(tmp_path / "b")
    assert "alignment" not in metrics[0] and base.roll_block is None
    assert not (tmp_path / "b" / "map").exists()
    train(tiny_config(tiny_llama, tmp_path / "i", steps=5), progress=False)
    inject = read_metrics(tmp_path / "i")
    # same start and data: the first step's KL (no roll there) agrees; the task loss differs because
    # detach-and-roll already edits the task forward pass
    assert inject[0]["kl"] == pytest.approx(metrics[0]["kl"], rel=1e-5)
    assert inject[0]["task_ce"] != pytest.approx(metrics[0]["task_ce"], rel=1e-5)


def test_bf16_autocast_trains_on_the_cpu_close_to_fp32_as_the_cpu_budgets_run(tiny_llama, tmp_path):
    for budget in ("demo", "cpu"):
        assert get_budget(budget).train_fields("dyck", cuda=False)["mixed_precision"] == "bf16"
    train(tiny_config(tiny_llama, tmp_path / "fp32", steps=3), progress=False)
    manifest = train(tiny_config(tiny_llama, tmp_path / "bf16", steps=3, mixed_precision="bf16"), progress=False)
    assert manifest.config.mixed_precision == "bf16"
    fp32, bf16 = read_metrics(tmp_path / "fp32")[0], read_metrics(tmp_path / "bf16")[0]
    for term in ("task_ce", "alignment", "kl"):  # same start and batch: only the forward's precision differs
        assert bf16[term] == pytest.approx(fp32[term], rel=0.05, abs=1e-3), term
    assert bf16["task_ce"] != fp32["task_ce"]  # autocast really ran the forward in bf16


def test_alignment_scales_reach_the_training_loss(tiny_llama, tmp_path):
    train(tiny_config(tiny_llama, tmp_path / "plain", steps=2), progress=False)
    stretched = tiny_config(tiny_llama, tmp_path / "stretched", steps=2, alignment_scales={"reverse_out": 4.0})
    manifest = train(stretched, progress=False)
    plain, scaled = read_metrics(tmp_path / "plain")[0], read_metrics(tmp_path / "stretched")[0]
    assert manifest.config.alignment_scales == {"reverse_out": 4.0}
    # same start, data and task loss; the stretched dims change the cosine at every level (before the
    # output is written the target is 0 there, and the stretch charges the map's output in them more)
    assert scaled["task_ce"] == pytest.approx(plain["task_ce"], rel=1e-5)
    for level in range(4):
        assert scaled[f"alignment_L{level}"] != pytest.approx(plain[f"alignment_L{level}"], rel=1e-4), level


def test_subspace_forcing_keeps_the_task_loss_from_the_blocks_up_to_the_roll(tiny_llama, tmp_path):
    # task loss only: while forced, the rolled state holds nothing of the LM's own blocks 0..3 (the roll
    # block), so only the final norm and the head learn; unforced, the blocks learn through the subspace
    task_only = {"steps": 2, "alignment_weight": 0.0, "kl_weight": 0.0}
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers.state_dict()
    for forcing, blocks_move in ((2, False), (0, True)):
        out = tmp_path / f"forced-{forcing}"
        train(tiny_config(tiny_llama, out, subspace_forcing_steps=forcing, **task_only), progress=False)
        trained = AutoModelForCausalLM.from_pretrained(out / "model").model.layers.state_dict()
        moved = [k for k in original if not torch.equal(original[k], trained[k])]
        assert bool(moved) == blocks_move, moved
        assert [m["subspace_forced"] for m in read_metrics(out)] == [float(forcing > 0)] * 2
    with pytest.raises(ValueError, match="subspace_forcing_steps must be >= 0"):
        tiny_config(tiny_llama, tmp_path, subspace_forcing_steps=-1)


def test_same_seed_same_weights_and_exact_resume(tiny_llama, tmp_path):
    full = tiny_config(tiny_llama, tmp_path / "full", steps=8)
    train(full, progress=False)
    again = tiny_config(tiny_llama, tmp_path / "again", steps=8)
    train(again, progress=False)
    interrupted = tiny_config(tiny_llama, tmp_path / "resumed", steps=6, checkpoint_every=4)
    train(interrupted, progress=False)  # "killed" after step 6: the last checkpoint is step 4
    assert [d.name for d in RunFolder(tmp_path / "resumed").checkpoints()] == ["step-4"]
    resumed = tiny_config(tiny_llama, tmp_path / "resumed", steps=8, checkpoint_every=4)
    train(resumed, resume=True, progress=False)
    weights = {
        name: AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
        for name in ("full", "again", "resumed")
    }
    for key, value in weights["full"].items():
        assert torch.equal(value, weights["again"][key]), key
        assert torch.allclose(value, weights["resumed"][key], atol=1e-6), key
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed")]
    assert steps == list(range(1, 9))
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if is_probe_line(m)] == [0, 8]  # the killed run's last probe (6) dropped


def test_bad_checkpoints_are_clear_errors(tiny_llama, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_llama, out, steps=3, checkpoint_every=2), progress=False)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(tiny_config(tiny_llama, out, steps=3, checkpoint_every=2), progress=False)
    with pytest.raises(CheckpointError, match="different configuration.*lr_lm"):
        train(tiny_config(tiny_llama, out, steps=4, lr_lm=5e-4), resume=True, progress=False)
    for weights in RunFolder(out).checkpoints()[-1].glob("*.safetensors"):
        weights.write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny_config(tiny_llama, out, steps=4, checkpoint_every=2), resume=True, progress=False)


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tiny_llama, tmp_path):
    train(tiny_config(tiny_llama, tmp_path / "full", steps=6), progress=False)
    out = tmp_path / "run"
    train(tiny_config(tiny_llama, out, steps=5, checkpoint_every=2), progress=False)  # "killed" after step 5
    assert [d.name for d in RunFolder(out).checkpoints()] == ["step-2", "step-4"]
    for weights in (out / "checkpoints" / "step-4").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    with pytest.warns(UserWarning, match=r"(?s)step-4 is corrupt.*Resuming from step-2 instead"):
        train(tiny_config(tiny_llama, out, steps=6, checkpoint_every=2), resume=True, progress=False)
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for key, value in full.items():
        assert torch.allclose(value, resumed[key], atol=1e-6), key


def test_an_interrupted_run_prints_the_command_that_resumes_it(tiny_llama, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    import tracr_injection.inject.trainer as trainer_module
    from tracr_injection.cli.main import app

    monkeypatch.chdir(tmp_path)
    config = tiny_config(tiny_llama, "run", steps=6, checkpoint_every=2, lr_map=5e-3)
    real_positions = trainer_module.batch_positions

    def interrupt_in_step_5(step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return real_positions(step, *args)

    monkeypatch.setattr(trainer_module, "batch_positions", interrupt_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.setattr(trainer_module, "batch_positions", real_positions)
    printed = capsys.readouterr().err
    assert "Training stopped (KeyboardInterrupt); resume it from its last checkpoint, step-4" in printed
    hint = printed.strip().splitlines()[-1].strip()
    assert hint == f"cd {tmp_path} && {config.command()} --resume"
    before = read_metrics(tmp_path / "run")
    assert [m["step"] for m in before] == [1, 2, 3, 4]
    result = CliRunner().invoke(app, shlex.split(hint.split(" && ")[1])[1:])
    assert result.exit_code == 0, result.output
    after = read_metrics(tmp_path / "run")
    assert after[:4] == before and [m["step"] for m in after] == list(range(1, 7))  # resumed, not restarted
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"] == config.to_dict()


@pytest.mark.slow
def test_real_smollm2_injection_end_to_end(tmp_path):
    """A few injection steps of the real offline SmolLM2 on Shuffle-Dyck, saved and reloaded."""
    config = TrainConfig(
        task="dyck",
        model="smollm2",
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=2,
        kl_windows=4,
        kl_window_len=12,
        kl_batch_size=2,
        kl_top_k=256,
        eval_examples=8,
        checkpoint_every=1,
    )
    manifest = train(config, progress=False)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and all(
        m["alignment"] > 0 and m["kl"] > -1e-4 for m in metrics
    )  # KL ~ 0 at step 1
    assert manifest.layer_mapping == [0, 1, 2, 3] and manifest.roll_block == 3
    assert manifest.eval_split == "test" and 0.0 <= manifest.accuracy_before <= 1.0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.num_hidden_layers == 30
    assert [d.name for d in RunFolder(tmp_path / "run").checkpoints()] == ["step-1"]


def test_two_cpu_processes_with_gloo(tiny_llama, tmp_path):
    """The same loop under two processes (Accelerate's CPU launcher, gloo): one run folder, 3 steps."""
    out = tmp_path / "ddp"
    script = Path(__file__).with_name("two_process_run.py")
    done = subprocess.run(
        [sys.executable, str(script), str(out), tiny_llama], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["method"] == "inject"
        and manifest["num_processes"] == 2
        and "MULTI_CPU" in manifest["distributed"]
    )
    AutoModelForCausalLM.from_pretrained(out / "model")
