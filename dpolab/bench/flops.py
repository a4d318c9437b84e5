"""The work a DPO step cannot avoid, and the fastest matrix product this machine runs: the two ends of the ruler.

Minimal FLOPs of one preference pair (x, y_w, y_l) of P, C, R tokens, for a decoder with N_mm weights in its
blocks' matrix products (attention and MLP projections, embeddings excluded), n_layer layers of width D and a
vocabulary of V:

    forward = 2 N_mm (P + C + R)                       every token once: the prompt is not computed twice
            + 4 D n_layer A                            Q K^T and A V over the A visible (query, key) pairs,
                  A = P(P+1)/2 + (C + R) P + C(C+1)/2 + R(R+1)/2
            + 2 V D (C + R)                            the LM head where a label is scored, nowhere else
    minimal = 3 x forward                              the backward costs two products per forward product

No padding, no reference model (its log-probs are a constant of the data), no recomputation. The ceiling is the
fastest fp32 product of torch's libraries (MKL's sgemm through ``torch.mm``, oneDNN's) at the model's shapes. Elementwise work
(layer norms, GELU, softmax, AdamW) is not counted: it is memory-bound, and what it costs is part of the gap
between an implementation and this limit. ``fraction_of_limit`` = pairs/s achieved / (ceiling / minimal FLOPs).
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["matmul_weights", "pair_flops", "matmul_ceiling", "cuda_matmul_ceiling"]


def matmul_weights(model: torch.nn.Module) -> int:
    """N_mm: the number of weights in the 2-D matrices of the transformer blocks (nn.Linear and GPT-2's Conv1D)."""
    body = model.base_model
    embeddings = {id(p) for m in body.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in body.parameters() if p.dim() == 2 and id(p) not in embeddings)


def pair_flops(model: torch.nn.Module, prompt: int, chosen: int, rejected: int) -> float:
    """Minimal FLOPs (forward and backward) of one pair with these token counts (module docstring)."""
    config = model.config
    width = getattr(config, "n_embd", None) or config.hidden_size
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    vocab = model.get_output_embeddings().weight.shape[0]
    P, C, R = prompt, chosen, rejected
    visible = P * (P + 1) / 2 + (C + R) * P + C * (C + 1) / 2 + R * (R + 1) / 2
    forward = 2 * matmul_weights(model) * (P + C + R) + 4 * width * layers * visible + 2 * vocab * width * (C + R)
    return 3.0 * forward


def _products(m: int, k: int, n: int) -> dict:
    """The fp32 products of an (m, k) and a (k, n) matrix this machine offers, each in its best layout: torch's ``mm``
    (MKL's sgemm on x86) and, where dpolab takes it, oneDNN's (``dpolab.matmul``; its second operand stored (n, k))."""
    from ..matmul import onednn_linear

    a, b = torch.randn(m, k), torch.randn(k, n)
    out, b_t = torch.empty(m, n), b.t().contiguous().t()  # b stored (n, k), as oneDNN is fastest with it
    products = {"torch.mm": lambda: torch.mm(a, b, out=out)}
    onednn = onednn_linear() if torch.backends.mkldnn.is_available() else None
    if onednn is not None:
        products["oneDNN"] = lambda: onednn(a, b_t, None)
    return products


def matmul_ceiling(shapes: list[tuple[int, int, int]], seconds: float = 0.6) -> dict:
    """The highest fp32 FLOP/s of a matrix product over ``shapes`` (m, k, n) and over the libraries torch offers
    (``_products``): each timed for ~``seconds`` after a warm-up, its median taken; returns the best shape, its
    library, its FLOP/s and all of them."""
    results = []
    for m, k, n in shapes:
        for library, product in _products(m, k, n).items():
            for _ in range(3):
                product()
            times, start = [], time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 5:
                t = time.perf_counter()
                product()
                times.append(time.perf_counter() - t)
            results.append(
                {"shape": [m, k, n], "library": library, "flops_per_s": 2.0 * m * k * n / statistics.median(times)}
            )
    best = max(results, key=lambda r: r["flops_per_s"])
    return {
        "flops_per_s": best["flops_per_s"],
        "shape": best["shape"],
        "library": best["library"],
        "all": results,
        "threads": torch.get_num_threads(),
    }


def cuda_matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> dict:
    """The FLOP/s of a (size x size) @ (size x size) product in ``dtype`` on a CUDA ``device``: the median of
    ``repeats`` products timed with CUDA events after a warm-up (the device's measured peak for this dtype)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    flops = 2.0 * size**3 / statistics.median(times)
    library = f"torch.mm, {str(dtype).removeprefix('torch.')}, {torch.cuda.get_device_name(device)}"
    shape = [size, size, size]
    return {"flops_per_s": flops, "shape": shape, "library": library, "all": [], "threads": torch.get_num_threads()}
