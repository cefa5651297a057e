"""The training step's faster kernels change nothing but float noise: eager attention on CPU gives SDPA's loss and
gradients, and the fused AdamW that `make_optimizer` builds takes the for-loop AdamW's steps."""

from __future__ import annotations

import copy

import torch
import transformers

from tracr_injection.inject import TrainConfig
from tracr_injection.inject.lm import use_training_attention
from tracr_injection.inject.trainer import make_optimizer

LLAMA = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0,
}  # fmt: skip


def tiny_llama(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Next-token loss of a left-padded batch (real positions only) and the gradients of every parameter."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, LLAMA["vocab_size"], (3, 9), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # predicted from a pad position, whose attention row is all masked (undefined)
    model.zero_grad()
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_training_attention_is_eager_on_cpu_only():
    model = tiny_llama()
    use_training_attention(model, torch.device("cuda"))  # no GPU needed: only the device's type is read
    assert model.config._attn_implementation == "sdpa"
    use_training_attention(model, torch.device("cpu"))
    assert model.config._attn_implementation == "eager"
    flex = tiny_llama("eager")
    use_training_attention(flex, torch.device("cpu"))
    assert flex.config._attn_implementation == "eager"


def test_eager_attention_gives_sdpas_loss_and_gradients():
    sdpa = tiny_llama()
    eager = copy.deepcopy(sdpa)
    use_training_attention(eager, torch.device("cpu"))
    (loss_s, grads_s), (loss_e, grads_e) = loss_and_grads(sdpa), loss_and_grads(eager)
    assert torch.allclose(loss_s, loss_e, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads_s, grads_e))
    assert any(g.abs().sum() > 0 for g in grads_e)


def test_fused_adamw_takes_the_loop_adamws_steps():
    config = TrainConfig(lr_lm=1e-2, weight_decay=0.01)
    fused_model, loop_model = tiny_llama(), tiny_llama()
    fused = make_optimizer(config, fused_model, None)
    loop = torch.optim.AdamW(loop_model.parameters(), lr=config.lr_lm, weight_decay=config.weight_decay)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    start = [p.detach().clone() for p in loop_model.parameters()]
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            loss_and_grads(model)
            optimizer.step()
    for a, b, s in zip(fused_model.parameters(), loop_model.parameters(), start):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.equal(b, s) for b, s in zip(loop_model.parameters(), start))  # they did move
