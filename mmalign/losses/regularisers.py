"""Alignment and uniformity (Wang & Isola 2020): regularisers added to contrastive objectives, and diagnostics of
an embedding space (see :mod:`mmalign.eval.diagnostics`)."""
from __future__ import annotations

import math

import torch

from ..distributed import gather_with_grad
from .pairwise import positive_mask


def alignment_loss(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Alignment: mean_i ||a_i - b_i||^alpha over paired rows (``reduction="sum"``: the sum, for masked
    distributed use). A mean over rows, so the distributed value is the mean of the local ones (no gathering)."""
    distances = (a - b).norm(dim=-1).pow(alpha)
    return distances.sum() if reduction == "sum" else distances.mean()


def uniformity_rows_lse(
    x_rows: torch.Tensor, x_all: torch.Tensor, t: float = 2.0, row_offset: int = 0
) -> torch.Tensor:
    """log sum_{i in rows, j != i} exp(-t ||x_i - x_j||^2): the local part of the uniformity sum, as a log-sum-exp.

    Squared distances come from the Gram form (no sqrt, so identical points have a finite gradient). The global
    uniformity is ``logsumexp`` of these parts over row blocks minus log(N (N - 1)).
    """
    sq = (x_rows.pow(2).sum(-1)[:, None] + x_all.pow(2).sum(-1)[None, :] - 2 * x_rows @ x_all.T).clamp_min(0.0)
    off_diagonal = (-t * sq).masked_fill(positive_mask(*sq.shape, row_offset, device=sq.device), float("-inf"))
    return torch.logsumexp(off_diagonal.flatten(), dim=0)


def uniformity_loss(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Uniformity: log mean_{i != j} exp(-t ||x_i - x_j||^2), for one modality's features."""
    n = x.shape[0]
    return uniformity_rows_lse(x, x, t) - math.log(n * (n - 1))


def distributed_uniformity(x_rows: torch.Tensor, x_all: torch.Tensor, row_offset: int, t: float = 2.0) -> torch.Tensor:
    """Uniformity of the features of all ranks ``x_all`` (gathered with gradient), from this rank's rows ``x_rows``
    (at ``row_offset`` among them).

    Every rank returns the global value; its gradient flows through the gathered columns and through the gathered
    per-rank log-sum-exps, so the gradient semantics match the other distributed losses. On one process with
    ``x_rows`` = ``x_all`` it is :func:`uniformity_loss`.
    """
    local = uniformity_rows_lse(x_rows, x_all, t, row_offset)
    n = x_all.shape[0]
    return torch.logsumexp(gather_with_grad(local.reshape(1)), dim=0) - math.log(n * (n - 1))
