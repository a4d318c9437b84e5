"""dpolab.device: the one place that chooses the device and says what precision "auto" means."""

from __future__ import annotations

import pytest
import torch

from dpolab.device import autocast, autocast_dtype, check_device, choose_device, init_distributed, resolve_precision


def test_auto_is_cpu_on_a_machine_without_cuda_or_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_naming_the_fix():
    with pytest.raises(ValueError, match=r"^device 'cuda' is not available: .*pass --device cpu") as refused:
        check_device("cuda")
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match=r"device must be one of \('auto', 'cpu', 'cuda', 'mps'\), got 'gpu'"):
        check_device("gpu")


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_auto_means_bf16_only_on_a_cuda_device_that_supports_it(monkeypatch, bf16_gpu):
    """The documented meaning: auto = bf16 autocast on CUDA with bf16, fp32 elsewhere (a CPU included); bf16 may be
    asked for on a CPU, not on a device without bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert autocast_dtype("auto", cpu) is None and resolve_precision("auto", cpu) == "fp32"
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and resolve_precision("bf16", cpu) == "bf16"
    assert autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("auto", cuda) is (torch.bfloat16 if bf16_gpu else None)
    assert autocast_dtype("auto", mps) is None
    with pytest.raises(ValueError, match=r"precision='bf16': mps has no bf16 support; pass precision='fp32'"):
        autocast_dtype("bf16", mps)
    if not bf16_gpu:
        with pytest.raises(ValueError, match=r"precision='bf16': cuda:0 has no bf16 support"):
            autocast_dtype("bf16", cuda)
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"):
        autocast_dtype("fp16", cpu)


def test_autocast_of_none_is_fp32_even_inside_an_outer_autocast():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with autocast(cpu, None):
            assert (a @ b).dtype == torch.float32


def test_one_process_without_torchrun_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu")) == (0, 1, False)
