"""dpolab.train.speedups: each replacement computes the same function (values and gradients) as the original."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_gpt2
from transformers.activations import GELUTanh, NewGELUActivation

from dpolab.train.speedups import fuse_activations


def test_fused_gelu_is_transformers_gelu_new():
    """torch's tanh GELU against transformers' seven-operation gelu_new, in float64 over a wide range."""
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64, requires_grad=True)
    fused, plain = GELUTanh()(x), NewGELUActivation()(x)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(fused.sum(), x)[0], torch.autograd.grad(plain.sum(), x)[0], rtol=1e-10, atol=1e-12
    )


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


def test_gelu_projection_is_gelu_then_conv1d_in_values_and_gradients():
    """The fused GELU + projection against torch's GELU followed by transformers' Conv1D, by autograd in float64
    (torch.autograd.gradcheck: finite differences) and against the plain graph's gradients."""
    from transformers.pytorch_utils import Conv1D

    from dpolab.train.speedups import GELUProjection, gelu_projection

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    conv = Conv1D(3, 7).double()
    torch.nn.init.normal_(conv.weight, generator=g)
    torch.nn.init.normal_(conv.bias, generator=g)
    assert torch.autograd.gradcheck(gelu_projection, (a, conv.weight, conv.bias))
    plain = conv(torch.nn.functional.gelu(a, approximate="tanh"))
    conv.__class__ = GELUProjection
    fused = conv(a)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for x, y in zip(
        torch.autograd.grad(fused.square().sum(), (a, conv.weight, conv.bias)),
        torch.autograd.grad(plain.square().sum(), (a, conv.weight, conv.bias)),
    ):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_fused_mlp_saves_one_activation_tensor_not_two():
    """What the fusion is for: the MLP's graph keeps a (tokens x 4D) tensor once, not twice (a and gelu(a)), as
    against the one-kernel GELU followed by the projection."""
    model = tiny_gpt2(97, seed=0, n_layer=1)
    mlp, x = model.transformer.h[0].mlp, torch.randn(3, 8, model.config.n_embd)
    mlp.act = GELUTanh()

    def saved_bytes() -> int:
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x.requires_grad_())
        return sum(seen.values())

    inner = 4 * model.config.n_embd * 3 * 8 * 4  # bytes of one (tokens x 4D) fp32 tensor
    before = saved_bytes()
    fuse_activations(model)
    assert isinstance(mlp.act, torch.nn.Identity)
    assert before - saved_bytes() == inner
    assert sorted(dict(mlp.named_parameters())) == ["c_fc.bias", "c_fc.weight", "c_proj.bias", "c_proj.weight"]


def test_fused_mlp_under_bf16_autocast_matches_the_plain_one():
    """Under autocast the products run in bf16 and the gradients come back in the parameters' fp32."""
    model = tiny_gpt2(97, seed=0, n_layer=1)
    mlp, x = model.transformer.h[0].mlp, torch.randn(3, 8, model.config.n_embd)
    mlp.act = GELUTanh()
    results = []
    for fuse in (False, True):
        if fuse:
            fuse_activations(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(x)
        grads = torch.autograd.grad(y.float().square().sum(), list(mlp.parameters()))
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((y.float(), grads))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2e-2)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def _tied_case(seed=0):
    model = tiny_gpt2(97, seed=seed, n_layer=2)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(seed))
    return model, ids


