"""Where dpolab computes and in what precision: the one place that decides, for training (``dpolab.train``), its
evaluation, the Penn experiment and the bench.

Device. ``"auto"`` is the first of ``cuda``, ``mps``, ``cpu`` this machine has. Under ``torchrun`` (``LOCAL_RANK``
set), a CUDA process takes ``cuda:LOCAL_RANK``, one GPU per process, and ``init_distributed`` joins the process
group (NCCL on CUDA, gloo elsewhere), as nanoGPT and TRL's Trainer do.

Precision (``PRECISIONS``). The weights and AdamW's state are fp32 in every case; what changes is the precision of
the forward and backward products:

- ``"fp32"``: fp32 throughout.
- ``"bf16"``: bf16 autocast (``torch.autocast``), as TRL's ``bf16=True``. Allowed on a CUDA device that supports
  bf16 (``torch.cuda.is_bf16_supported()``) and on any CPU (slow on one without native bf16 arithmetic:
  ``cpu_has_native_bf16``); refused elsewhere.
- ``"auto"``: bf16 autocast on a CUDA device that supports bf16, fp32 everywhere else (a CPU included, even one with
  native bf16: there it is slower than fp32 on the bench's model, ``results/bench-ablations``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "check_device",
    "choose_device",
    "init_distributed",
    "bf16_supported",
    "autocast_dtype",
    "resolve_precision",
    "autocast",
    "cpu_has_native_bf16",
]

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_device(name: str) -> None:
    """Refuse a device this machine does not have, before anything loads: one ValueError saying what to pass."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        why = "sees no CUDA device" if torch.backends.cuda.is_built() else "is a build without CUDA"
        raise ValueError(
            f"device 'cuda' is not available: this torch {torch.__version__} {why}; pass --device cpu "
            "(device='cpu') or --device auto"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available on this machine; pass --device cpu (device='cpu') or auto")
    if name == "cuda" and _local_rank() >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {_local_rank()} has no CUDA device (this machine has {torch.cuda.device_count()}): "
            "launch at most that many processes per node"
        )


def choose_device(name: str = "auto") -> torch.device:
    """The device ``name`` (``DEVICES``) means on this machine and in this process (module docstring); a CUDA
    device becomes the current one."""
    check_device(name)
    kind = name
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind != "cuda":
        return torch.device(kind)
    device = torch.device("cuda", _local_rank())
    torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world_size, whether this call initialised the process group): under torchrun (``WORLD_SIZE`` > 1)
    the group is initialised here if it is not yet, NCCL on CUDA, gloo elsewhere; a single process is (0, 1, False)."""
    owns_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    if not dist.is_initialized():
        return 0, 1, owns_group
    return dist.get_rank(), dist.get_world_size(), owns_group


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast may run on ``device``: a CUDA device that supports bf16, or any CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()  # the current device's: choose_device makes it the current one
    return device.type == "cpu"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (module docstring): torch.bfloat16, or None (fp32). bf16
    asked for where it cannot run is a ValueError saying what to pass."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"precision='bf16': {device} has no bf16 support; pass precision='fp32' (--precision fp32)")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and bf16_supported(device)):
        return torch.bfloat16
    return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "fp32" or "bf16": what ``precision`` (``PRECISIONS``) means on ``device``, as a name for configs and reports."""
    return "fp32" if autocast_dtype(precision, device) is None else "bf16"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``dtype``; None: autocast off (fp32), also inside an outer one."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (the avx512_bf16 or amx_bf16 flag in Linux's /proc/cpuinfo); False
    where that cannot be read. Where it does not, bf16 autocast on the CPU is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
