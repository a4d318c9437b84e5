"""Learning-rate schedules shared by the trainer (``dpolab.train``) and the tiny world's pretraining
(``dpolab.tiny``): here so that neither imports the other's module.

warmup_cosine is the seed article's schedule: a linear warm-up to the peak learning rate, then a cosine down to a
floor at the last step.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["warmup_cosine"]


def _lr_factor(i: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step i (0-based): linear warm-up to the peak at step W (1-based),
    then cosine from the peak down to min_ratio at the last step."""
    if i < warmup_steps:
        return (i + 1) / warmup_steps
    peak_at = max(warmup_steps - 1, 0)
    progress = min(1.0, (i - peak_at) / max(1, total_steps - 1 - peak_at))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Optimizer steps t = 1..T: lr * t / W during the warm-up (t <= W), then a cosine from lr at step max(W, 1)
    down to min_lr at step T. The returned LambdaLR is stepped once after each optimizer step."""
    peak = optimizer.param_groups[0]["lr"]
    factor = functools.partial(_lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_lr / peak)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
