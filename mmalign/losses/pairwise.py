"""Pairwise contrastive objectives: CLIP (InfoNCE) and SigLIP (sigmoid).

Pure functions of L2-normalised features. ``logit_scale`` is the multiplier itself (already ``exp()``-ed).
The ``*_rows`` variants compute the loss of a block of query rows against all gallery columns; they are what the
distributed loss modules call with local rows against gathered columns, and ``clip_loss``/``siglip_loss`` are
the same computation with every row local.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(n_rows: int, n_cols: int, row_offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``n_rows x n_cols`` mask, True at (i, row_offset + i): where each local row's positive sits."""
    rows = torch.arange(n_rows, device=device)
    cols = torch.arange(n_cols, device=device)
    return cols[None, :] == (rows[:, None] + row_offset)


def clip_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    row_offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE of rows ``row_offset : row_offset + len(a_rows)`` against all columns.

    L = 1/2 [CE(s A_r B^T, y) + CE(s B_r A^T, y)], y_i = row_offset + i (Radford et al. 2021).
    ``reduction="sum"`` sums the cross-entropies over rows instead of averaging them (for masked distributed use).
    """
    labels = torch.arange(a_rows.shape[0], device=a_rows.device) + row_offset
    logits_ab = logit_scale * a_rows @ b_all.T
    logits_ba = logit_scale * b_rows @ a_all.T
    return 0.5 * (F.cross_entropy(logits_ab, labels, reduction=reduction)
                  + F.cross_entropy(logits_ba, labels, reduction=reduction))


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP loss: mean of CE(a->b) and CE(b->a) over the B x B similarity matrix; equals open_clip ``ClipLoss``."""
    return clip_rows_loss(a, b, a, b, logit_scale)


def siglip_rows_loss(
    a_rows: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    row_offset: int = 0,
) -> torch.Tensor:
    """Sigmoid loss of rows against all columns, normalised by the number of rows.

    z = s A_r B^T + b; y_ij = +1 if j == row_offset + i else -1; L = -sum log sigmoid(y z) / |rows| (Zhai et al. 2023).
    """
    logits = logit_scale * a_rows @ b_all.T + logit_bias
    labels = -torch.ones_like(logits)
    idx = torch.arange(a_rows.shape[0], device=a_rows.device)
    labels[idx, idx + row_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / a_rows.shape[0]


def siglip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, logit_bias: torch.Tensor | float
) -> torch.Tensor:
    """SigLIP loss over the full batch; equals open_clip ``SigLipLoss`` on one process."""
    return siglip_rows_loss(a, b, logit_scale, logit_bias)
