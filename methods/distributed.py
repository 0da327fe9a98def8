"""Collectives that keep autograd intact, for losses over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor: (n, ...)` from every rank along dim 0 -> `(world * n, ...)`.

    The backward pass sends each rank the gradient of its own slice summed over all ranks'
    losses, so negatives from other workers train this worker's encoder too (a forward-only
    gather silently drops that gradient; lightly issue #1528). Every rank must pass the same
    shape. A single process returns `tensor` unchanged.
    """
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, without gradient (for statistics such as DINO's center or metrics)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / world_size()
