"""The matrix products of dpolab's hand-written backward passes: oneDNN's fp32 kernels on a CPU, torch's elsewhere.

On x86 CPUs torch multiplies fp32 matrices with MKL's sgemm. torch also ships oneDNN, with fp32 kernels of its own
(``make bench``'s ablation row compares the two). Both compute the product in fp32: results agree to rounding. ``matmul`` takes oneDNN where it applies (a CPU, fp32 operands, no autocast, no
graph to record: oneDNN's op has no autograd formula, so it serves only inside ``torch.autograd.Function``s and
under ``no_grad``) and torch's ``mm``/``addmm`` otherwise. ``ONEDNN = False`` switches it off (``make bench``'s
ablation row).

oneDNN caches the kernel it builds for each shape, 1,024 by default, and each cached kernel holds memory of its
own. Training shapes change with every batch (the token counts), so that cache would grow for hundreds of steps,
and peak memory with it. Before its first product, ``matmul`` sets
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` for the process (unless it is set already: the user's value wins; oneDNN
reads it once, so it has no effect if oneDNN already ran in this process): a kernel is built for each call.
"""

from __future__ import annotations

import os

import torch

__all__ = ["ONEDNN", "matmul", "uses_onednn"]

ONEDNN = True  # fp32 products on a CPU through oneDNN (where torch has it)


def uses_onednn(*tensors: torch.Tensor | None) -> bool:
    """Whether ``matmul`` on these operands (None: absent) runs oneDNN's kernel."""
    present = [t for t in tensors if t is not None]
    return (
        ONEDNN
        and torch.backends.mkldnn.is_available()
        and torch._C._get_mkldnn_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() for t in present)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
    )


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b + bias. Shapes: a (m, k), b (k, n), bias (n,) or None -> (m, n). Any strides (transposed views too)."""
    if uses_onednn(a, b, bias):
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")  # module docstring
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")  # X W^T + B with W = b^T
    return a @ b if bias is None else torch.addmm(bias, a, b)
