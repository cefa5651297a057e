"""The alignment map: the one linear map A from the LM's hidden states into the teacher's residual space.

In: the LM width and the teacher width (a new map), or a `map/` folder written by `save_pretrained`.  Out: an
`nn.Module` mapping hidden states [.., d_lm] to [.., d_teacher], shared by every aligned level; the
objective (`inject.objective`) trains it and evaluation and the probes read teacher variables through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tracr_injection.errors import ArtifactError

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
