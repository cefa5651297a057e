"""Levers that let the alignment shape the LM's early blocks (issue 21): the pieces `inject.trainer` calls.

In: the map, the LM, stored teacher targets, the step's loss terms.  Out: a least-squares start for the map
(`lstsq_map_init`), per-variable stretches of the alignment cosine (`equal_variable_scales`; and
`target_norm_shares`, which says how the plain cosine weighs the variables), the smoothed factor that
balances the alignment's gradient on the early blocks against the task's (`balanced_factor`), and per-term
gradient clipping (`clip_terms_into_grads`).  Every lever is off under `TrainConfig`'s defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from tracr_injection.compile.teacher import TeacherConfig
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import hidden_states, inference

LEVER_EXAMPLES = 32  # the run's first examples (its first 4 batches at batch 8) that lstsq and "equal" read
MAP_INIT_RIDGE = 1e-3  # ridge strength relative to the mean eigenvalue of X^T X (a tiny, scale-free shrink)
BALANCE_SMOOTHING = 0.7  # EMA weight of the previous balance ratio (measured every `balance_every` steps)
EQUAL_SCALE_MAX = 100.0  # bound on an "equal" stretch: a variable that is almost always 0 is not blown up, while
# the authors' teacher's numerical counts (count x 1/128, RMS ~0.01-0.03) reach a one-hot's weight (10 left them
# at 1-10% of it)


# ----------------------------------------------------------------------------- map initialisation


def ridge_lstsq(x_ND: torch.Tensor, y_NT: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [T, D], b [T]) minimising ||x W^T + b - y||^2 + lam ||W||^2 (bias not shrunk), lam = ridge x the mean
    eigenvalue of the centred x^T x; float64 normal equations (D is the LM width, a few hundred)."""
    x, y = x_ND.double(), y_NT.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean  # centring solves for the unshrunk bias exactly
    gram_DD = xc.T @ xc
    lam = ridge * float(torch.diagonal(gram_DD).mean())
    weight_DT = torch.linalg.solve(gram_DD + lam * torch.eye(gram_DD.shape[0], dtype=x.dtype), xc.T @ yc)
    bias_T = y_mean - x_mean @ weight_DT
    return weight_DT.T.contiguous(), bias_T