def test_inplace_tied_embedding_grad_gives_autograds_gradients():
    """The tied weight's gradient (LM head + lookup rows) and every other gradient equal plain autograd's, for the
    fused LM head of dpolab.logprobs and for the model's own logits, over two accumulated backwards."""
    from dpolab.logprobs import linear_log_softmax
    from dpolab.train.speedups import RowGradEmbedding, inplace_tied_embedding_grad

    def losses(model, ids):
        hidden = model.transformer(ids).last_hidden_state
        yield linear_log_softmax(hidden[:, :-1].flatten(0, 1), model.lm_head.weight, None, ids[:, 1:].flatten()).sum()
        yield model(ids).logits.square().mean()

    grads = []
    for fused in (False, True):
        model, ids = _tied_case()
        if fused:
            embedding = model.get_input_embeddings()
            assert inplace_tied_embedding_grad(model)
            assert model.get_input_embeddings() is embedding and isinstance(embedding, RowGradEmbedding)
            assert embedding.weight is model.lm_head.weight
            assert not inplace_tied_embedding_grad(model)  # once
            assert "transformer.wte.weight" in model.state_dict()
        for loss in losses(model, ids):
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_inplace_tied_embedding_grad_keeps_the_padding_row_at_zero_and_skips_untied_models():
    from dpolab.train.speedups import inplace_tied_embedding_grad

    model, ids = _tied_case()
    model.get_input_embeddings().padding_idx = 5
    ids[0, :4] = 5
    plain = torch.autograd.grad(model(ids).logits.square().mean(), model.lm_head.weight)[0]
    inplace_tied_embedding_grad(model)
    model(ids).logits.square().mean().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, plain, rtol=1e-5, atol=1e-7)
    untied = tiny_gpt2(97, seed=0, n_layer=1)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert not inplace_tied_embedding_grad(untied)
    with torch.no_grad():  # no graph: the plain lookup
        torch.testing.assert_close(model.transformer.wte(ids), torch.nn.functional.embedding(ids, model.lm_head.weight))


def test_inplace_tied_embedding_grad_allocates_no_second_vocabulary_sized_gradient():
    """What it is for: no dense (V x D) lookup gradient is built in the backward (plain autograd builds one, then
    sums it into the LM head's), and the weight's gradient is not copied on the way."""
    from torch.profiler import profile

    from dpolab.logprobs import linear_log_softmax
    from dpolab.train.speedups import inplace_tied_embedding_grad

    for fused in (False, True):
        model, ids = _tied_case()
        if fused:
            inplace_tied_embedding_grad(model)
        hidden = model.transformer(ids).last_hidden_state
        loss = linear_log_softmax(hidden[:, :-1].flatten(0, 1), model.lm_head.weight, None, ids[:, 1:].flatten()).sum()
        with profile(record_shapes=True) as prof:
            loss.backward()
        ops = [e.name for e in prof.events()]
        # the position embedding (untied) keeps its dense backward; the tied token embedding's is gone
        assert ops.count("aten::embedding_dense_backward") == (1 if fused else 2)
        vocabulary_sized = [
            e.input_shapes
            for e in prof.events()
            if e.name == "aten::clone" and any(97 in shape for shape in e.input_shapes if isinstance(shape, list))
        ]
        assert vocabulary_sized == []  # no copy of the weight or of its gradient


# --- the layer norm computed by the linear after it -------------------------------------------------------------


def _norm_and_conv(dtype=torch.float64, seed=0):
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    norm, conv = torch.nn.LayerNorm(7).to(dtype), Conv1D(5, 7).to(dtype)
    for p in (norm.weight, norm.bias, conv.weight, conv.bias):
        torch.nn.init.normal_(p, generator=g)
    x = torch.randn(2, 6, 7, dtype=dtype, generator=g, requires_grad=True)
    return norm, conv, x


def test_norm_then_conv1d_is_layer_norm_then_conv1d_in_values_and_gradients():
    """The fused function against nn.LayerNorm then transformers' Conv1D: finite differences (gradcheck, float64) and
    the plain graph's gradients for x and all four parameters."""
    from dpolab.train.speedups import norm_then_conv1d

    norm, conv, x = _norm_and_conv()
    inputs = (x, norm.weight, norm.bias, conv.weight, conv.bias)
    plain = conv(norm(x))
    plain_grads = torch.autograd.grad(plain.square().sum(), inputs)

    def fused(x, norm_weight, norm_bias, weight, bias):
        return norm_then_conv1d(x, (7,), norm_weight, norm_bias, norm.eps, weight, bias)

    assert torch.autograd.gradcheck(fused, inputs)
    out = fused(*inputs)
    assert "NormThenLinear" in type(out.grad_fn).__name__  # the recomputing function, not a plain graph
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.square().sum(), inputs), plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_recompute_layer_norms_keeps_the_model_function_and_what_autograd_keeps_shrinks():
    """What it is for: per norm, the graph no longer keeps the norm's output and its statistics (the linear keeps the
    norm's input, which the norm kept before), while the model's logits and every parameter's gradient stay the
    same; the norms' parameters keep their state-dict keys."""
    from dpolab.train.speedups import NormPassThrough, NormThenConv1D, recompute_layer_norms

    model = tiny_gpt2(97, seed=0, n_layer=3)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))

    def run():
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids).logits
        return logits, torch.autograd.grad(logits.square().mean(), list(model.parameters())), sum(seen.values())

    before, grads_before, bytes_before = run()
    assert recompute_layer_norms(model) == 6  # ln_1 -> c_attn and ln_2 -> c_fc in each of 3 blocks
    block = model.transformer.h[0]
    assert (type(block.ln_1), type(block.attn.c_attn)) == (NormPassThrough, NormThenConv1D)
    after, grads_after, bytes_after = run()
    # per norm: its (tokens x D) output, and its mean and 1/std per token
    assert bytes_before - bytes_after == 6 * ids.numel() * (model.config.n_embd + 2) * 4
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_after, grads_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert recompute_layer_norms(model) == 0  # idempotent
    assert sorted(model.state_dict()) == sorted(tiny_gpt2(97, seed=0, n_layer=3).state_dict())


