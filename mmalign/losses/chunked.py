"""CLIP and SigLIP losses in O(B) memory: the B x B logit matrix is computed block by block and never stored.

CLIP (softmax cross-entropy). The forward pass computes each block ``z = s A_I B_J^T`` once and reads both
directions from it: one ``exp(z - max z)`` gives the block's row sums (A->B) and column sums (B->A), merged into
running row and column log-sum-exp vectors. Only those vectors (O(B)) are kept. The backward pass recomputes each
block and forms dL/dz = w_r (P - T_r) + w_c (Q - T_c) with P = exp(z - lse_row), Q = exp(z - lse_col) and targets T,
then accumulates ``dL/dz @ B_J`` and ``dL/dz^T @ A_I``: 4 GEMMs in all (the plain loss does 3) and a few
cache-resident elementwise passes instead of a dozen passes over B x B tensors.

SigLIP (sigmoid). Its loss has no normalisation across rows, so each block's gradient is known as soon as the block
is computed: the forward pass accumulates the loss and the feature gradients at once (3 GEMMs, no recompute) and
the backward pass only scales them by the incoming gradient.

Targets are seen one block at a time through a small interface (:class:`DiagonalTargets` for the usual one
positive per row); soft targets (CWCL) fit the same core by implementing ``dot`` and ``subtract_`` on dense weight
blocks. The ``*_rows_loss`` forms compute local rows against gathered columns for distributed training, like
:func:`mmalign.losses.pairwise.clip_rows_loss`.
"""
from __future__ import annotations

from itertools import combinations
from typing import Protocol

import torch
import torch.nn.functional as F

from ..distributed import gather_with_grad, rank, world_size
from .contract import AlignmentOutput
from .objectives import Objective, Scale, SigLipObjective
from .registry import register_loss

# Blocks of 4096 x 4096 (64 MB in float32, two live in backward): on 2 CPU cores smaller blocks were no faster
# single-threaded (the GEMMs dominate) and much slower when other processes compete for the cores, since every
# block costs a dozen OpenMP parallel regions. Pass a smaller chunk_size to trade speed for memory.
DEFAULT_CHUNK = 4096
# softplus(z) is replaced by z above this: log1p(exp(-40)) ~ 4e-18 is below float64 resolution
_SOFTPLUS_THRESHOLD = 40.0


