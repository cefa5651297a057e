"""The compiled program as a PyTorch module: the *teacher* of the injection.

In: a `TeacherConfig` (the JSON manifest) and the compiled weights.  Out: an `nn.Module`
that runs batches of symbol sequences (BOS first, right-padded) and returns the residual
stream at every aligned level: level 0 is the embedding output, level k the output of
block k (one attention + one MLP, as in tracr).  The config names every residual
dimension, so any residual vector decodes back into the values of the program's variables.

Shapes follow TransformerLens' habits: `batch`, `pos`, `d_model` (= residual width).
Named hook points (`hook_embed`, `blocks.{k}.hook_resid_mid`, `blocks.{k}.hook_resid_post`)
are `nn.Identity` modules, so `register_forward_hook` works on them.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tracr_injection.compile.errors import InvalidInputError
from tracr_injection.errors import ArtifactError

FORMAT_VERSION = 1
CONFIG_NAME = "teacher.json"
WEIGHTS_NAME = "model.safetensors"
NUMERICAL_SNAP_TOLERANCE = 1e-4
CATEGORICAL_NONE_THRESHOLD = 0.5


@dataclasses.dataclass
class TeacherVariable:
    """A program variable's place in the residual stream.

    `dims[i]` holds `values[i]` for a categorical (one-hot) variable; a numerical variable
    has one dim, and `values` lists every value it can take (used to decode exactly).
    `level` is the first aligned level at which the variable is written (0 = embedding).
    """

    name: str
    encoding: Literal["categorical", "numerical"]
    role: Literal["input", "intermediate", "output"]
    dims: list[int]
    values: list[Any]
    level: int


@dataclasses.dataclass
class TeacherConfig:
    """Everything needed to rebuild, run and decode a compiled teacher (the manifest)."""

    program_name: str
    program_hash: str
    vocab: list[Any]
    max_seq_len: int
    causal: bool
    bos: str
    pad: str
    token_values: list[Any]  # token id -> symbol (tracr's embedding order)
    num_layers: int
    num_heads: int
    key_size: int
    mlp_hidden_size: int
    residual_labels: list[str]
    variables: list[TeacherVariable]
    output_variable: str
    mlp_exactness: int
    tracr_version: str
    format_version: int = FORMAT_VERSION
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_seconds: float | None = None

    @property
    def d_model(self) -> int:
        """Residual stream width."""
        return len(self.residual_labels)

    @property
    def num_levels(self) -> int:
        """Aligned levels: the embedding plus one per block."""
        return self.num_layers + 1

    def variable(self, name: str) -> TeacherVariable:
        """The variable called `name`, or a KeyError listing the known ones."""
        for var in self.variables:
            if var.name == name:
                return var
        known = ", ".join(v.name for v in self.variables)
        raise KeyError(f"No variable {name!r} in teacher {self.program_name!r}; known: {known}")

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TeacherConfig:
        """Parse a manifest written by `to_json`."""
        data = json.loads(text)
        data["variables"] = [TeacherVariable(**v) for v in data["variables"]]
        return cls(**data)


@dataclasses.dataclass
class TeacherOutput:
    """Residual stream per aligned level, each [batch, pos, d_model]; `residuals[-1]` is final."""

    residuals: list[torch.Tensor]


class TeacherAttention(nn.Module):
    """tracr's multi-head attention: softmax(q k^T / sqrt(key_size)) v, masked, no layer norm."""

    def __init__(self, d_model: int, num_heads: int, key_size: int):
        super().__init__()
        self.num_heads, self.key_size = num_heads, key_size
        inner = num_heads * key_size
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.output = nn.Linear(inner, d_model)

    def forward(self, resid_BPD: torch.Tensor, mask_BQK: torch.Tensor) -> torch.Tensor:
        """Attention output [batch, pos, d_model] given which keys each query may see."""
        batch, pos, _ = resid_BPD.shape
        split = lambda x: x.view(batch, pos, self.num_heads, self.key_size).transpose(1, 2)
        q_BHPK, k_BHPK, v_BHPK = (split(f(resid_BPD)) for f in (self.query, self.key, self.value))
        logits_BHQK = q_BHPK @ k_BHPK.transpose(-1, -2) / math.sqrt(self.key_size)
        logits_BHQK = logits_BHQK.masked_fill(~mask_BQK[:, None], -1e30)
        z_BHPK = torch.softmax(logits_BHQK, dim=-1) @ v_BHPK
        return self.output(z_BHPK.transpose(1, 2).reshape(batch, pos, -1))


