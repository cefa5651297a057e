"""The injection losses and the detach-and-roll edit.

In: LM hidden states, the shared linear map, stored teacher residuals and answer labels.
Out: the three loss terms of one step (task cross-entropy on exactly the answer tokens, the
cosine alignment summed over aligned levels, and the KL term from `natural_text`) and the
hook that makes later layers read the answer from the injected output subspace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tracr_injection.compile.teacher import TeacherConfig
from tracr_injection.errors import ArtifactError
from tracr_injection.inject.lm import edit_block_output

MAP_WEIGHTS = "map.safetensors"
MAP_CONFIG = "map.json"


class AlignmentMap(nn.Module):
    """The one linear map A: d_lm -> d_teacher (with bias) shared by every aligned level."""

    def __init__(self, d_lm: int, d_teacher: int):
        super().__init__()
        self.linear = nn.Linear(d_lm, d_teacher)

    def forward(self, hidden_BPD: torch.Tensor) -> torch.Tensor:
        """Map LM hidden states [.., d_lm] into the teacher's residual space [.., d_teacher]."""
        return self.linear(hidden_BPD)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `map.safetensors` and `map.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            str(directory / MAP_WEIGHTS),
        )
        shape = {"d_lm": self.linear.in_features, "d_teacher": self.linear.out_features}
        (directory / MAP_CONFIG).write_text(json.dumps(shape))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> AlignmentMap:
        """Load a map written by `save_pretrained`, with a clear error for missing or broken files."""
        directory = Path(directory)
        try:
            shape = json.loads((directory / MAP_CONFIG).read_text())
            state = load_file(str(directory / MAP_WEIGHTS))
            amap = cls(shape["d_lm"], shape["d_teacher"])
            amap.load_state_dict(state)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise ArtifactError(
                f"Cannot load the alignment map from {directory} ({err}): {MAP_WEIGHTS} or {MAP_CONFIG} is "
                "missing or damaged; re-train or restore it."
            ) from err
        return amap


def task_loss(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (logits already taken at the positions before them)."""
    return F.cross_entropy(logits_NV.float(), targets_N)


def answer_positions(
    labels_BP: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index, position, target token) of every answer token: the model at p-1 predicts label p."""
    batch_idx, pos = torch.nonzero(labels_BP[:, 1:] != ignore_index, as_tuple=True)
    return batch_idx, pos, labels_BP[batch_idx, pos + 1]


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


def alignment_dim_scales(teacher_config: TeacherConfig, scales: Mapping[str, float]) -> torch.Tensor | None:
    """Per-dim factors [d_teacher] for the alignment cosine: `scales[name]` on each named variable's dims, 1 elsewhere.

    A numerical variable is one dim beside many one-hot ones, so under a plain cosine an error of a
    few hundredths in it is nearly free. Stretching it by s weighs that error by about
    s^2 R^4 / (R^2 + s^2 v^2)^2 (R: norm of the other dims, v: the value), at most R^2 / (4 v^2) at
    s = R / v; far beyond that the variable dominates the vector and its error becomes a free change of
    scale. At levels before the variable is written its target dims are 0, so the stretch also charges
    the map's output in them more. None when `scales` is empty (the plain cosine).
    """
    if not scales:
        return None
    factors_D = torch.ones(teacher_config.d_model)
    for name, factor in scales.items():
        if factor <= 0:
            raise ValueError(f"Alignment scale for {name!r} must be > 0, got {factor}.")
        try:
            dims = teacher_config.variable(name).dims
        except KeyError as err:
            raise ValueError(f"alignment_scales: {err.args[0]}") from err
        factors_D[list(dims)] = factor
    return factors_D


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
