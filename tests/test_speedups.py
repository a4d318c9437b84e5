"""dpolab.train.speedups: each replacement computes the same function (values and gradients) as the original."""

from __future__ import annotations

import torch
from transformers.activations import GELUTanh, NewGELUActivation

from dpolab.train.speedups import fuse_activations, native_bf16
from helpers import tiny_gpt2


def test_fused_gelu_is_transformers_gelu_new():
    """torch's tanh GELU against transformers' seven-operation gelu_new, in float64 over a wide range."""
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64, requires_grad=True)
    fused, plain = GELUTanh()(x), NewGELUActivation()(x)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(fused.sum(), x)[0], torch.autograd.grad(plain.sum(), x)[0],
                               rtol=1e-10, atol=1e-12)


def test_fuse_activations_keeps_the_model_function():
    model = tiny_gpt2(97, seed=0, n_layer=3)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    grads_before = torch.autograd.grad(before.square().mean(), list(model.parameters()))
    assert fuse_activations(model) == 3  # one per block
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert model.config.activation_function == "gelu_new"  # a saved model reloads as before
    after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(after.square().mean(), list(model.parameters())), grads_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert fuse_activations(model) == 0  # idempotent


def test_native_bf16_answers_for_every_device_kind():
    assert native_bf16(torch.device("meta")) is False
    assert isinstance(native_bf16(torch.device("cpu")), bool)
