"""How a training step is made fast without changing what it computes (``make bench`` switches each off alone).

- ``fuse_activations``: transformers' GPT-2 GELU (``gelu_new``) is seven Python-level elementwise operations, each
  a pass over the (tokens x 3072) MLP activations, four of them saved for the backward; torch's
  ``gelu(approximate="tanh")`` is the same function, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in one
  kernel that saves only its input.
  In GPT-2's MLP the GELU and the projection after it are one function, ``gelu_projection``: the autograd graph
  of ``c_proj(gelu(a))`` keeps both a and gelu(a) (two tokens x 3072 tensors per layer); this one keeps a alone
  and recomputes gelu(a) in the backward, for the weight's gradient.
- ``inplace_tied_embedding_grad``: where the input embedding is the LM head's weight (GPT-2, SmolLM2), autograd sums
  that weight's two gradients, the LM head's dense (V x D) one and the lookup's, which is a second dense (V x D)
  tensor of zeros with one row per looked-up token added: at the end of the backward, when every other gradient is
  already held, one more (V x D) tensor. Here the lookup's rows are added in place into ``weight.grad`` instead.
- ``recompute_layer_norms``: in GPT-2's blocks, the linear after each layer norm (``ln_1`` -> ``attn.c_attn``,
  ``ln_2`` -> ``mlp.c_fc``) keeps its input, the norm's output, for its weight's gradient, while the norm keeps its
  own input for its backward: two (tokens x 768) tensors per norm. Here the linear keeps the norm's input alone and
  recomputes the norm's output in the backward (one cheap normalisation per norm).
- ``fused_adamw``: AdamW's fused kernel updates each tensor in one pass, without foreach temporaries.
- The products inside these autograd functions go through ``dpolab.matmul``: oneDNN's fp32 kernels on a CPU,
  torch's own elsewhere.

``speedups_applied`` applies the first three to a model for the duration of a block (``dpolab.train`` wraps its run in
it) and undoes them afterwards, also when the block raises: the caller's model comes back with its own classes and
modules. Packing (``dpolab.data.packing``) and the fused LM head (``dpolab.logprobs.linear_log_softmax``) live with
the data and the log-probs they compute.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..matmul import matmul

__all__ = [
    "speedups_applied",
    "fuse_activations",
    "fused_adamw",
    "native_bf16",
    "gelu_projection",
    "GELUProjection",
    "inplace_tied_embedding_grad",
    "RowGradEmbedding",
    "recompute_layer_norms",
    "SourcedLayerNorm",
    "NormInputConv1D",
]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 or AMX). There bf16 autocast is fast; elsewhere it is emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _conv1d(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's Conv1D product, inp @ weight + bias: (..., n), (n, m), (m,) -> (..., m)."""
    out = matmul(inp.reshape(-1, inp.shape[-1]), weight, bias)
    return out.view(*inp.shape[:-1], weight.shape[1])


def _conv1d_param_grads(ctx, recompute_input, dout: torch.Tensor, weight: torch.Tensor):
    """(dW, db) = (inp^T dout, sum dout) for a Conv1D product inside an autograd Function whose inputs 1 and 2 are
    weight and bias, and whose ctx holds ``mm_dtype`` (the products' dtype) and ``bias_dtype``. ``recompute_input()``
    gives the (tokens, n) input the forward did not keep; it runs only if dW is needed."""
    grad_w = grad_b = None
    if ctx.needs_input_grad[1]:
        grad_w = matmul(recompute_input().to(ctx.mm_dtype).t(), dout).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = dout.sum(0, dtype=torch.promote_types(ctx.mm_dtype, torch.float32)).to(ctx.bias_dtype)
    return grad_w, grad_b


