"""Turn tracr's assembled JAX parameters into a `TeacherModel`.

In: a `TracrCompilation` (tracr's haiku params and the typed residual layout).  Out: a
`TeacherModel` whose weights are exactly tracr's (haiku stores `w` as [in, out]; torch's
`nn.Linear` wants [out, in]) and whose config names every residual dimension.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tracr_injection.compile.teacher import TeacherConfig, TeacherModel, TeacherVariable
from tracr_injection.compile.tracr_pipeline import (
    COMPILER_BOS,
    COMPILER_PAD,
    TracrCompilation,
)

INPUT_VARIABLES = ("tokens", "indices")


def teacher_from_compilation(
    compilation: TracrCompilation,
    *,
    program_name: str,
    program_hash: str,
    vocab: list[Any],
    max_seq_len: int,
    causal: bool,
    mlp_exactness: int,
    tracr_version: str,
) -> TeacherModel:
    """Build the torch teacher with tracr's weights and a manifest of its variables."""
    assembled = compilation.assembled
    params = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in assembled.params.items()}
    model_config = assembled.model_config
    token_values = sorted(assembled.input_encoder.encoding_map, key=assembled.input_encoder.encoding_map.get)
    config = TeacherConfig(
        program_name=program_name,
        program_hash=program_hash,
        vocab=vocab,
        max_seq_len=max_seq_len,
        causal=causal,
        bos=COMPILER_BOS,
        pad=COMPILER_PAD,
        token_values=token_values,
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        key_size=model_config.key_size,
        mlp_hidden_size=model_config.mlp_hidden_size,
        residual_labels=[
            name if value is None else f"{name}:{value}" for name, value in compilation.residual_directions
        ],
        variables=[],
        output_variable=compilation.output_name,
        mlp_exactness=mlp_exactness,
        tracr_version=tracr_version,
    )
    teacher = TeacherModel(config)
    teacher.load_state_dict(state_dict_from_params(params, model_config.num_layers), strict=True)
    config.variables = describe_variables(compilation, first_write_levels(teacher))
    return teacher


def state_dict_from_params(
    params: dict[str, dict[str, np.ndarray]], num_layers: int
) -> dict[str, torch.Tensor]:
    """Map haiku parameter names to `TeacherModel` parameter names."""
    tensor = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
    state = {
        "token_embed.weight": tensor(params["token_embed"]["embeddings"]),
        "pos_embed.weight": tensor(params["pos_embed"]["embeddings"]),
    }
    torch_names = {
        "attn/query": "attn.query",
        "attn/key": "attn.key",
        "attn/value": "attn.value",
        "attn/linear": "attn.output",
        "mlp/linear_1": "mlp.0",
        "mlp/linear_2": "mlp.2",
    }
    for layer in range(num_layers):
        for haiku_name, torch_name in torch_names.items():
            module = params[f"transformer/layer_{layer}/{haiku_name}"]
            state[f"blocks.{layer}.{torch_name}.weight"] = tensor(module["w"]).T.contiguous()
            state[f"blocks.{layer}.{torch_name}.bias"] = tensor(module["b"])
    return state


def first_write_levels(teacher: TeacherModel) -> list[int]:
    """For each residual dim, the first aligned level whose output can be non-zero there.

    Level 0 covers what the embeddings write; level k what block k's attention or MLP
    writes (a non-zero output row).  Dims never written get the last level.
    """
    config = teacher.config
    levels = [config.num_layers] * config.d_model
    written_by_embedding = (teacher.token_embed.weight != 0).any(0) | (teacher.pos_embed.weight != 0).any(0)
    writers = [written_by_embedding] + [
        (block.attn.output.weight != 0).any(1) | (block.mlp[2].weight != 0).any(1) for block in teacher.blocks
    ]
    for level, written in reversed(list(enumerate(writers))):
        for dim in torch.nonzero(written).flatten().tolist():
            levels[dim] = level
    return levels


def describe_variables(compilation: TracrCompilation, dim_levels: list[int]) -> list[TeacherVariable]:
    """One `TeacherVariable` per program SOp that has dims in the residual stream."""
    dims_by_name: dict[str, list[int]] = {}
    for dim, (name, _) in enumerate(compilation.residual_directions):
        dims_by_name.setdefault(name, []).append(dim)
    variables = []
    for name, var in compilation.variables.items():
        dims = dims_by_name.get(name)
        if not dims:
            continue
        if var.encoding == "categorical":
            values = [compilation.residual_directions[d][1] for d in dims]
        else:
            values = var.values
        role = (
            "output"
            if name == compilation.output_name
            else "input"
            if name in INPUT_VARIABLES
            else "intermediate"
        )
        variables.append(
            TeacherVariable(
                name=name,
                encoding=var.encoding,
                role=role,
                dims=dims,
                values=[to_json_value(v) for v in values],
                level=min(dim_levels[d] for d in dims),
            )
        )
    return sorted(variables, key=lambda v: (v.level, v.dims[0]))


def to_json_value(value: Any) -> Any:
    """A value as JSON keeps it: numpy scalars become Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    return value