@pytest.mark.parametrize("in_place", [False, True])
def test_an_op_between_a_norm_and_its_linear_undoes_the_conversion(in_place, caplog, monkeypatch):
    """The linear computes the norm from the norm's input, so an op between them (here one that triples the
    attention's input, in place or not) would see that input instead of the norm's output: the conversion check sees
    other outputs, undoes every change and says so once; the model computes what it computed before."""
    from transformers.pytorch_utils import Conv1D

    import dpolab.lm_head
    from dpolab.train.speedups import recompute_layer_norms

    monkeypatch.setattr(dpolab.lm_head, "_said", set())  # said once per process: here, once per case
    model = tiny_gpt2(97, seed=0, n_layer=2)
    attention = model.transformer.h[1].attn
    forward = attention.forward

    def tripled(hidden_states, *args, **kwargs):
        return forward(hidden_states.mul_(3.0) if in_place else hidden_states * 3.0, *args, **kwargs)

    attention.forward = tripled
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        assert recompute_layer_norms(model) == 0
    assert "recompute_layer_norms" in caplog.text and "its layer norms are kept as they are" in caplog.text
    assert all(type(b.ln_1) is torch.nn.LayerNorm and type(b.attn.c_attn) is Conv1D for b in model.transformer.h)
    assert not any("norm" in vars(b.attn.c_attn) or "norm" in vars(b.mlp.c_fc) for b in model.transformer.h)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_norm_then_conv1d_under_bf16_autocast_matches_the_plain_modules():
    """Under CPU autocast the product runs in bf16: the output is the plain modules' under the same autocast, exactly,
    and the gradients theirs to bf16 rounding, in the parameters' fp32."""
    from dpolab.train.speedups import norm_then_conv1d

    results = []
    for fused in (False, True):
        norm, conv, x = _norm_and_conv(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                y = norm_then_conv1d(x, (7,), norm.weight, norm.bias, norm.eps, conv.weight, conv.bias)
            else:
                y = conv(norm(x))
        grads = torch.autograd.grad(y.float().square().sum(), (x, *norm.parameters(), *conv.parameters()))
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((y, grads))
    (y0, g0), (y1, g1) = results
    assert y1.dtype == y0.dtype
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):  # the linear's bias gradient is summed in fp32 here, in bf16 by autocast's addmm
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_norm_then_conv1d_recomputes_the_norm_in_the_dtype_the_forward_used():
    """A bf16 input under CPU autocast: the weight's gradient is the one of the norm output the forward multiplied,
    exactly (the plain modules under the same autocast)."""
    from dpolab.train.speedups import norm_then_conv1d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g).bfloat16()
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    weight, bias = torch.randn(8, 5, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_then_conv1d(x, (8,), w, b, 1e-5, weight, bias)
        y = torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5)
        plain = torch.addmm(bias, y.reshape(-1, 8), weight)
    torch.testing.assert_close(
        torch.autograd.grad(out.float().square().sum(), weight)[0],
        torch.autograd.grad(plain.float().square().sum(), weight)[0],
        rtol=0,
        atol=0,
    )