class TeacherBlock(nn.Module):
    """One tracr layer: residual += attention; residual += ReLU MLP.

    tracr pads every layer's MLP to the widest layer's hidden size, and each MLP reads and
    writes only a few residual dims, so the dense product mostly multiplies zeros.  The
    forward pass runs a compact copy (used hidden units, read dims, written dims; built on
    first use, exact up to float summation order); the dense weights stay the parameters.
    """

    def __init__(self, d_model: int, num_heads: int, key_size: int, mlp_hidden_size: int):
        super().__init__()
        self.attn = TeacherAttention(d_model, num_heads, key_size)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_hidden_size), nn.ReLU(), nn.Linear(mlp_hidden_size, d_model)
        )
        self.hook_resid_mid = nn.Identity()
        self.hook_resid_post = nn.Identity()
        self._compact: CompactMLP | None = None

    def forward(self, resid_BPD: torch.Tensor, mask_BQK: torch.Tensor) -> torch.Tensor:
        """The residual stream after this block."""
        resid_BPD = self.hook_resid_mid(resid_BPD + self.attn(resid_BPD, mask_BQK))
        return self.hook_resid_post(resid_BPD + self.compact_mlp()(resid_BPD))

    def compact_mlp(self) -> CompactMLP:
        """The compact MLP, rebuilt when the weights moved device."""
        if self._compact is None or self._compact.w_in_HI.device != self.mlp[0].weight.device:
            self._compact = CompactMLP.from_dense(self.mlp)
        return self._compact

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._compact = None
        super()._load_from_state_dict(*args, **kwargs)


@dataclasses.dataclass
class CompactMLP:
    """An MLP restricted to the hidden units that write something and the dims they touch."""

    read_dims: torch.Tensor
    w_in_HI: torch.Tensor
    b_in_H: torch.Tensor
    write_dims: torch.Tensor
    w_out_OH: torch.Tensor
    b_out_O: torch.Tensor

    @classmethod
    def from_dense(cls, mlp: nn.Sequential) -> CompactMLP:
        """Drop hidden units with no output weight, input dims no kept unit reads, unwritten dims."""
        w_in, b_in, w_out, b_out = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias
        hidden = torch.nonzero((w_out != 0).any(0)).flatten()
        read = torch.nonzero((w_in[hidden] != 0).any(0)).flatten()
        write = torch.nonzero((w_out[:, hidden] != 0).any(1) | (b_out != 0)).flatten()
        return cls(
            read_dims=read,
            w_in_HI=w_in[hidden][:, read].contiguous(),
            b_in_H=b_in[hidden].contiguous(),
            write_dims=write,
            w_out_OH=w_out[write][:, hidden].contiguous(),
            b_out_O=b_out[write].contiguous(),
        )

    def __call__(self, resid_BPD: torch.Tensor) -> torch.Tensor:
        """The MLP's output [batch, pos, d_model], zero outside the written dims."""
        hidden_BPH = torch.relu(resid_BPD[..., self.read_dims] @ self.w_in_HI.T + self.b_in_H)
        out_BPD = resid_BPD.new_zeros(resid_BPD.shape)
        out_BPD[..., self.write_dims] = hidden_BPH @ self.w_out_OH.T + self.b_out_O
        return out_BPD