class BlockTargets(Protocol):
    """Targets of a blockwise loss over the logit matrix z (queries x keys), seen one block at a time.

    A soft-target loss (CWCL) implements the same two methods with dense blocks of its row-normalised weights
    (rows direction) and column-normalised weights (columns direction).
    """

    def dot(self, z: torch.Tensor, i0: int, j0: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum_ij T_r[i, j] z_ij, sum_ij T_c[i, j] z_ij) over the block at (i0, j0), or None if it has no targets."""

    def subtract_(self, g: torch.Tensor, i0: int, j0: int, row_coef: float, col_coef: float) -> None:
        """In place: g -= row_coef * T_r + col_coef * T_c over the block at (i0, j0)."""


class DiagonalTargets:
    """Hard targets: query row i's positive is key column ``i + offset`` (the same in both directions)."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def _diagonal(self, block: torch.Tensor, i0: int, j0: int) -> torch.Tensor | None:
        k = i0 + self.offset - j0  # block[r, r + k] is global (i0 + r, i0 + r + offset)
        if k >= block.shape[1] or -k >= block.shape[0]:
            return None
        return block.diagonal(k)

    def dot(self, z: torch.Tensor, i0: int, j0: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        d = self._diagonal(z, i0, j0)
        if d is None:
            return None
        s = d.sum()
        return s, s

    def subtract_(self, g: torch.Tensor, i0: int, j0: int, row_coef: float, col_coef: float) -> None:
        d = self._diagonal(g, i0, j0)
        if d is not None:
            d.sub_(row_coef + col_coef)


def _blocks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _underflow_threshold(dtype: torch.dtype) -> float:
    """A block sum of exp(z - block max) below this may have lost relevant terms to underflow: recompute exactly.

    Terms that underflow are < tiny each, so above tiny / eps^2 the relative loss is < n * eps^2.
    """
    info = torch.finfo(dtype)
    return info.tiny / info.eps**2


def _softmax_stats(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: BlockTargets, chunk: int, cols: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Row (and, if ``cols``, column) log-sum-exp of z = scale q k^T and the targets' dot products, blockwise.

    One exp per element serves both directions: the block is shifted by its scalar max; rows or columns whose
    shifted sum is too small to be accurate (their own max is far below the block's) are recomputed exactly.
    """
    n_rows, n_cols = q.shape[0], k.shape[0]
    row_lse = torch.full((n_rows,), float("-inf"), dtype=q.dtype, device=q.device)
    col_lse = torch.full((n_cols,), float("-inf"), dtype=q.dtype, device=q.device) if cols else None
    t_row = q.new_zeros(())
    t_col = q.new_zeros(())
    buf = q.new_empty(min(chunk, n_rows) * min(chunk, n_cols))
    tiny = _underflow_threshold(q.dtype)
    for i0, i1 in _blocks(n_rows, chunk):
        q_i = q[i0:i1] * scale
        for j0, j1 in _blocks(n_cols, chunk):
            k_j = k[j0:j1]
            z = torch.mm(q_i, k_j.T, out=buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0))
            t = targets.dot(z, i0, j0)
            if t is not None:
                t_row += t[0]
                t_col += t[1]
            m = z.max()
            e = z.sub_(m).exp_()
            part = e.sum(1)
            bad = part < tiny
            part = part.log_().add_(m)
            if bad.any():
                part[bad] = torch.logsumexp(q_i[bad] @ k_j.T, 1)
            torch.logaddexp(row_lse[i0:i1], part, out=row_lse[i0:i1])
            if cols:
                part = e.sum(0)
                bad = part < tiny
                part = part.log_().add_(m)
                if bad.any():
                    part[bad] = torch.logsumexp(q_i @ k_j[bad].T, 0)
                torch.logaddexp(col_lse[j0:j1], part, out=col_lse[j0:j1])
    return row_lse, col_lse, t_row, t_col


def _softmax_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor | None,
    col_ratio: float,
    targets: BlockTargets,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G @ k, G^T @ q) for G = (P - T_r) + col_ratio (Q - T_c), recomputing each block of z = scale q k^T."""
    n_rows, n_cols = q.shape[0], k.shape[0]
    grad_q = torch.zeros_like(q)
    grad_k = torch.zeros_like(k)
    size = min(chunk, n_rows) * min(chunk, n_cols)
    buf_z, buf_p = q.new_empty(size), q.new_empty(size)
    for i0, i1 in _blocks(n_rows, chunk):
        q_i = q[i0:i1]
        qs_i = q_i * scale
        lse_i = row_lse[i0:i1, None]
        for j0, j1 in _blocks(n_cols, chunk):
            k_j = k[j0:j1]
            shape = (i1 - i0, j1 - j0)
            z = torch.mm(qs_i, k_j.T, out=buf_z[: shape[0] * shape[1]].view(shape))
            g = torch.sub(z, lse_i, out=buf_p[: shape[0] * shape[1]].view(shape)).exp_()
            if col_lse is not None:
                g.add_(z.sub_(col_lse[None, j0:j1]).exp_(), alpha=col_ratio)
            targets.subtract_(g, i0, j0, 1.0, col_ratio if col_lse is not None else 0.0)
            grad_q[i0:i1].addmm_(g, k_j)
            grad_k[j0:j1].addmm_(g.T, q_i)
    return grad_q, grad_k


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _as_scalar(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.tensor(float(x), dtype=like.dtype, device=like.device)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Cross-entropy of s q k^T against ``targets``: rows only (mean over rows) or symmetric (mean of both)."""

    @staticmethod
    def forward(ctx, q, k, logit_scale, targets, symmetric, chunk):
        dtype = _compute_dtype(q)
        s = logit_scale.detach().to(dtype).reshape(())
        q32, k32 = q.detach().to(dtype), k.detach().to(dtype)
        row_lse, col_lse, t_row, t_col = _softmax_stats(q32, k32, s, targets, chunk, cols=symmetric)
        n_rows, n_cols = q.shape[0], k.shape[0]
        if symmetric:
            loss = 0.5 * ((row_lse.sum() - t_row) / n_rows + (col_lse.sum() - t_col) / n_cols)
        else:
            loss = (row_lse.sum() - t_row) / n_rows
        ctx.save_for_backward(q32, k32, s, row_lse, col_lse if symmetric else None)
        ctx.targets, ctx.symmetric, ctx.chunk = targets, symmetric, chunk
        ctx.scale_shape, ctx.in_dtypes = logit_scale.shape, (q.dtype, k.dtype, logit_scale.dtype)
        return loss.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, s, row_lse, col_lse = ctx.saved_tensors
        n_rows, n_cols = q.shape[0], k.shape[0]
        # dL/dz = w_r (P - T_r) + w_c (Q - T_c); w_r is factored out of the blockwise sums
        w_r = 0.5 / n_rows if ctx.symmetric else 1.0 / n_rows
        col_ratio = n_rows / n_cols
        # g_q = G @ k and g_k = G^T @ q (unscaled q), with dL/dz = coef * G
        g_q, g_k = _softmax_grads(q, k, s, row_lse, col_lse, col_ratio, ctx.targets, ctx.chunk)
        coef = grad_out.to(q.dtype) * w_r
        grad_s = None
        if ctx.needs_input_grad[2]:
            # dL/ds = sum_ij dL/dz_ij (q_i . k_j) = coef * sum_i q_i . (G k)_i
            grad_s = (coef * torch.dot(q.reshape(-1), g_q.reshape(-1))).reshape(ctx.scale_shape).to(ctx.in_dtypes[2])
        grad_q = g_q.mul_(coef * s).to(ctx.in_dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_k = g_k.mul_(coef * s).to(ctx.in_dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_s, None, None, None


class _ChunkedSigmoid(torch.autograd.Function):
    """Sigmoid loss sum_ij [softplus(z_ij) - T_ij z_ij] / rows with z = s q k^T + bias; gradients made in forward."""

    @staticmethod
    def forward(ctx, q, k, logit_scale, logit_bias, targets, chunk, want_grads):
        dtype = _compute_dtype(q)
        s = logit_scale.detach().to(dtype).reshape(())
        bias = logit_bias.detach().to(dtype).reshape(())
        q32, k32 = q.detach().to(dtype), k.detach().to(dtype)
        n_rows, n_cols = q.shape[0], k.shape[0]
        total = q32.new_zeros(())
        if want_grads:
            g_q, g_k, g_bias = torch.zeros_like(q32), torch.zeros_like(k32), q32.new_zeros(())
        buf = q32.new_empty(min(chunk, n_rows) * min(chunk, n_cols))
        for i0, i1 in _blocks(n_rows, chunk):
            q_i = q32[i0:i1]
            qs_i = q_i * s
            for j0, j1 in _blocks(n_cols, chunk):
                k_j = k32[j0:j1]
                shape = (i1 - i0, j1 - j0)
                z = torch.mm(qs_i, k_j.T, out=buf[: shape[0] * shape[1]].view(shape)).add_(bias)
                t = targets.dot(z, i0, j0)
                if t is not None:
                    total -= t[0]
                total += F.softplus(z, threshold=_SOFTPLUS_THRESHOLD).sum()
                if want_grads:
                    g = z.sigmoid_()
                    targets.subtract_(g, i0, j0, 1.0, 0.0)
                    g_bias += g.sum()
                    g_q[i0:i1].addmm_(g, k_j)
                    g_k[j0:j1].addmm_(g.T, q_i)
        if want_grads:
            ctx.save_for_backward(q32, s, g_q, g_k, g_bias)
        ctx.n_rows, ctx.scale_shape, ctx.bias_shape = n_rows, logit_scale.shape, logit_bias.shape
        ctx.in_dtypes = (q.dtype, k.dtype, logit_scale.dtype, logit_bias.dtype)
        ctx.want_grads = want_grads
        return (total / n_rows).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.want_grads:
            raise RuntimeError("chunked_siglip_loss was called without gradients enabled; cannot backpropagate")
        # g_q = G @ k, g_k = G^T @ q (unscaled q), g_bias = sum G, with dL/dz = G / rows
        q, s, g_q, g_k, g_bias = ctx.saved_tensors
        coef = grad_out.to(q.dtype) / ctx.n_rows
        grads = [None] * 7
        if ctx.needs_input_grad[2]:
            grads[2] = (coef * torch.dot(q.reshape(-1), g_q.reshape(-1))).reshape(ctx.scale_shape)
            grads[2] = grads[2].to(ctx.in_dtypes[2])
        if ctx.needs_input_grad[0]:
            grads[0] = (g_q * (coef * s)).to(ctx.in_dtypes[0])
        if ctx.needs_input_grad[1]:
            grads[1] = (g_k * (coef * s)).to(ctx.in_dtypes[1])
        if ctx.needs_input_grad[3]:
            grads[3] = (g_bias * coef).reshape(ctx.bias_shape).to(ctx.in_dtypes[3])
        return tuple(grads)


def chunked_clip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """CLIP loss with the same value and gradients as :func:`clip_loss`, in O(B * D + chunk_size^2) memory.

    Each chunk_size x chunk_size block of logits is computed once in forward (both directions) and once in backward.
    """
    return _ChunkedSoftmaxCE.apply(a, b, _as_scalar(logit_scale, a), DiagonalTargets(0), True, chunk_size)


def chunked_clip_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    row_offset: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Blockwise :func:`clip_rows_loss`: rows ``row_offset : row_offset + len(a_rows)`` against all columns."""
    s = _as_scalar(logit_scale, a_rows)
    targets = DiagonalTargets(row_offset)
    loss_ab = _ChunkedSoftmaxCE.apply(a_rows, b_all, s, targets, False, chunk_size)
    loss_ba = _ChunkedSoftmaxCE.apply(b_rows, a_all, s, targets, False, chunk_size)
    return 0.5 * (loss_ab + loss_ba)


def chunked_siglip_rows_loss(
    a_rows: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    row_offset: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Blockwise :func:`siglip_rows_loss` (same value and gradients, O(B * D + chunk_size^2) memory)."""
    s, bias = _as_scalar(logit_scale, a_rows), _as_scalar(logit_bias, a_rows)
    want_grads = torch.is_grad_enabled() and any(
        x.requires_grad for x in (a_rows, b_all, s, bias)
    )
    return _ChunkedSigmoid.apply(a_rows, b_all, s, bias, DiagonalTargets(row_offset), chunk_size, want_grads)


def chunked_siglip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """SigLIP loss with the same value and gradients as :func:`siglip_loss`, blockwise (3 GEMMs, no recompute)."""
    return chunked_siglip_rows_loss(a, b, logit_scale, logit_bias, 0, chunk_size)


@register_loss("chunked_clip")
class ChunkedClipObjective(Objective):
    """:class:`ClipObjective` computed blockwise: same value and gradients, logits never stored (large batches).

    On one process both directions come from one sweep over the blocks; under ``torch.distributed`` each rank
    computes its own rows against the gathered columns, in each direction.
    """

    def __init__(self, modalities: list[str], chunk_size: int = DEFAULT_CHUNK):
        super().__init__(modalities)
        self.chunk_size = int(chunk_size)

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        embeddings = output.embeddings
        out: dict[str, torch.Tensor] = {}
        if world_size() == 1:
            for m1, m2 in combinations(self.modalities, 2):
                out[f"loss_{m1}_{m2}"] = chunked_clip_loss(embeddings[m1], embeddings[m2], logit_scale, self.chunk_size)
        else:
            gathered = {m: gather_with_grad(embeddings[m]) for m in self.modalities}
            offset = rank() * embeddings[self.modalities[0]].shape[0]
            for m1, m2 in combinations(self.modalities, 2):
                out[f"loss_{m1}_{m2}"] = chunked_clip_rows_loss(
                    embeddings[m1], embeddings[m2], gathered[m1], gathered[m2], logit_scale, offset, self.chunk_size
                )
        out["loss"] = torch.stack(list(out.values())).mean()
        return out


@register_loss("chunked_siglip")
class ChunkedSigLipObjective(SigLipObjective):
    """:class:`SigLipObjective` computed blockwise (local rows against gathered columns under distributed)."""

    def __init__(self, modalities: list[str], chunk_size: int = DEFAULT_CHUNK):
        super().__init__(modalities)
        self.chunk_size = int(chunk_size)

    def rows_loss(self, a_rows, b_all, logit_scale, logit_bias, row_offset) -> torch.Tensor:
        return chunked_siglip_rows_loss(a_rows, b_all, logit_scale, logit_bias, row_offset, self.chunk_size)