def _gelu_then_project(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(a) @ weight + bias, (..., n) -> (..., m): the forward of ``gelu_projection``, graph or not."""
    return _conv1d(F.gelu(a, approximate="tanh"), weight, bias)


class _GELUProjection(torch.autograd.Function):
    """y = gelu_tanh(a) W + b (GPT-2's Conv1D layout: W is (in, out)), saving a alone. With g = gelu_tanh(a):
    dW = g^T dy, db = sum dy, da = gelu_tanh'(a) * (dy W^T)."""

    @staticmethod
    def forward(ctx, a, weight, bias):
        y = _gelu_then_project(a, weight, bias)
        ctx.mm_dtype = y.dtype  # the products' dtype (bf16 under autocast)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(a, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        a, weight = ctx.saved_tensors
        mm = ctx.mm_dtype
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(mm)
        a2 = a.reshape(-1, a.shape[-1])
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_g = matmul(dy, weight.to(mm).t())
            grad_a = torch.ops.aten.gelu_backward(grad_g.to(a.dtype), a2, approximate="tanh").view(a.shape)
        grad_w, grad_b = _conv1d_param_grads(ctx, lambda: F.gelu(a2, approximate="tanh"), dy, weight)
        return grad_a, grad_w, grad_b


def gelu_projection(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu_tanh(a) @ weight + bias`` with a's activations saved once (module docstring). Shapes: a (..., n),
    weight (n, m), bias (m,) -> (..., m)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (a, weight, bias)):
        return _gelu_then_project(a, weight, bias)
    return _GELUProjection.apply(a, weight, bias)


class GELUProjection(Conv1D):
    """GPT-2's ``mlp.c_proj`` (a Conv1D: ``weight`` (in, out), ``bias``) preceded by the MLP's GELU. ``fuse_activations``
    turns a Conv1D into one by changing its class: the same module, parameters, state-dict keys and hooks (a hook
    on it now sees the GELU's input)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return gelu_projection(a, self.weight, self.bias)


def fuse_activations(model: torch.nn.Module) -> int:
    """In place: in every GPT-2 MLP (``c_fc``, ``act``, ``c_proj``), fold the GELU into the projection after it
    (``GELUProjection``; the MLP's ``act`` becomes the identity; both by a change of class, so the modules and
    their hooks stay); elsewhere, replace a
    ``transformers.activations.NewGELUActivation`` by the fused ``GELUTanh`` (transformers' own
    ``gelu_pytorch_tanh``). Returns how many GELUs were replaced. The model computes the same function, to float
    rounding; its config still says ``gelu_new`` and its state dict has the same keys, so a saved model reloads as
    before."""
    from transformers.activations import GELUTanh, NewGELUActivation

    replaced = 0
    for module in model.modules():
        if (
            type(getattr(module, "act", None)) in (NewGELUActivation, GELUTanh)
            and type(getattr(module, "c_proj", None)) is Conv1D
            and hasattr(module, "c_fc")
        ):
            module.c_proj.__class__, module.act.__class__ = GELUProjection, torch.nn.Identity
            replaced += 1
            continue
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced


_NORM_SOURCE = "_dpolab_norm_source"  # a SourcedLayerNorm's output carries (its version, x, the norm's arguments)


class SourcedLayerNorm(torch.nn.LayerNorm):
    """An ``nn.LayerNorm`` whose output remembers its input and the norm's arguments (as the attribute
    ``_NORM_SOURCE``), so that the ``NormInputConv1D`` it feeds can recompute it in the backward instead of keeping
    it. The norm's own function, gradients and saved tensors are ``nn.LayerNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if torch.is_grad_enabled() and y.requires_grad:
            setattr(y, _NORM_SOURCE, (y._version, x, self.weight, self.bias, tuple(self.normalized_shape), self.eps))
        return y


class _NormInputLinear(torch.autograd.Function):
    """out = y W + b with y = layer_norm(x) (GPT-2's Conv1D layout: W is (in, out)), keeping x, not y:
    dy = dout W^T, dW = y^T dout with y recomputed from x, db = sum dout. x is the norm's input, which the norm's
    own backward keeps anyway; it is an input here only to be saved, and gets no gradient from this function."""

    @staticmethod
    def forward(ctx, y, weight, bias, x, norm_weight, norm_bias, norm_shape, eps):
        out = _conv1d(y, weight, bias)
        ctx.mm_dtype, ctx.y_dtype = out.dtype, y.dtype  # the product's dtype (bf16 under autocast)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.norm_shape, ctx.eps = norm_shape, eps
        ctx.save_for_backward(weight, x, norm_weight, norm_bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weight, x, norm_weight, norm_bias = ctx.saved_tensors
        mm = ctx.mm_dtype
        dout = grad_out.reshape(-1, grad_out.shape[-1]).to(mm)
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = matmul(dout, weight.to(mm).t()).to(ctx.y_dtype).view(*x.shape[:-1], weight.shape[0])

        def norm_output():  # in the wider dtype, as autocast ran the norm (fp32 from bf16 under CUDA's)
            wide = torch.promote_types(x.dtype, ctx.y_dtype)
            y = F.layer_norm(
                x.to(wide),
                ctx.norm_shape,
                None if norm_weight is None else norm_weight.to(wide),
                None if norm_bias is None else norm_bias.to(wide),
                ctx.eps,
            ).to(ctx.y_dtype)
            return y.reshape(-1, y.shape[-1])

        grad_w, grad_b = _conv1d_param_grads(ctx, norm_output, dout, weight)
        return grad_y, grad_w, grad_b, None, None, None, None, None


class NormInputConv1D(Conv1D):
    """A GPT-2 ``Conv1D`` that, fed the untouched output of a ``SourcedLayerNorm``, keeps the norm's input instead
    of its own (``_NormInputLinear``); fed anything else, it is a plain Conv1D. ``recompute_layer_norms`` turns a
    Conv1D into one by changing its class: the same module, parameters, state-dict keys and hooks."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        source = getattr(y, _NORM_SOURCE, None)
        if source is None or source[0] != y._version or not torch.is_grad_enabled():  # changed in place: plain
            return super().forward(y)
        return _NormInputLinear.apply(y, self.weight, self.bias, *source[1:])


def recompute_layer_norms(model: torch.nn.Module) -> int:
    """In place: in every GPT-2 block, make ``ln_1`` and ``ln_2`` ``SourcedLayerNorm`` and the linears they feed
    (``attn.c_attn``, ``mlp.c_fc``) ``NormInputConv1D``, by a change of class; returns how many norm-linear pairs it
    converted. The model computes the same function with the same gradients, to float rounding; only what autograd
    keeps for the backward changes."""
    pairs = 0
    for block in model.modules():
        for norm_name, owner_name, linear_name in (("ln_1", "attn", "c_attn"), ("ln_2", "mlp", "c_fc")):
            norm, linear = getattr(block, norm_name, None), getattr(getattr(block, owner_name, None), linear_name, None)
            if type(norm) is torch.nn.LayerNorm and type(linear) is Conv1D:
                norm.__class__, linear.__class__ = SourcedLayerNorm, NormInputConv1D
                pairs += 1
    return pairs


class _RowsIntoGrad(torch.autograd.Function):
    """weight[ids] forward; backward adds the incoming gradient's rows into ``weight.grad`` in place (creating it if
    need be) and returns no gradient for the weight, which is not an input of the graph here. ``anchor`` (an empty
    leaf that requires grad) is what puts the lookup in the graph."""

    @staticmethod
    def forward(ctx, anchor, ids, holder, padding_idx):
        ctx.holder, ctx.padding_idx = holder, padding_idx
        ctx.save_for_backward(ids)
        return F.embedding(ids, holder[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.holder[0]
        rows, grads = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.padding_idx is not None:  # nn.Embedding's rule: the padding row gets no gradient
            keep = rows != ctx.padding_idx
            rows, grads = rows[keep], grads[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, rows, grads.to(weight.grad.dtype))
        return None, None, None, None


class RowGradEmbedding(torch.nn.Embedding):
    """An ``nn.Embedding`` whose weight gradient is added into ``weight.grad`` in place (``_RowsIntoGrad``).
    ``inplace_tied_embedding_grad`` turns an embedding into one by changing its class, so the module, its parameter,
    its state-dict key and its hooks stay what they were. Only for a weight whose gradient no hook watches as it is
    accumulated: with several processes (DistributedDataParallel reduces a gradient when autograd has accumulated it)
    it is a plain lookup."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # under DDP: autograd's own accumulation, which its reducer watches
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(ids)
        anchor = torch.empty(0, device=self.weight.device, requires_grad=True)
        return _RowsIntoGrad.apply(anchor, ids, (self.weight,), self.padding_idx)


def inplace_tied_embedding_grad(model: torch.nn.Module) -> bool:
    """In place: if ``model``'s input embedding is a plain ``nn.Embedding`` whose weight is the LM head's, make it a
    ``RowGradEmbedding``; returns whether it did. The gradients are the same sums, to float rounding."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    embedding, head = get_in(), get_out()
    if (
        type(embedding) is not torch.nn.Embedding
        or head is None
        or head.weight is not embedding.weight
        or embedding.max_norm is not None
        or embedding.sparse
        or embedding.scale_grad_by_freq
    ):
        return False
    embedding.__class__ = RowGradEmbedding
    return True


def fused_adamw(model: torch.nn.Module, device: torch.device) -> bool | None:
    """``fused=`` for ``torch.optim.AdamW``: True where torch has the fused kernel (CPU, CUDA; floating-point
    parameters), else None (torch's default). The same update as the default, to float rounding."""
    if device.type not in ("cpu", "cuda"):
        return None
    return (
        all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in model.parameters())
        or None
    )


def _undo(changed_classes, replaced_children) -> None:
    for parent, name, child in replaced_children:
        setattr(parent, name, child)
    for module, cls in changed_classes:
        module.__class__ = cls


@contextlib.contextmanager
def speedups_applied(
    model: torch.nn.Module, *, activations: bool = True, tied_embedding_grad: bool = True, layer_norms: bool = True
):
    """``fuse_activations``, ``inplace_tied_embedding_grad`` and ``recompute_layer_norms`` (each where asked) on
    ``model`` inside the block; on leaving it, normally or by an exception, every module whose class they changed
    gets its class back and every child module they replaced is put back (the same objects, so parameters, hooks and
    state-dict keys are the caller's)."""
    classes = {module: type(module) for module in model.modules()}
    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]

    def changes():
        changed = [(module, cls) for module, cls in classes.items() if type(module) is not cls]
        return changed, [
            (parent, name, child) for parent, name, child in children if getattr(parent, name) is not child
        ]

    try:
        if activations:
            fuse_activations(model)
        if tied_embedding_grad:
            inplace_tied_embedding_grad(model)
        if layer_norms:
            recompute_layer_norms(model)
    except BaseException:
        _undo(*changes())
        raise
    made = changes()
    try:
        yield
    finally:
        _undo(*made)
