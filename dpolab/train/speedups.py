"""How a training step is made fast without changing what it computes (``TrainConfig.speedups``; ``make bench``
switches each off alone).

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
  own input for its backward: two (tokens x 768) tensors per norm. Here the linear computes the norm itself from the
  norm's input (the norm passes its input on), keeps that input alone, and recomputes the norm's output in the
  backward (one cheap normalisation per norm). An op between the two modules would see the norm's input instead of
  its output, so the conversion checks the model's outputs and gradients on a few tokens against the unconverted
  model's and is undone, and said once, where they differ.
- ``fused_adamw``: AdamW's fused kernel updates each tensor in one pass, without foreach temporaries.
- The products inside these autograd functions go through ``dpolab.matmul``: oneDNN's fp32 kernels on a CPU,
  torch's own elsewhere (``onednn_products``).

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

from ..lm_head import close, say_once
from ..matmul import matmul
from .config import Speedups

__all__ = [
    "speedups_applied",
    "fuse_activations",
    "fused_adamw",
    "gelu_projection",
    "GELUProjection",
    "inplace_tied_embedding_grad",
    "RowGradEmbedding",
    "recompute_layer_norms",
    "norm_then_conv1d",
    "NormPassThrough",
    "NormThenConv1D",
]


def _conv1d(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's Conv1D product, inp @ weight + bias: (..., n), (n, m), (m,) -> (..., m)."""
    out = matmul(inp.reshape(-1, inp.shape[-1]), weight, bias)
    return out.view(*inp.shape[:-1], weight.shape[1])


def _conv1d_param_grads(ctx, recompute_input, dout: torch.Tensor, weight: torch.Tensor, bias_index: int):
    """(dW, db) = (inp^T dout, sum dout) for a Conv1D product inside an autograd Function whose inputs
    ``bias_index - 1`` and ``bias_index`` are weight and bias, and whose ctx holds ``mm_dtype`` (the products' dtype)
    and ``bias_dtype``. ``recompute_input()`` gives the (tokens, n) input the forward did not keep; it runs only if
    dW is needed."""
    grad_w = grad_b = None
    if ctx.needs_input_grad[bias_index - 1]:
        grad_w = matmul(recompute_input().to(ctx.mm_dtype).t(), dout).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[bias_index]:
        grad_b = dout.sum(0, dtype=torch.promote_types(ctx.mm_dtype, torch.float32)).to(ctx.bias_dtype)
    return grad_w, grad_b


# ----------------------------------------------------------------------------------------- the fused GELU


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
        a2 = a.detach().reshape(-1, a.shape[-1]).requires_grad_(ctx.needs_input_grad[0])
        with torch.enable_grad():
            g = F.gelu(a2, approximate="tanh")  # recomputed: for dW, and (its graph) for da
        grad_w, grad_b = _conv1d_param_grads(ctx, g.detach, dy, weight, bias_index=2)
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_g = matmul(dy, weight.to(mm).t()).to(g.dtype)
            (grad_a,) = torch.autograd.grad(g, a2, grad_g)
            grad_a = grad_a.view(a.shape)
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


# ------------------------------------------------------------------------------- the recomputed layer norms


def _autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


