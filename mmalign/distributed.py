"""Rank/world helpers and gathering with gradient.

Works with any ``torch.distributed`` backend (gloo on CPU, nccl on GPU) and degrades to the identity when no
process group is initialised, so the same loss code runs on one process and on many.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import MMAlignError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def leave_process_group() -> None:
    """Destroy the default process group, if one is up, before the process exits.

    Exiting with it alive can abort at interpreter shutdown while gloo's threads still hold work ("terminate called
    without an active exception", pytorch/pytorch#190489). Call it once the last collective has completed on
    every rank (the training loop ends with one).
    """
    if is_distributed():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    The backward pass sums the incoming gradients over ranks (``torch.distributed.nn.all_gather``), so each rank's
    local features receive the gradient of every rank's local loss: with DDP's gradient averaging this gives the
    gradient of the mean of the local losses, which equals the single-process loss on the concatenated batch.
    Every rank must pass the same shape.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 without gradient (targets, weights, labels)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def sum_over_ranks(values: list[float | torch.Tensor], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums of ``values`` over all ranks (``values`` itself on one process); every rank must call it.

    Entries may be numbers or 0-d tensors on ``device``; the host reads the result once (one host-device sync)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return t.tolist()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by the main process (rank 0) alone; its result, or the ``MMAlignError`` it raised, reaches every
    process (pickled), so a failure the user can fix stops all of them with the same one-line message."""
    if not is_distributed():
        return fn()
    outcome: list = [None]
    if rank() == 0:
        try:
            outcome = [(True, fn())]
        except MMAlignError as e:
            outcome = [(False, e)]
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
