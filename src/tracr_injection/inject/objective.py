"""The injection training objective: one step's loss, every term and how they combine, in one module.

In: a task batch (`input_ids`, `attention_mask`, `labels` on exactly the answer tokens and, to inject, the
teacher's final residual `teacher_final` with its mask), a batch of the KL cache (natural-text windows with
the original model's top-k distributions), the LM and the alignment map.  Out: the step's loss terms as they
enter the loss and the step's metrics (`InjectionObjective.terms`), or their sum (`forward`):

    loss = task_ce                                      CE on the answer tokens, under detach-and-roll
         + m * f * sum_i [1 - cos(s * A h_i, s * r_i)]      alignment over the aligned levels i (inject)
         + w * KL(original || student)                      on natural text, top-k + a tail bucket (w > 0)

h_i is the LM's hidden state at level i's layer (`RunParts.layer_map`), r_i the teacher's final residual
restricted to the dims written by level i, A the map.  m is `alignment_weight`; f the balance's factor
(`alignment_balance="early_grad"`: `InjectionObjective.rebalance`, 1 otherwise); s the per-dim stretches
fixed for the run (`RunParts.dim_scales`: `alignment_scales` and `alignment_variable_weighting`); w is
`kl_weight`.  Detach-and-roll edits the output of one block (`roll_block`) so that only its part in the span
of A's output-variable rows keeps this example and its gradient, the rest being the previous example's,
detached: the task loss reaches the early blocks only through the injected subspace.  In the
alignment-first phase (`alignment_first_steps`) there is no task term and no roll; under subspace forcing
(`subspace_forcing_steps`) the rolled subspace holds the teacher's output (`teacher_inside`).  A baseline
run has the task and KL terms only.

The map lives in `alignment_map`, the KL cache in `kl_cache`, the answer positions in `answers`, and the
levers' mechanics (least-squares map start, "equal" variable stretches, the balance's smoothing) in `levers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tracr_injection.compile.teacher import TeacherConfig, TeacherModel
from tracr_injection.errors import InvalidArgumentError
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.answers import answer_positions
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.kl_cache import KLCache, KLCacheError
from tracr_injection.inject.levers import applied_factor, balance_ratio, smoothed_ratio
from tracr_injection.inject.lm import decoder_blocks, edit_block_output, hidden_states, logits_at
from tracr_injection.inject.probing import term_gradient_norms

MASKED_LOGIT = -1e30  # finite stand-in for -inf, so an empty tail never turns gradients into NaN


@dataclasses.dataclass
class RunParts:
    """What a run trains and reads: the LM, its tokenizer, the map (inject only), data and KL cache
    (built by `trainer.build_parts`)."""

    model: Any
    tokenizer: Any
    amap: AlignmentMap | None
    data: TaskData
    kl_cache: KLCache | None  # None: an analysis's objective without the KL term (`InjectionObjective.terms`)
    layer_map: list[int]
    roll_block: int | None
    output_dims: list[int]
    dim_levels: torch.Tensor | None
    dim_scales: torch.Tensor | None
    teacher: TeacherModel
    variable_scales: dict[str, float] = dataclasses.field(default_factory=dict)  # alignment_variable_weighting


# --------------------------------------------------------------------------------------------------
# The objective: the terms composed
# --------------------------------------------------------------------------------------------------


class InjectionObjective(torch.nn.Module):
    """The LM and the map in one module whose forward is one step's loss.

    One module with one forward call per step is what DistributedDataParallel needs (the LM
    runs twice per step, on the task batch and on natural text, and the map once per level).
    """

    def __init__(self, config: TrainConfig, parts: RunParts):
        super().__init__()
        self.config, self.parts = config, parts
        self.lm = parts.model
        self.amap = parts.amap
        # buffers, so `accelerator.prepare` puts them on the device once (not saved in checkpoints)
        self.register_buffer("dim_levels_D", parts.dim_levels, persistent=False)
        self.register_buffer("dim_scales_D", parts.dim_scales, persistent=False)
        if config.injecting and config.alignment_balance != "none":
            # the balance's smoothed ratio (0: not measured yet), saved with checkpoints for an exact resume
            self.register_buffer("balance_ema", torch.zeros(()), persistent=True)

    @property
    def alignment_factor(self) -> float:
        """The balance's factor on the alignment term (`levers.applied_factor`); 1 without a balance."""
        if not hasattr(self, "balance_ema"):
            return 1.0
        return applied_factor(float(self.balance_ema), self.config.balance_cap)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        kl_batch: dict[str, torch.Tensor],
        force_subspace: bool = False,
        alignment_only: bool = False,
        separate: bool = False,
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict]:
        """Task CE on the answer tokens + m * alignment (inject) + w * KL(original || student) on natural text.

        With `force_subspace` the rolled output subspace holds the teacher's output (`teacher_inside`); with
        `alignment_only` there is no task term and no roll (`terms`). With `separate` the terms come back
        unsummed (the training loop's levers need them one by one) and `metrics` has no `loss` yet.
        """
        terms, metrics = self.terms(batch, kl_batch, force_subspace, alignment_only)
        if separate:
            return terms, metrics
        loss = sum(terms.values())
        metrics["loss"] = loss.item()
        return loss, metrics

    def terms(
        self,
        batch: dict[str, torch.Tensor],
        kl_batch: dict[str, torch.Tensor] | None = None,
        force_subspace: bool = False,
        alignment_only: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The loss terms as they enter the step's loss (weights applied), and the step's metrics.

        Keys in order: `task_ce`, `alignment` (inject: m * the balance's factor * the summed cosine loss) and
        `kl` (w * KL, when w > 0 and `kl_batch` is given: analyses may leave it out). Separate so that gradient
        norms can be taken per term (`inject.probing.term_gradient_norms`); `forward` sums them.
        With `alignment_only` (inject: the alignment-first phase) there is no task term and no roll, and the
        LM runs only up to the last aligned hidden state (plus its natural-text pass for the KL).
        """
        config = self.config
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if alignment_only:
            hidden = hidden_states(
                self.lm, batch["input_ids"], batch["attention_mask"], up_to=max(self.parts.layer_map)
            )
        else:
            ce, hidden = self.task_term(batch, force_subspace)
            terms["task_ce"] = ce
            metrics["task_ce"] = ce.item()
        if config.injecting:
            align, per_level = self.alignment_term(batch, hidden)
            factor = self.alignment_factor
            terms["alignment"] = config.alignment_weight * factor * align
            metrics["alignment"] = align.item()
            metrics["subspace_forced"] = float(force_subspace)
            metrics.update({f"alignment_L{i}": v.item() for i, v in enumerate(per_level)})
            if config.alignment_balance != "none":
                metrics["alignment_factor"] = factor
            if config.alignment_first_steps:
                metrics["alignment_only"] = float(alignment_only)
        if config.kl_weight > 0 and kl_batch is not None:
            kl = self.kl_term(kl_batch)
            terms["kl"] = config.kl_weight * kl
            metrics["kl"] = kl.item()
        return terms, metrics

    def task_term(
        self, batch: dict[str, torch.Tensor], force_subspace: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The task CE on the answer tokens (under detach-and-roll when injecting), and the hidden states of
        that forward pass (inject, for the alignment; None for a baseline)."""
        config, parts = self.config, self.parts
        roll = contextlib.nullcontext()
        if config.injecting:
            projector = output_projector(self.amap, parts.output_dims)
            anchors_B = first_answer_positions(batch["labels"]) if config.roll_align == "answer" else None
            forced = None
            if force_subspace:
                forced = partial(
                    teacher_inside, amap=self.amap, output_dims=parts.output_dims,
                    teacher_final_BPT=batch["teacher_final"],
                )  # fmt: skip
            roll = detach_and_roll_at(decoder_blocks(self.lm)[parts.roll_block], projector, anchors_B, forced)
        b_idx, pos, target = answer_positions(batch["labels"])
        with roll:
            logits_NV, out = logits_at(
                self.lm, batch["input_ids"], batch["attention_mask"], b_idx, pos,
                output_hidden_states=config.injecting,
            )  # fmt: skip
        return task_loss(logits_NV, target), (out.hidden_states if config.injecting else None)

    def alignment_term(
        self, batch: dict[str, torch.Tensor], hidden: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The summed cosine loss over the aligned levels (no weight, no balance) and each level's part."""
        return alignment_loss(
            self.amap,
            hidden,
            self.parts.layer_map,
            batch["teacher_final"],
            self.dim_levels_D,
            batch["teacher_mask"],
            self.dim_scales_D,
        )

    def kl_term(self, kl_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(original || student) on the batch's natural-text windows (no weight), from the cached top-k."""
        return topk_kl(self.lm(input_ids=kl_batch["input_ids"]).logits, kl_batch, self.config.kl_reduction)

    def balance_due(self, step: int) -> bool:
        """Whether step `step` re-measures the balance (`alignment_balance`: every `balance_every` steps)."""
        config = self.config
        return config.injecting and config.alignment_balance != "none" and step % config.balance_every == 0

    def rebalance(
        self,
        terms: dict[str, torch.Tensor],
        metrics: dict[str, float],
        early_params: list[torch.nn.Parameter],
        mean_over_processes: Callable[[float], float],
    ) -> None:
        """Measure the task and alignment terms' gradient norms on the early blocks on this step's graph,
        update the balance's smoothed ratio (averaged over processes) and rescale this step's alignment term
        to the new factor (`levers.balance_ratio`, `levers.applied_factor`). Nothing to balance against in
        the alignment-first phase (no task term).

        Cost: two partial backward passes (autograd.grad, `.grad` untouched) every `balance_every` steps.
        """
        if "task_ce" not in terms:
            return
        norms = term_gradient_norms(
            {name: terms[name] for name in ("task_ce", "alignment")}, {"early": early_params}
        )
        used = self.alignment_factor
        raw = mean_over_processes(balance_ratio(used, norms["task_ce"]["early"], norms["alignment"]["early"]))
        self.balance_ema.fill_(smoothed_ratio(float(self.balance_ema), raw))
        new = self.alignment_factor
        terms["alignment"] = terms["alignment"] * (new / used)
        metrics.update(alignment_factor=new, balance_ratio=raw)


# --------------------------------------------------------------------------------------------------
# The task term
# --------------------------------------------------------------------------------------------------


def task_loss(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (logits already taken at the positions before them)."""
    return F.cross_entropy(logits_NV.float(), targets_N)


# --------------------------------------------------------------------------------------------------
# The alignment term
# --------------------------------------------------------------------------------------------------


def level_alignment(
    mapped_BPD: torch.Tensor,
    target_BPD: torch.Tensor,
    mask_BP: torch.Tensor,
    dim_scales_D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over real positions of 1 - cos(s * A h, s * r) at one level (s = 1 unless `dim_scales_D` is given)."""
    if dim_scales_D is not None:
        mapped_BPD, target_BPD = mapped_BPD * dim_scales_D, target_BPD * dim_scales_D
    cos_BP = F.cosine_similarity(mapped_BPD.float(), target_BPD.float(), dim=-1, eps=1e-8)
    mask = mask_BP.to(cos_BP.dtype)
    return ((1.0 - cos_BP) * mask).sum() / mask.sum().clamp(min=1.0)


def alignment_loss(
    amap: AlignmentMap,
    hidden_states: Sequence[torch.Tensor],
    layer_map: Sequence[int],
    teacher_final_BPD: torch.Tensor,
    dim_levels_D: torch.Tensor,
    mask_BP: torch.Tensor,
    dim_scales_D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum over teacher levels i of the level alignment between A h_{layer_map[i]} and the teacher's residual r_i.

    r_i is the teacher's final residual restricted to the dims written by level i (tracr never
    overwrites a dim, see `tasks.targets`). `dim_scales_D` stretches chosen teacher dims in the
    cosine (see `alignment_dim_scales`) so that small errors there, e.g. in a numerical share, count.
    """
    per_level = []
    for level, hidden_index in enumerate(layer_map):
        target_BPD = teacher_final_BPD * (dim_levels_D <= level)
        mapped_BPD = amap(hidden_states[hidden_index])
        per_level.append(level_alignment(mapped_BPD, target_BPD, mask_BP, dim_scales_D))
    return torch.stack(per_level).sum(), per_level


def run_dim_scales(
    teacher_config: TeacherConfig, scales: Mapping[str, float], variable_scales: Mapping[str, float]
) -> torch.Tensor | None:
    """A run's per-dim alignment factors: its `--alignment-scale` stretches (`alignment_dim_scales`) times its
    "equal" weighting's (`variable_scales`); None for the plain cosine.  Training and the answer path's rebuilt
    objective both take them from here."""
    stretched_D = alignment_dim_scales(teacher_config, scales)
    return alignment_dim_scales(teacher_config, variable_scales, stretched_D)


def alignment_dim_scales(
    teacher_config: TeacherConfig, scales: Mapping[str, float], base_D: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Per-dim factors [d_teacher] for the alignment cosine: `base_D` (or ones) times `scales[name]` on each
    named variable's dims; `base_D` as it is when `scales` is empty (None: the plain cosine).

    A numerical variable is one dim beside many one-hot ones, so under a plain cosine an error of a
    few hundredths in it is nearly free. Stretching it by s weighs that error by about
    s^2 R^4 / (R^2 + s^2 v^2)^2 (R: norm of the other dims, v: the value), at most R^2 / (4 v^2) at
    s = R / v; far beyond that the variable dominates the vector and its error becomes a free change of
    scale. At levels before the variable is written its target dims are 0, so the stretch also charges
    the map's output in them more.
    """
    if not scales:
        return base_D
    factors_D = torch.ones(teacher_config.d_model) if base_D is None else base_D.clone()
    for name, factor in scales.items():
        if factor <= 0:
            raise InvalidArgumentError(f"Alignment scale for {name!r} must be > 0, got {factor}.")
        try:
            dims = teacher_config.variable(name).dims
        except KeyError as err:
            raise InvalidArgumentError(f"alignment_scales: {err.args[0]}") from err
        factors_D[list(dims)] *= factor
    return factors_D


# --------------------------------------------------------------------------------------------------
# The KL term
# --------------------------------------------------------------------------------------------------


def topk_kl(
    student_logits_BTV: torch.Tensor, cache_batch: dict[str, torch.Tensor], reduction: str = "token_mean"
) -> torch.Tensor:
    """KL(original ‖ student) over the original's top-k tokens plus one tail bucket, mean over positions
    (`reduction="token_mean"`) or summed over each window's T positions and averaged over windows
    (`"window_sum"`, the authors' `batchmean`: T times the token mean).

    A lower bound of the exact KL (merging tokens can only lower it), exact at k = V; differentiable
    in the student logits.
    """
    ids_BTK, logp_BTK, log_tail_BT = _cache_tensors_for(student_logits_BTV, cache_batch)
    logq_BTV = student_logits_BTV.float().log_softmax(dim=-1)
    logq_BTK = logq_BTV.gather(-1, ids_BTK)
    log_q_tail_BT = logq_BTV.scatter(-1, ids_BTK, MASKED_LOGIT).logsumexp(dim=-1)
    head_BT = _plogp_ratio(logp_BTK, logq_BTK).sum(dim=-1)
    tail_BT = _plogp_ratio(log_tail_BT, log_q_tail_BT)
    kl_BT = head_BT + tail_BT
    if reduction == "window_sum":
        return kl_BT.sum(dim=-1).mean()
    if reduction != "token_mean":
        raise InvalidArgumentError(f"reduction must be token_mean or window_sum, got {reduction!r}")
    return kl_BT.mean()


def _cache_tensors_for(
    student_logits_BTV: torch.Tensor, cache_batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache batch's (topk_ids int64, topk_logp, log_tail) on the student's device, shapes checked."""
    device = student_logits_BTV.device
    ids_BTK = cache_batch["topk_ids"].to(device=device, dtype=torch.long)
    logp_BTK = cache_batch["topk_logp"].to(device=device, dtype=torch.float32)
    log_tail_BT = cache_batch["log_tail"].to(device=device, dtype=torch.float32)
    if student_logits_BTV.dim() != 3 or student_logits_BTV.shape[:2] != ids_BTK.shape[:2]:
        raise KLCacheError(
            f"student logits {tuple(student_logits_BTV.shape)} do not match the cache batch's "
            f"[B, T, K] = {tuple(ids_BTK.shape)}: run the student on cache_batch['input_ids']"
        )
    if ids_BTK.numel() and int(ids_BTK.max()) >= student_logits_BTV.shape[-1]:
        raise KLCacheError(
            f"the cache holds token id {int(ids_BTK.max())}, outside the student's vocabulary of "
            f"{student_logits_BTV.shape[-1]}: the cache was built with a different model"
        )
    return ids_BTK, logp_BTK, log_tail_BT


def exact_kl(original_logits_BTV: torch.Tensor, student_logits_BTV: torch.Tensor) -> torch.Tensor:
    """Exact KL(original ‖ student) of the full next-token distributions, mean over positions."""
    if original_logits_BTV.shape != student_logits_BTV.shape:
        raise InvalidArgumentError(
            f"logit shapes differ: {tuple(original_logits_BTV.shape)} vs {tuple(student_logits_BTV.shape)}"
        )
    logp_BTV = original_logits_BTV.float().log_softmax(dim=-1)
    logq_BTV = student_logits_BTV.float().log_softmax(dim=-1)
    return _plogp_ratio(logp_BTV, logq_BTV).sum(dim=-1).mean()


def _plogp_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p - log q), taken as 0 where p = 0 (so -inf log-probs give 0, never NaN)."""
    has_mass = torch.isfinite(logp)
    safe_logp = torch.where(has_mass, logp, torch.zeros_like(logp))
    term = safe_logp.exp() * (safe_logp - logq)
    return torch.where(has_mass, term, torch.zeros_like(term))


# --------------------------------------------------------------------------------------------------
# Detach-and-roll
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def output_projector(amap: AlignmentMap, output_dims: Sequence[int]) -> torch.Tensor:
    """Projector [d_lm, d_lm] onto the span of A's rows for the output variable's dims (pseudo-inverse, no grad)."""
    rows_KD = amap.linear.weight[list(output_dims)].float()
    return torch.linalg.pinv(rows_KD) @ rows_KD


def detach_and_roll(
    hidden_BPD: torch.Tensor,
    projector_DD: torch.Tensor,
    anchors_B: torch.Tensor | None = None,
    inside_BPD: torch.Tensor | None = None,
) -> torch.Tensor:
    """h P + roll(stopgrad(h - h P), 1, batch): only the output-subspace part keeps this example and its gradient.

    Without `anchors_B` the roll is by absolute position (the paper's code). With each row's first
    answer-predicting position in `anchors_B`, the previous example's states are lined up with this
    row's: see `donor_positions`. `inside_BPD`, when given, replaces h P (see `teacher_inside`).
    """
    own_inside_BPD = hidden_BPD @ projector_DD.to(hidden_BPD.dtype)
    outside_BPD = (hidden_BPD - own_inside_BPD).detach()
    inside_BPD = own_inside_BPD if inside_BPD is None else inside_BPD.to(hidden_BPD.dtype)
    if anchors_B is None:
        return inside_BPD + torch.roll(outside_BPD, shifts=1, dims=0)
    donor_B = torch.roll(torch.arange(hidden_BPD.shape[0], device=hidden_BPD.device), shifts=1)
    source_BP = donor_positions(anchors_B, anchors_B[donor_B], hidden_BPD.shape[1])
    return inside_BPD + outside_BPD[donor_B[:, None], source_BP]


@torch.no_grad()
def teacher_inside(
    hidden_BPD: torch.Tensor, amap: AlignmentMap, output_dims: Sequence[int], teacher_final_BPT: torch.Tensor
) -> torch.Tensor:
    """The output-subspace part [B, P, D] under which the map reads the teacher's output variable exactly.

    Solves W_K x + b_K = c t_K in the row space of W_K (pseudo-inverse), where t_K is the teacher's
    output variable and c, per position, the least-squares scale of the mapped state A h onto the
    teacher's whole residual r (A h = c r under perfect alignment; the cosine leaves c free).
    No gradient: it stands in for the LM's own subspace while later layers learn to read it.
    """
    mapped_BPT = amap(hidden_BPD).float()
    teacher_BPT = teacher_final_BPT.float()
    overlap_BP1 = (mapped_BPT * teacher_BPT).sum(-1, keepdim=True)
    scale_BP1 = overlap_BP1 / teacher_BPT.square().sum(-1, keepdim=True).clamp(min=1e-6)
    dims = list(output_dims)
    weight_KD, bias_K = amap.linear.weight[dims].float(), amap.linear.bias[dims].float()
    return (scale_BP1 * teacher_BPT[..., dims] - bias_K) @ torch.linalg.pinv(weight_KD).T


def donor_positions(anchors_B: torch.Tensor, donor_anchors_B: torch.Tensor, width: int) -> torch.Tensor:
    """For each row and position, the donor position whose state it receives [B, P].

    The donor's prompt is resampled onto this row's (first token -> first token, answer position ->
    answer position, rounded in between) and answer tokens follow one to one. Rolling by absolute
    position instead hands a right-padded row's answer position a pad or mid-string state of the
    donor (measured on SmolLM2, Dyck, everything rolled: answer CE 11.3 vs 3.1 unedited), and
    shifting by the anchor difference moves the first-token state (the attention sink) away (8.5);
    this mapping gives 3.9.
    """
    p_BP = torch.arange(width, device=anchors_B.device)[None, :].expand(len(anchors_B), width)
    anchor_B1, donor_B1 = anchors_B[:, None], donor_anchors_B[:, None]
    in_prompt_BP = torch.round(p_BP * donor_B1 / anchor_B1.clamp(min=1)).long()
    after_BP = donor_B1 + (p_BP - anchor_B1)
    return torch.where(p_BP <= anchor_B1, in_prompt_BP, after_BP).clamp(0, width - 1)


def first_answer_positions(labels_BP: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Each row's first answer-predicting position [B] (the trigger: the model there predicts the first answer token)."""
    has_label_BP = labels_BP[:, 1:] != ignore_index
    return has_label_BP.int().argmax(dim=1)


@contextmanager
def detach_and_roll_at(
    block: nn.Module,
    projector_DD: torch.Tensor,
    anchors_B: torch.Tensor | None = None,
    forced_inside: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[None]:
    """While active, the output of `block` goes through `detach_and_roll` with this projector (and anchors);
    `forced_inside(h)`, when given, supplies the output-subspace part instead of h P."""

    def edit(hidden_BPD: torch.Tensor) -> torch.Tensor:
        inside_BPD = forced_inside(hidden_BPD) if forced_inside is not None else None
        return detach_and_roll(hidden_BPD, projector_DD, anchors_B, inside_BPD)

    handle = edit_block_output(block, edit)
    try:
        yield
    finally:
        handle.remove()
