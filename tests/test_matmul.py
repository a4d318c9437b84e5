"""dpolab.matmul: oneDNN's fp32 products where they apply, torch's elsewhere, the same numbers either way."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from dpolab.matmul import matmul, uses_onednn

ONEDNN_HERE = torch.backends.mkldnn.is_available()


def _operands(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    a, b, bias = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((9, 6), (6, 4), (4,)))
    return a, b, bias


@pytest.mark.parametrize("layout", ["contiguous", "a-transposed", "b-transposed", "both-transposed"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_is_the_product_in_every_layout(layout, with_bias):
    """Against float64 arithmetic: a @ b + bias to fp32 rounding, whichever strides the operands have."""
    a64, b64, bias64 = _operands()
    a, b = a64.float(), b64.float()
    if layout in ("a-transposed", "both-transposed"):
        a = a.t().contiguous().t()
    if layout in ("b-transposed", "both-transposed"):
        b = b.t().contiguous().t()
    bias = bias64.float() if with_bias else None
    assert uses_onednn(a, b, bias) == ONEDNN_HERE
    expected = a64 @ b64 + (bias64 if with_bias else 0)
    torch.testing.assert_close(matmul(a, b, bias).double(), expected, rtol=1e-6, atol=1e-6)


def test_where_onednn_does_not_apply_torch_multiplies(monkeypatch):
    a, b, bias = (t.float() for t in _operands())
    assert not uses_onednn(a.double(), b.double())  # not fp32
    assert not uses_onednn(a.bfloat16(), b.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: torch's own op
        assert not uses_onednn(a, b)
        assert matmul(a, b).dtype == torch.bfloat16
    leaf = a.clone().requires_grad_()
    assert not uses_onednn(leaf, b)  # a graph to record: oneDNN's op has no autograd formula
    matmul(leaf, b, bias).square().sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * (a @ b + bias) @ b.t())
    with torch.no_grad():
        assert uses_onednn(leaf, b) == ONEDNN_HERE
    assert not uses_onednn(a[:0], b)  # empty
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # torch's public switch
    assert not uses_onednn(a, b)
    torch.testing.assert_close(matmul(a, b, bias), torch.addmm(bias, a, b))


def _missing():
    raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")


def _changed():
    return lambda a, w, bias, *args: a @ w.t()  # an operator that no longer adds the bias


@pytest.mark.parametrize("operator", [_missing, _changed], ids=["missing", "changed"])
def test_without_a_working_onednn_operator_torch_multiplies_and_says_so_once(operator, monkeypatch, caplog):
    """oneDNN's operator is not public torch API: where this torch has none, or it no longer computes a @ b + bias,
    the check refuses it once (said once), and every product is torch's addmm, with the same numbers."""
    import dpolab.lm_head

    a, b, bias = (t.float() for t in _operands())
    expected = matmul(a, b, bias)  # this torch's own path, whichever it is
    monkeypatch.setattr(dpolab.matmul, "_operator", operator)
    monkeypatch.setattr(dpolab.lm_head, "_said", set())
    dpolab.matmul.onednn_linear.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dpolab"):
            assert not uses_onednn(a, b, bias)
            torch.testing.assert_close(matmul(a, b, bias), expected, rtol=1e-6, atol=1e-6)
            assert dpolab.matmul.onednn_linear() is None
        said = [r.message for r in caplog.records if "oneDNN's linear operator" in r.message]
        assert len(said) == 1 and "dpolab's products go through torch.addmm" in said[0]
    finally:
        dpolab.matmul.onednn_linear.cache_clear()  # the next caller checks this torch's own operator again


def _onednn_kernel_creations(env: dict[str, str]) -> list[str]:
    """In a fresh process (oneDNN reads its cache capacity once, on its first product) with ``env`` added: three
    equal fp32 products through ``matmul``, and what oneDNN's verbose log says of each kernel it made or found:
    "cache_miss" (built) or "cache_hit" (taken from its cache)."""
    code = (
        "import torch\n"
        "from dpolab.matmul import matmul, onednn_linear\n"
        "a, b = torch.randn(9, 6), torch.randn(6, 4)\n"
        "onednn_linear()\n"  # its one-time check, outside the log
        "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):\n"
        "    for _ in range(3):\n"
        "        matmul(a, b)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return re.findall(r"primitive,create:(cache_\w+),cpu,inner_product", out)


@pytest.mark.skipif(not ONEDNN_HERE, reason="this torch has no oneDNN")
def test_onednn_kernels_are_not_cached_unless_the_user_says():
    """Training shapes change every batch and each cached kernel holds memory: dpolab's products build their kernel
    each time (no cache hit on a repeated shape), unless the user set oneDNN's cache capacity, which then serves
    the repeats from the cache."""
    assert _onednn_kernel_creations({}) == ["cache_miss"] * 3
    assert _onednn_kernel_creations({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}) == [
        "cache_miss",
        "cache_hit",
        "cache_hit",
    ]
