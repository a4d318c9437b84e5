"""The matrix products of dpolab's hand-written backward passes: oneDNN's fp32 kernels on a CPU, torch's elsewhere.

On x86 CPUs torch multiplies fp32 matrices with MKL's sgemm, which is not tuned for every CPU (AMD's among them);
torch also ships oneDNN, with fp32 kernels of its own (``make bench``'s ablation row compares the two). Both compute
the product in fp32: results agree to rounding. ``matmul`` takes oneDNN where it applies (a CPU, fp32 operands, no
autocast, no graph to record: oneDNN's op has no autograd formula, so it serves only inside
``torch.autograd.Function``s and under ``no_grad``), torch's ``mm``/``addmm`` otherwise.

oneDNN's product is torch's operator ``torch.ops.mkldnn._linear_pointwise``, which torch does not document. It is
taken only after a one-time check (``onednn_linear``): the operator exists and gives ``torch.addmm``'s product on a
small case. Where it does not (a torch without it, or one where it changed), every product is torch's public
``addmm``, and that is said once. torch's public switch ``torch.backends.mkldnn.enabled = False`` turns oneDNN off
(``TrainConfig.speedups.onednn_products = False`` does so for a training run).

oneDNN caches the kernel it builds for each shape, 1,024 by default, and each cached kernel holds memory of its
own. Training shapes change with every batch (the token counts), so that cache would grow for hundreds of steps,
and peak memory with it. Before its first product (its check), ``matmul`` sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` for the
process (unless it is set already: the user's value wins; oneDNN reads it once, so it has no effect if oneDNN
already ran in this process): a kernel is built for each call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from .lm_head import say_once

__all__ = ["matmul", "uses_onednn", "onednn_linear"]


def _operator() -> Callable:
    """oneDNN's X W^T + b, (m, k), (n, k), (n,) -> (m, n); raises where this torch has no such operator."""
    return torch.ops.mkldnn._linear_pointwise


@functools.cache
def onednn_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """(a, b, bias) -> a @ b + bias through oneDNN, or None where its operator is missing or does not give torch's
    product on a 5 x 3 x 4 case (checked once per process; a None is said once)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")  # before oneDNN's first kernel (module docstring)
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g), torch.randn(4, generator=g)
    try:
        op = _operator()
        same = torch.allclose(op(a, b.t(), bias, "none", [], ""), torch.addmm(bias, a, b), rtol=1e-5, atol=1e-6)
        why = "gives another product than torch.addmm"
    except Exception as error:  # absent, renamed or with another signature in this torch
        same, why = False, f"is not available in this torch ({type(error).__name__})"
    if not same:
        say_once(f"dpolab.matmul: oneDNN's linear operator {why}; dpolab's products go through torch.addmm")
        return None
    return lambda a, b, bias: op(a, b.t(), bias, "none", [], "")  # X W^T + B with W = b^T


def uses_onednn(*tensors: torch.Tensor | None) -> bool:
    """Whether ``matmul`` on these operands (None: absent) runs oneDNN's kernel."""
    present = [t for t in tensors if t is not None]
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() for t in present)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and onednn_linear() is not None
    )


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b + bias. Shapes: a (m, k), b (k, n), bias (n,) or None -> (m, n). Any strides (transposed views too)."""
    if uses_onednn(a, b, bias):
        return onednn_linear()(a, b, bias)
    return a @ b if bias is None else torch.addmm(bias, a, b)
