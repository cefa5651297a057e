"""Greedy decoding of many prompts at once: left padding, KV cache, prompts sorted by length.

In: a causal LM and prompts as token-id lists.  Out: per prompt, the greedily generated ids up
to and including the first end-of-sequence token (or `max_new_tokens` of them), in the
prompts' order.  `greedy_generate` runs batches through its own short cached loop, so no
generation default of the model (repetition penalty, minimum length, ...) can change the
answers; `generate_one_by_one` is the paper's way (one `model.generate` call per prompt), kept
as the reference and the benchmark baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tracr_injection.errors import TracrInjectionError
from tracr_injection.inject.lm import inference


class GenerationError(TracrInjectionError, ValueError):
    """Generation was asked for with arguments that cannot work (empty prompt, no tokens, batch < 1)."""


def until_eos(ids: Sequence[int], eos_token_id: int) -> list[int]:
    """`ids` cut after the first end-of-sequence token (kept), or all of them if there is none."""
    ids = list(ids)
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one batch: ids [B, P] (pad on the left) and the attention mask [B, P]."""
    width = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids_BP[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask_BP[row, width - len(prompt) :] = 1
    return ids_BP, mask_BP


def greedy_batch(
    model: Any, ids_BP: torch.Tensor, mask_BP: torch.Tensor, eos_token_id: int, max_new_tokens: int
) -> torch.Tensor:
    """Greedy continuation [B, <= max_new_tokens] of a left-padded batch, reusing the KV cache.

    Position ids count real tokens only (pads get 0), so a padded row sees the same positions as
    its unpadded prompt; the loop stops once every row has emitted EOS.
    """
    position_BP = (mask_BP.cumsum(-1) - 1).clamp_min(0)
    step_ids_BP, cache = ids_BP, None
    done_B = torch.zeros(len(ids_BP), dtype=torch.bool, device=ids_BP.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids_BP,
            attention_mask=mask_BP,
            position_ids=position_BP,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_B = out.logits[:, -1].argmax(-1)
        new_tokens.append(next_B)
        done_B |= next_B == eos_token_id
        if bool(done_B.all()):
            break
        cache, step_ids_BP = out.cache, next_B[:, None]
        position_BP = position_BP[:, -1:] + 1
        mask_BP = torch.cat([mask_BP, torch.ones_like(mask_BP[:, :1])], dim=1)
    return torch.stack(new_tokens, dim=1)


def check_generation_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> None:
    """Raise `GenerationError` for an empty prompt, max_new_tokens < 1 or batch_size < 1."""
    if max_new_tokens < 1 or batch_size < 1:
        raise GenerationError(
            f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must both be at least 1."
        )
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise GenerationError(f"Prompts {empty[:5]} are empty; every prompt needs at least one token.")


def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (ids up to and including the first EOS), batched.

    Prompts are sorted by length so a batch pads little, decoded in batches of `batch_size`
    with left padding and the KV cache, and returned in the original order.
    """
    check_generation_args(prompts, max_new_tokens, batch_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    with inference(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids_BP, mask_BP = left_padded([prompts[i] for i in rows], pad_token_id)
            new_BT = greedy_batch(model, ids_BP.to(device), mask_BP.to(device), eos_token_id, max_new_tokens)
            for i, generated in zip(rows, new_BT.tolist()):
                results[i] = until_eos(generated, eos_token_id)
    return results


def generate_one_by_one(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy continuations the paper's way: one unpadded `model.generate` call per prompt."""
    check_generation_args(prompts, max_new_tokens, 1)
    results = []
    device = next(model.parameters()).device
    with inference(model):
        for prompt in prompts:
            ids_1P = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            out_1T = model.generate(
                input_ids=ids_1P,
                attention_mask=torch.ones_like(ids_1P),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            results.append(until_eos(out_1T[0, len(prompt) :].tolist(), eos_token_id))
    return results
