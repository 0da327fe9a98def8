"""Per-iteration schedules: warmup then cosine, as in the SimCLR/MAE/DINO reference code."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, peak: float, end: float = 0.0, warmup_steps: int = 0,
                  start: float = 0.0) -> float:
    """Linear from `start` to `peak` over `warmup_steps`, then cosine from `peak` to `end` at
    `total_steps`. Used for the learning rate (and, with no warmup, for momentum and weight
    decay schedules that go from one value to another)."""
    if warmup_steps > 0 and step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The recipe's learning rate for a global batch: `linear` = base x B/256 (Goyal et al.),
    `sqrt` = base x sqrt(B) (SimCLR appendix B.1 for small batches)."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    raise ValueError(f"optim.lr_scaling={rule!r}: must be 'linear' or 'sqrt'")