class _NormThenLinear(torch.autograd.Function):
    """out = y W + b with y = layer_norm(x) (GPT-2's Conv1D layout: W is (in, out)), keeping x, not y. The backward
    recomputes y from x (under the forward's autocast, so in its dtype), then dW = y^T dout, db = sum dout, and
    dx, d(norm weight), d(norm bias) as layer_norm's own backward of dy = dout W^T."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, norm_shape, eps):
        y = F.layer_norm(x, norm_shape, norm_weight, norm_bias, eps)
        out = _conv1d(y, weight, bias)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.mm_dtype = out.dtype  # the product's dtype (bf16 under autocast)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.norm_shape, ctx.eps = norm_shape, eps
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        device_type, dtype, enabled = ctx.autocast
        norm_inputs = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip((x, norm_weight, norm_bias), ctx.needs_input_grad[:3])
        ]
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            y = F.layer_norm(norm_inputs[0], ctx.norm_shape, norm_inputs[1], norm_inputs[2], ctx.eps)
        dout = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.mm_dtype)
        grad_w, grad_b = _conv1d_param_grads(ctx, lambda: y.detach().reshape(-1, y.shape[-1]), dout, weight, 4)
        grads = [None, None, None]
        wanted = [i for i in range(3) if ctx.needs_input_grad[i] and norm_inputs[i] is not None]
        if wanted:
            grad_y = matmul(dout, weight.to(ctx.mm_dtype).t()).to(y.dtype).view(y.shape)
            found = torch.autograd.grad(y, [norm_inputs[i] for i in wanted], grad_y)
            for i, g in zip(wanted, found):
                grads[i] = g
        return *grads, grad_w, grad_b, None, None


def norm_then_conv1d(
    x: torch.Tensor,
    norm_shape: tuple[int, ...],
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.layer_norm(x, norm_shape, norm_weight, norm_bias, eps) @ weight + bias``, keeping x alone for the backward
    (``_NormThenLinear``). Shapes: x (..., n), weight (n, m), bias (m,) -> (..., m)."""
    tensors = (x, norm_weight, norm_bias, weight, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return _conv1d(F.layer_norm(x, norm_shape, norm_weight, norm_bias, eps), weight, bias)
    return _NormThenLinear.apply(x, norm_weight, norm_bias, weight, bias, tuple(norm_shape), eps)


class NormPassThrough(torch.nn.LayerNorm):
    """A LayerNorm whose normalisation the linear it feeds computes (``NormThenConv1D``): its forward returns its
    input as it is. Its parameters stay where they were (the same state-dict keys, the same optimizer entries)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NormThenConv1D(Conv1D):
    """A GPT-2 ``Conv1D`` that normalises its input with the layer norm before it (``self.norm``, a
    ``NormPassThrough``, referenced, not a child module) and keeps only that input for the backward
    (``norm_then_conv1d``). ``recompute_layer_norms`` turns a Conv1D into one by changing its class: the same module,
    parameters, state-dict keys and hooks."""

    norm: torch.nn.LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        return norm_then_conv1d(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, self.weight, self.bias)


_PROBE_TOKENS = 8  # tokens of the conversion check's input


def _norm_linear_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.LayerNorm, Conv1D]]:
    """(ln_1, attn.c_attn) and (ln_2, mlp.c_fc) of every GPT-2 block, where both are the plain modules."""
    pairs = []
    for block in model.modules():
        for norm_name, owner_name, linear_name in (("ln_1", "attn", "c_attn"), ("ln_2", "mlp", "c_fc")):
            norm, linear = getattr(block, norm_name, None), getattr(getattr(block, owner_name, None), linear_name, None)
            if type(norm) is torch.nn.LayerNorm and type(linear) is Conv1D:
                pairs.append((norm, linear))
    return pairs


@contextlib.contextmanager
def _fixed_random_numbers(device: torch.device):
    """Inside the block, the same random numbers (dropout's) on every entry; the RNG states restored on leaving."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(0)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(0)
        yield


def _probe(model: torch.nn.Module, norms: list[torch.nn.LayerNorm]) -> list[torch.Tensor]:
    """The model's output on ``_PROBE_TOKENS`` tokens and the gradients of a fixed random projection of it with
    respect to the input embeddings and the norms' parameters; the same random numbers on every call (dropout)."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    ids = torch.arange(_PROBE_TOKENS, device=device)[None] % embedding.num_embeddings
    inputs = F.embedding(ids, embedding.weight).detach().requires_grad_()  # not the module: its hooks stay quiet
    params = [p for norm in norms for p in (norm.weight, norm.bias) if p is not None and p.requires_grad]
    with _fixed_random_numbers(device), torch.enable_grad():
        out = model(inputs_embeds=inputs, use_cache=False)[0].float()
        direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device)
        grads = torch.autograd.grad((out * direction).sum(), [inputs, *params])
    return [out.detach(), *grads]


def recompute_layer_norms(model: torch.nn.Module) -> int:
    """In place: in every GPT-2 block, make ``ln_1`` and ``ln_2`` ``NormPassThrough`` and the linears they feed
    (``attn.c_attn``, ``mlp.c_fc``) ``NormThenConv1D``, by a change of class; returns how many norm-linear pairs it
    converted. The model computes the same function with the same gradients, to float rounding; only what autograd
    keeps for the backward changes. That is checked once, on a few tokens (the outputs and the gradients of the input
    embeddings and the norms' parameters, against the unconverted model's): where they differ (an op between a norm
    and its linear) or the check cannot run, the conversion is undone, said once, and 0 returned."""
    pairs = _norm_linear_pairs(model)
    if not pairs:
        return 0
    norms = [norm for norm, _ in pairs]
    try:
        before = _probe(model, norms)
    except Exception as error:  # a model the check cannot run on is left as it is
        say_once(f"dpolab: {type(model).__name__}: its layer norms are kept (the conversion check fails: {error})")
        return 0
    for norm, linear in pairs:
        norm.__class__, linear.__class__ = NormPassThrough, NormThenConv1D
        object.__setattr__(linear, "norm", norm)  # a reference, not a child: the norm stays the block's own
    try:
        after = _probe(model, norms)
        dtype = model.get_input_embeddings().weight.dtype  # the rounding the model computes with
        same = all(close(a, b, dtype) for a, b in zip(after, before))
        why = "changes its outputs or gradients (an op between a layer norm and the linear after it?)"
    except Exception as error:
        same, why = False, f"fails its forward or backward ({type(error).__name__}: {error})"
    if not same:
        _unconvert(pairs)
        say_once(f"dpolab: {type(model).__name__}: recompute_layer_norms {why}; its layer norms are kept as they are")
        return 0
    return len(pairs)


def _unconvert(pairs) -> None:
    for norm, linear in pairs:
        norm.__class__, linear.__class__ = torch.nn.LayerNorm, Conv1D
        linear.__dict__.pop("norm", None)


# ------------------------------------------------------------------------- the tied embedding's gradient


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
        if ctx.padding_idx is not None:  # nn.Embedding's rule: the padding row gets no gradient (a select, not a
            grads = torch.where((rows != ctx.padding_idx)[:, None], grads, 0)  # mask: no read on the host)
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


@contextlib.contextmanager
def _onednn_enabled(enabled: bool):
    """torch's public switch ``torch.backends.mkldnn.enabled`` off inside the block unless ``enabled`` (as it was
    otherwise), and back as it was afterwards."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = was and enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def _undo(changed_classes, replaced_children) -> None:
    for parent, name, child in replaced_children:
        setattr(parent, name, child)
    for module, cls in changed_classes:
        module.__class__ = cls
        if isinstance(module, Conv1D):
            module.__dict__.pop("norm", None)  # NormThenConv1D's reference to its norm


@contextlib.contextmanager
def speedups_applied(model: torch.nn.Module, speedups: Speedups = Speedups()):
    """``recompute_layer_norms``, ``fuse_activations`` and ``inplace_tied_embedding_grad`` (each where ``speedups``
    asks) on ``model`` inside the block, and oneDNN off unless ``speedups.onednn_products``; on leaving it, normally
    or by an exception, every module whose class they changed gets its class back and every child module they
    replaced is put back (the same objects, so parameters, hooks and state-dict keys are the caller's)."""
    classes = {module: type(module) for module in model.modules()}
    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]

    def changes():
        changed = [(module, cls) for module, cls in classes.items() if type(module) is not cls]
        return changed, [
            (parent, name, child) for parent, name, child in children if getattr(parent, name) is not child
        ]

    try:
        if speedups.recompute_layer_norms:  # first: its check takes gradients, which RowGradEmbedding writes in place
            recompute_layer_norms(model)
        if speedups.fuse_activations:
            fuse_activations(model)
        if speedups.inplace_tied_embedding_grad:
            inplace_tied_embedding_grad(model)
    except BaseException:
        _undo(*changes())
        raise
    made = changes()
    try:
        with _onednn_enabled(speedups.onednn_products):
            yield
    finally:
        _undo(*made)