def alignment_pairs(
    model: torch.nn.Module, data: TaskData, layer_map: Sequence[int], dim_levels_D: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (hidden state, teacher target) over the real positions of the first `count` examples at every
    aligned level: h_{layer_map[i]} against the final residual with the dims written after level i zeroed."""
    batch = data.collate(list(range(min(count, len(data)))))
    device = next(model.parameters()).device
    with inference(model):
        hidden = hidden_states(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), up_to=max(layer_map)
        )
    real_BP = batch["teacher_mask"].bool()
    xs, ys = [], []
    for level, index in enumerate(layer_map):
        xs.append(hidden[index].float().cpu()[real_BP])
        ys.append((batch["teacher_final"].float() * (dim_levels_D <= level))[real_BP])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def lstsq_map_init(
    amap: AlignmentMap,
    model: torch.nn.Module,
    data: TaskData,
    layer_map: Sequence[int],
    dim_levels_D: torch.Tensor,
    count: int = LEVER_EXAMPLES,
    ridge: float = MAP_INIT_RIDGE,
) -> float:
    """Set the map to the ridge fit of the teacher targets on the untrained LM's hidden states, all aligned
    levels jointly (the map is shared), rescaled to the default init's weight scale; returns the fit's mean
    1 - cos on those rows (what training starts at).

    The cosine leaves the map's scale free, and a least-squares fit is the cosine's optimum up to that
    scale when the fit is good; it starts the map where the LM already encodes the teacher (tokens,
    positions) instead of at a random projection.
    """
    x_ND, y_NT = alignment_pairs(model, data, layer_map, dim_levels_D, count)
    weight_TD, bias_T = ridge_lstsq(x_ND, y_NT, ridge)
    # the cosine is blind to the map's scale: give the fit the default init's weight scale, so that the
    # optimizer's steps (Adam: about lr per weight) are as small relative to it as from a default start
    # (SmolLM2's fit has weights ~30x smaller, and one step at the map's LR 1e-3 undid it: 1.8 -> 6.9)
    scale = float(amap.linear.weight.float().square().mean().sqrt() / weight_TD.float().square().mean().sqrt())
    weight_TD, bias_T = scale * weight_TD, scale * bias_T
    amap.linear.weight.copy_(weight_TD.to(amap.linear.weight.dtype))
    amap.linear.bias.copy_(bias_T.to(amap.linear.bias.dtype))
    fitted = amap(x_ND.to(amap.linear.weight.device)).float().cpu()
    return float((1 - torch.nn.functional.cosine_similarity(fitted, y_NT, dim=-1, eps=1e-8)).mean())


# ----------------------------------------------------------------------------- variable weighting


def target_rows(data: TaskData, count: int = LEVER_EXAMPLES) -> torch.Tensor:
    """The final teacher residual at the real positions of the first `count` examples [N, d_teacher]."""
    batch = data.collate(list(range(min(count, len(data)))))
    return batch["teacher_final"].float()[batch["teacher_mask"].bool()]


def dim_groups(config: TeacherConfig) -> dict[str, list[int]]:
    """Every residual dim in one named group: each teacher variable's dims, and the rest by the name before
    the `:` of their residual label (tracr's `indices`, `one`, selector-width attention outputs)."""
    groups: dict[str, list[int]] = {var.name: list(var.dims) for var in config.variables}
    owned = {d for dims in groups.values() for d in dims}
    for dim, label in enumerate(config.residual_labels):
        if dim not in owned:
            groups.setdefault(label.split(":")[0], []).append(dim)
    return groups


def target_norm_shares(
    config: TeacherConfig, rows_NT: torch.Tensor, dim_levels_D: torch.Tensor
) -> dict[int, dict[str, float]]:
    """Per aligned level, each dim group's share of the targets' squared norm (summed over the rows): how
    much of the plain cosine each variable decides. Groups not written yet at a level are left out."""
    shares: dict[int, dict[str, float]] = {}
    for level in range(config.num_levels):
        target_NT = rows_NT * (dim_levels_D <= level)
        total = float(target_NT.square().sum())
        shares[level] = {
            name: float(target_NT[:, dims].square().sum()) / total
            for name, dims in dim_groups(config).items()
            if int(dim_levels_D[dims].min()) <= level and total > 0
        }
    return shares


def equal_variable_scales(config: TeacherConfig, rows_NT: torch.Tensor) -> dict[str, float]:
    """Per teacher variable, the stretch s that gives its dims a mean squared norm of 1 (a one-hot's) in the
    targets: s = 1 / sqrt(mean ||r_var||^2), bounded by `EQUAL_SCALE_MAX` each way; 1 for a variable that is
    0 on every row. A one-hot variable gets 1; a numerical one holding small fractions gets > 1."""
    scales = {}
    for var in config.variables:
        mean_square = float(rows_NT[:, list(var.dims)].square().sum(-1).mean())
        scale = 1.0 if mean_square == 0 else 1.0 / math.sqrt(mean_square)
        scales[var.name] = min(EQUAL_SCALE_MAX, max(1.0 / EQUAL_SCALE_MAX, scale))
    return scales


# ----------------------------------------------------------------------------- gradient balance


def balance_ratio(factor_used: float, task_norm: float, alignment_norm: float) -> float:
    """The factor f under which the alignment's early-block gradient norm equals the task's:
    f_used x task_norm / alignment_norm, where `alignment_norm` is the norm of the term as it entered (with
    f_used applied). An alignment without early gradient gives 0 (the floor of `applied_factor` holds then)."""
    return factor_used * task_norm / alignment_norm if alignment_norm > 0 else 0.0


def smoothed_ratio(previous_ema: float, raw: float) -> float:
    """EMA of the measured ratios: the previous value weighs `BALANCE_SMOOTHING`; the first measurement
    (previous_ema = 0) is taken as it is. Smoothing keeps one noisy batch from jerking the loss's scale."""
    return raw if previous_ema <= 0 else BALANCE_SMOOTHING * previous_ema + (1 - BALANCE_SMOOTHING) * raw


def applied_factor(ema: float, cap: float) -> float:
    """The factor the alignment term gets: the EMA clamped to [1, cap]. Never below 1: when the task's early
    gradient fades (the task loss near 0) the alignment is the only force left there and must not fade with it."""
    return min(cap, max(1.0, ema))


# ----------------------------------------------------------------------------- per-term clipping


def clip_terms_into_grads(
    terms: Mapping[str, torch.Tensor], params: Sequence[torch.nn.Parameter], max_norm: float
) -> dict[str, float]:
    """Each term's gradient on `params`, clipped to `max_norm` on its own (torch's coefficient
    max_norm / (norm + 1e-6), at most 1), summed into `.grad`; returns each term's norm before clipping.

    One autograd.grad per term on the step's graph (kept until the last): terms whose graphs are apart
    (the KL's natural-text pass) cost no more than in a joint backward; the task and alignment terms
    share the forward pass up to the last aligned level, so those blocks are backpropagated twice.
    """
    norms: dict[str, float] = {}
    names = list(terms)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1, allow_unused=True)
        present = [g for g in grads if g is not None]
        norm = math.sqrt(float(sum(g.float().square().sum() for g in present))) if present else 0.0
        coefficient = min(1.0, max_norm / (norm + 1e-6))
        norms[name] = norm
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            grad = grad * coefficient
            param.grad = grad if param.grad is None else param.grad.add_(grad)
    return norms