class TeacherModel(nn.Module):
    """A tracr-compiled RASP program as a batched PyTorch transformer (no JAX needed)."""

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.token_embed = nn.Embedding(len(config.token_values), d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len + 1, d_model)
        self.blocks = nn.ModuleList(
            TeacherBlock(d_model, config.num_heads, config.key_size, config.mlp_hidden_size)
            for _ in range(config.num_layers)
        )
        self.hook_embed = nn.Identity()
        self._token_ids = {self._key(tok): i for i, tok in enumerate(config.token_values)}
        self._vocab_keys = {self._key(v) for v in config.vocab}
        self.requires_grad_(False)

    @staticmethod
    def _key(token: Any) -> tuple[str, Any]:
        """Dictionary key that keeps 1, True and "1" apart."""
        return (type(token).__name__, token)

    # ------------------------------------------------------------------ running
    def forward(
        self, token_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor | None = None
    ) -> TeacherOutput:
        """Residual streams of a batch of encoded sequences (BOS first, right padding masked)."""
        batch, pos = token_ids_BP.shape
        if pos > self.config.max_seq_len + 1:
            raise InvalidInputError(
                f"Sequence of {pos} positions (with BOS) exceeds the teacher's "
                f"max_seq_len + 1 = {self.config.max_seq_len + 1}."
            )
        if attention_mask_BP is None:
            attention_mask_BP = torch.ones_like(token_ids_BP, dtype=torch.bool)
        mask_BQK = attention_mask_BP.bool()[:, None, :].expand(batch, pos, pos)
        if self.config.causal:
            mask_BQK = mask_BQK & torch.ones(pos, pos, dtype=torch.bool, device=mask_BQK.device).tril()
        positions = torch.arange(pos, device=token_ids_BP.device)
        resid_BPD = self.hook_embed(self.token_embed(token_ids_BP) + self.pos_embed(positions))
        residuals = [resid_BPD]
        for block in self.blocks:
            resid_BPD = block(resid_BPD, mask_BQK)
            residuals.append(resid_BPD)
        return TeacherOutput(residuals=residuals)

    def encode(self, sequences: Sequence[Sequence[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [batch, pos] with BOS prepended and PAD on the right, and the real-token mask."""
        for tokens in sequences:
            self.check_input(tokens)
        width = 1 + max((len(t) for t in sequences), default=0)
        pad_id = self._token_ids[self._key(self.config.pad)]
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.bool)
        for row, tokens in enumerate(sequences):
            encoded = [self.config.bos, *tokens]
            ids[row, : len(encoded)] = torch.tensor([self._token_ids[self._key(t)] for t in encoded])
            mask[row, : len(encoded)] = True
        return ids.to(self.device), mask.to(self.device)

    def check_input(self, tokens: Sequence[Any]) -> None:
        """Raise `InvalidInputError` for an unknown token or a too-long sequence."""
        if len(tokens) > self.config.max_seq_len:
            raise InvalidInputError(
                f"Input of length {len(tokens)} is longer than the teacher's max_seq_len "
                f"{self.config.max_seq_len}; compile the program with a larger max_seq_len."
            )
        for i, token in enumerate(tokens):
            if self._key(token) not in self._vocab_keys:
                raise InvalidInputError(
                    f"Token {token!r} at position {i} is not in the teacher's vocabulary "
                    f"{sorted(map(repr, self.config.vocab))}."
                )

    @torch.no_grad()
    def run(self, sequences: Sequence[Sequence[Any]]) -> tuple[TeacherOutput, torch.Tensor]:
        """Encode and run raw symbol sequences (no BOS); returns the output and the mask."""
        ids, mask = self.encode(sequences)
        return self(ids, mask), mask

    def evaluate(self, tokens: Sequence[Any]) -> list[Any]:
        """The program's output for one input (no BOS), position by position, like `rasp.evaluate`."""
        output, _ = self.run([tokens])
        final_PD = output.residuals[-1][0, 1:]
        return self.decode_variable(final_PD, self.config.output_variable)

    # ----------------------------------------------------------------- decoding
    def decode_variable(self, resid_PD: torch.Tensor, name: str) -> list[Any]:
        """Values of variable `name` read off residual vectors [..., pos, d_model] (nested like the leading dims)."""
        var = self.config.variable(name)
        part = resid_PD[..., var.dims].detach().float().cpu()
        if var.encoding == "numerical":
            max_denominator = self.config.max_seq_len + 1
            flat = [snap_numerical(x, var.values, max_denominator) for x in part[..., 0].flatten().tolist()]
        else:
            best, index = part.max(dim=-1)
            flat = [
                var.values[i] if b >= CATEGORICAL_NONE_THRESHOLD else None
                for b, i in zip(best.flatten().tolist(), index.flatten().tolist())
            ]
        return nest(flat, part.shape[:-1])

    def decode(self, resid_PD: torch.Tensor) -> list[dict[str, Any]]:
        """Every program variable's value at every position of residual vectors [pos, d_model]."""
        columns = {v.name: self.decode_variable(resid_PD, v.name) for v in self.config.variables}
        return [{name: col[p] for name, col in columns.items()} for p in range(resid_PD.shape[0])]

    @property
    def device(self) -> torch.device:
        """Device the weights live on."""
        return self.token_embed.weight.device

    # ---------------------------------------------------------------- save/load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `teacher.json` and `model.safetensors` into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(self.config.to_json())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TeacherModel:
        """Load a teacher saved by `save_pretrained`, with clear errors for a broken artifact."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ArtifactError(
                    f"Teacher artifact {directory} is missing {path.name}; recompile it with "
                    "`tracr-inject compile NAME` or pass the folder that `compile` printed."
                )
        try:
            config = TeacherConfig.from_json(config_path.read_text())
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise ArtifactError(f"Corrupt teacher manifest {config_path}: {err}") from err
        if config.format_version != FORMAT_VERSION:
            raise ArtifactError(
                f"Teacher artifact {directory} has format {config.format_version}, this "
                f"version reads {FORMAT_VERSION}; recompile it."
            )
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"Corrupt teacher weights {weights_path}: {err}") from err
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ArtifactError(f"Teacher weights {weights_path} do not match its manifest: {err}") from err
        return model


def nest(flat: list[Any], shape: Sequence[int]) -> list[Any]:
    """`flat` (row-major) as nested lists of `shape`."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0]
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def snap_numerical(x: float, values: Sequence[Any], max_denominator: int) -> Any:
    """Exact value of a numerical variable read as float `x`.

    The nearest known value if within tolerance; else the nearest fraction with denominator
    at most `max_denominator` (tracr's value sets of mean aggregates miss e.g. 2/5, which
    the RASP evaluator computes as a mean over at most max_seq_len + 1 positions); else `x`.
    """
    if values:
        index = bisect.bisect_left(values, x)
        near = [values[i] for i in (index - 1, index) if 0 <= i < len(values)]
        nearest = min(near, key=lambda v: abs(v - x))
        if abs(nearest - x) <= NUMERICAL_SNAP_TOLERANCE:
            return nearest
    fraction = Fraction(x).limit_denominator(max_denominator)
    if abs(float(fraction) - x) <= NUMERICAL_SNAP_TOLERANCE:
        return fraction.numerator if fraction.denominator == 1 else fraction.numerator / fraction.denominator
    return x
