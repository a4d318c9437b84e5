"""The memory autograd keeps for the backward pass, counted exactly (appendix notebook 12).

Between a forward and its backward, autograd holds the tensors each operation saved (its inputs, its output, or
intermediate results). :func:`saved_tensor_bytes` counts them through ``torch.autograd.graph.saved_tensors_hooks``:
every saved tensor's storage once (views of one storage, and a tensor saved by several operations, count once),
the tensors passed as ``exclude`` (a model's weights, which exist anyway) left out. Unlike a peak-RSS or a
wall-clock reading it is a deterministic number, the same on every run and machine for the same graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

__all__ = ["saved_tensor_bytes"]

T = TypeVar("T")


def saved_tensor_bytes(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """Run ``fn()`` and return ``(its value, the bytes of every distinct storage autograd saved for the backward)``,
    the storages of ``exclude`` (e.g. ``model.parameters()``) not counted. The value's graph is kept, so its
    backward can still run."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = fn()
    return value, sum(storages.values())
