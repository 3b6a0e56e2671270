"""CLIP and SigLIP losses in O(B) memory: the B x B logit matrix is computed block by block and never stored.

Block size. :func:`block_size` picks it from B, D and a memory budget (``block_memory_mb``, default
:data:`DEFAULT_BLOCK_MEMORY_MB`): the whole matrix as one block when it fits, else the largest balanced square blocks
that do. ``chunk_size`` forces a size.

CLIP (softmax cross-entropy). The forward pass computes each block ``z = s A_I B_J^T`` once and reads both
directions from it: one ``exp(z - max z)`` gives the block's row sums (A->B) and column sums (B->A), merged into
running row and column log-sum-exp vectors. With several blocks only those vectors (O(B)) are kept, and the backward
pass recomputes each block and forms dL/dz = w_r (P - T_r) + w_c (Q - T_c) with P = exp(z - lse_row),
Q = exp(z - lse_col) and targets T, then accumulates ``dL/dz @ B_J`` and ``dL/dz^T @ A_I``: 4 GEMMs in all and a
few elementwise passes instead of a dozen passes over B x B tensors. With one block the forward pass forms dL/dz
from the logits it already holds and makes the feature gradients at once: 3 GEMMs, as the plain loss (which open_clip
computes with 6), and the backward pass only scales them.

SigLIP (sigmoid). Its loss has no normalisation across rows, so each block's gradient is known as soon as the block
is computed: the forward pass accumulates the loss and the feature gradients at once (3 GEMMs, no recompute) and
the backward pass only scales them by the incoming gradient.

Targets are seen one block at a time through a small interface (:class:`DiagonalTargets` for the usual one
positive per row); soft targets (CWCL) fit the same core by implementing ``dot`` and ``subtract_`` on dense weight
blocks. The ``*_rows_loss`` forms compute local rows against gathered columns for distributed training, like
:func:`mmalign.losses.pairwise.clip_rows_loss`.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from ..distributed import gather_with_grad, rank, world_size
from ..errors import ConfigError
from .contract import AlignmentOutput
from .objectives import Objective, Scale, SigLipObjective
from .registry import register_loss

# Memory (MiB) the blocks of logits may take beyond the features and their gradients, unless told otherwise. It holds
# the whole matrix as one block up to B ~ 2,300 at D = 512 in float32 (one block is the fastest path: 3 GEMMs), and
# at B = 8,192 keeps the peak under a tenth of the plain loss's (blocks of 2,048).
DEFAULT_BLOCK_MEMORY_MB = 48.0
# The chooser never picks smaller blocks: each block costs a dozen OpenMP parallel regions (CUDA kernel launches),
# which dominate below this size and are slow to start when other processes compete for the cores.
MIN_BLOCK = 256
# softplus(z) is replaced by z above this: log1p(exp(-40)) ~ 4e-18 is below float64 resolution
_SOFTPLUS_THRESHOLD = 40.0
# softplus of a SigLIP block is summed this many rows at a time, so its temporary is a strip, not a second block
_SOFTPLUS_ROWS = 256


def block_size(
    n_rows: int, n_cols: int, dim: int, dtype: torch.dtype = torch.float32,
    memory_mb: float = DEFAULT_BLOCK_MEMORY_MB,
) -> int:
    """Side of the square blocks in which a blockwise loss computes the ``n_rows x n_cols`` logits of D-dim features.

    An r x c block holds ``2 r c + r D`` elements at once: two r x c buffers (the logits and their exponentials or
    gradient) and the block's rows of scaled features. Returns ``max(n_rows, n_cols)`` (one block) when the whole
    matrix fits in ``memory_mb`` MiB; otherwise the largest side that fits, balanced over the longer dimension so
    that the last block is not a sliver, and at least :data:`MIN_BLOCK`.
    """
    budget = memory_mb * 2**20 / (torch.finfo(dtype).bits // 8)
    longer = max(n_rows, n_cols)
    for n_blocks in range(1, longer + 1):
        side = math.ceil(longer / n_blocks)
        r, c = min(side, n_rows), min(side, n_cols)
        if 2 * r * c + r * dim <= budget:
            return side
        if side <= MIN_BLOCK:
            break
    return min(MIN_BLOCK, longer)


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


class _Block(NamedTuple):
    i0: int  # first row (query) of the block
    i1: int
    j0: int  # first column (key) of the block
    j1: int
    q: torch.Tensor  # the block's query rows
    qs: torch.Tensor  # the same rows times the scale
    k: torch.Tensor  # the block's key rows
    views: list[torch.Tensor]  # each buffer seen as a (rows x columns) block


def _block_views(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, chunk: int, *buffers: torch.Tensor):
    """The blocks of z = scale q k^T, row block by row block (q's rows scaled once per row block); ``buffers``
    (each holding at least a full block) are handed out as views of the block's shape."""
    for i0, i1 in _blocks(q.shape[0], chunk):
        q_i = q[i0:i1]
        qs_i = q_i * scale
        for j0, j1 in _blocks(k.shape[0], chunk):
            size = (i1 - i0) * (j1 - j0)
            yield _Block(i0, i1, j0, j1, q_i, qs_i, k[j0:j1], [b[:size].view(i1 - i0, j1 - j0) for b in buffers])


def _underflow_threshold(dtype: torch.dtype) -> float:
    """A block sum of exp(z - block max) below this may have lost relevant terms to underflow: recompute exactly.

    Terms that underflow are < tiny each, so above tiny / eps^2 the relative loss is < n * eps^2.
    """
    info = torch.finfo(dtype)
    return info.tiny / info.eps**2


def _block_lse(
    z: torch.Tensor, e_out: torch.Tensor, qs_i: torch.Tensor, k_j: torch.Tensor, cols: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and, if ``cols``, column) log-sum-exp of the block z = qs_i k_j^T, its exponentials written to ``e_out``
    (which may be z itself).

    One exp per element serves both directions: the block is shifted by its scalar max; rows or columns whose
    shifted sum is too small to be accurate (their own max is far below the block's) are recomputed exactly.
    """
    tiny = _underflow_threshold(z.dtype)
    m = z.max()
    e = torch.sub(z, m, out=e_out).exp_()

    def log_sum(part: torch.Tensor, exact) -> torch.Tensor:
        bad = part < tiny
        part = part.log_().add_(m)
        if bad.any():
            part[bad] = exact(bad)
        return part

    row = log_sum(e.sum(1), lambda bad: torch.logsumexp(qs_i[bad] @ k_j.T, 1))
    col = log_sum(e.sum(0), lambda bad: torch.logsumexp(qs_i @ k_j[bad].T, 0)) if cols else None
    return row, col


def _block_grad(
    z: torch.Tensor, g_out: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor | None, col_ratio: float,
    targets: BlockTargets, i0: int, j0: int,
) -> torch.Tensor:
    """G = (P - T_r) + col_ratio (Q - T_c) over the block of logits z at (i0, j0), written to ``g_out`` (z is
    overwritten); ``row_lse`` and ``col_lse`` are the block's slices of the full log-sum-exp vectors."""
    g = torch.sub(z, row_lse[:, None], out=g_out).exp_()
    if col_lse is not None:
        g.add_(z.sub_(col_lse[None, :]).exp_(), alpha=col_ratio)
    targets.subtract_(g, i0, j0, 1.0, col_ratio if col_lse is not None else 0.0)
    return g


def _softmax_stats(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: BlockTargets, chunk: int, cols: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Row (and, if ``cols``, column) log-sum-exp of z = scale q k^T and the targets' dot products, blockwise."""
    n_rows, n_cols = q.shape[0], k.shape[0]
    row_lse = torch.full((n_rows,), float("-inf"), dtype=q.dtype, device=q.device)
    col_lse = torch.full((n_cols,), float("-inf"), dtype=q.dtype, device=q.device) if cols else None
    t_row = q.new_zeros(())
    t_col = q.new_zeros(())
    buf = q.new_empty(min(chunk, n_rows) * min(chunk, n_cols))
    for b in _block_views(q, k, scale, chunk, buf):
        z = torch.mm(b.qs, b.k.T, out=b.views[0])
        t = targets.dot(z, b.i0, b.j0)
        if t is not None:
            t_row += t[0]
            t_col += t[1]
        row, col = _block_lse(z, z, b.qs, b.k, cols)
        torch.logaddexp(row_lse[b.i0:b.i1], row, out=row_lse[b.i0:b.i1])
        if cols:
            torch.logaddexp(col_lse[b.j0:b.j1], col, out=col_lse[b.j0:b.j1])
    return row_lse, col_lse, t_row, t_col


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` for the first term of a blockwise sum (no zero fill), ``out += a @ b`` for the others."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


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
    grad_q = torch.empty_like(q)
    grad_k = torch.empty_like(k)
    size = min(chunk, n_rows) * min(chunk, n_cols)
    for b in _block_views(q, k, scale, chunk, q.new_empty(size), q.new_empty(size)):
        z = torch.mm(b.qs, b.k.T, out=b.views[0])
        g = _block_grad(z, b.views[1], row_lse[b.i0:b.i1], None if col_lse is None else col_lse[b.j0:b.j1],
                        col_ratio, targets, b.i0, b.j0)
        _accumulate_mm(grad_q[b.i0:b.i1], g, b.k, first=b.j0 == 0)
        _accumulate_mm(grad_k[b.j0:b.j1], g.T, b.q, first=b.i0 == 0)
    return grad_q, grad_k


def _softmax_one_block(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: BlockTargets, cols: bool, col_ratio: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole logit matrix as one block: :func:`_softmax_stats` and :func:`_softmax_grads` from one product of
    logits (3 GEMMs in all); returns (row_lse, col_lse, t_row, t_col, G @ k, G^T @ q)."""
    qs = q * scale
    z = qs @ k.T
    t_row, t_col = targets.dot(z, 0, 0) or (q.new_zeros(()), q.new_zeros(()))
    scratch = torch.empty_like(z)
    row_lse, col_lse = _block_lse(z, scratch, qs, k, cols)
    g = _block_grad(z, scratch, row_lse, col_lse, col_ratio, targets, 0, 0)
    return row_lse, col_lse, t_row, t_col, g @ k, g.T @ q


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _as_scalar(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.tensor(float(x), dtype=like.dtype, device=like.device)


def _wants_grads(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


def _feature_grads(ctx, coef: torch.Tensor, q: torch.Tensor, s: torch.Tensor, g_q: torch.Tensor, g_k: torch.Tensor,
                   in_place: bool) -> list[torch.Tensor | None]:
    """[dL/dq, dL/dk, dL/ds] (None where not needed) from G @ k and G^T @ q, with dL/dz = coef * G and z = s q k^T.

    dL/dq = coef s G k, dL/dk = coef s G^T q, dL/ds = sum_ij dL/dz_ij (q_i . k_j) = coef sum_i q_i . (G k)_i.
    ``in_place``: g_q and g_k were made for this call and become the gradients (no copy); saved ones are kept
    intact, so that a graph retained with ``retain_graph`` can be differentiated again. ``ctx.in_dtypes`` and
    ``ctx.scale_shape`` give the inputs' dtypes and the scale's shape.
    """
    need = ctx.needs_input_grad
    grad_s = None
    if need[2]:
        grad_s = (coef * torch.dot(q.reshape(-1), g_q.reshape(-1))).reshape(ctx.scale_shape).to(ctx.in_dtypes[2])
    factor = coef * s
    grad_q = (g_q.mul_(factor) if in_place else g_q * factor).to(ctx.in_dtypes[0]) if need[0] else None
    grad_k = (g_k.mul_(factor) if in_place else g_k * factor).to(ctx.in_dtypes[1]) if need[1] else None
    return [grad_q, grad_k, grad_s]


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Cross-entropy of s q k^T against ``targets``: rows only (mean over rows) or symmetric (mean of both).

    With one block and gradients wanted, the feature gradients are made in forward (3 GEMMs); otherwise forward
    keeps the log-sum-exp vectors and backward recomputes each block (4 GEMMs).
    """

    @staticmethod
    def forward(ctx, q, k, logit_scale, targets, symmetric, chunk, want_grads):
        dtype = _compute_dtype(q)
        s = logit_scale.detach().to(dtype).reshape(())
        q32, k32 = q.detach().to(dtype), k.detach().to(dtype)
        n_rows, n_cols = q.shape[0], k.shape[0]
        col_ratio = n_rows / n_cols
        ctx.grads_made = want_grads and chunk >= max(n_rows, n_cols)
        if ctx.grads_made:
            row_lse, col_lse, t_row, t_col, g_q, g_k = _softmax_one_block(q32, k32, s, targets, symmetric, col_ratio)
            ctx.save_for_backward(q32, s, g_q, g_k)
        else:
            row_lse, col_lse, t_row, t_col = _softmax_stats(q32, k32, s, targets, chunk, cols=symmetric)
            ctx.save_for_backward(q32, k32, s, row_lse, col_lse)
        if symmetric:
            loss = 0.5 * ((row_lse.sum() - t_row) / n_rows + (col_lse.sum() - t_col) / n_cols)
        else:
            loss = (row_lse.sum() - t_row) / n_rows
        ctx.targets, ctx.symmetric, ctx.chunk, ctx.col_ratio = targets, symmetric, chunk, col_ratio
        ctx.scale_shape, ctx.in_dtypes = logit_scale.shape, (q.dtype, k.dtype, logit_scale.dtype)
        return loss.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads_made:
            q, s, g_q, g_k = ctx.saved_tensors
        else:
            q, k, s, row_lse, col_lse = ctx.saved_tensors
            g_q, g_k = _softmax_grads(q, k, s, row_lse, col_lse, ctx.col_ratio, ctx.targets, ctx.chunk)
        # dL/dz = w_r (P - T_r) + w_c (Q - T_c) = w_r G with w_c / w_r = col_ratio
        w_r = 0.5 / q.shape[0] if ctx.symmetric else 1.0 / q.shape[0]
        grads = _feature_grads(ctx, grad_out.to(q.dtype) * w_r, q, s, g_q, g_k, in_place=not ctx.grads_made)
        return (*grads, None, None, None, None)


def _sigmoid_block(
    z: torch.Tensor, targets: BlockTargets, i0: int, j0: int, want_grads: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's share of the sigmoid loss, sum [softplus(z) - T z], and its dL/dz = sigmoid(z) - T (made in z's
    memory, so z is consumed) when ``want_grads``."""
    loss = sum(F.softplus(strip, threshold=_SOFTPLUS_THRESHOLD).sum() for strip in z.split(_SOFTPLUS_ROWS))
    t = targets.dot(z, i0, j0)
    if t is not None:
        loss = loss - t[0]
    if not want_grads:
        return loss, None
    g = z.sigmoid_()
    targets.subtract_(g, i0, j0, 1.0, 0.0)
    return loss, g


class _ChunkedSigmoid(torch.autograd.Function):
    """Sigmoid loss sum_ij [softplus(z_ij) - T_ij z_ij] / rows with z = s q k^T + bias; gradients made in forward."""

    @staticmethod
    def forward(ctx, q, k, logit_scale, logit_bias, targets, chunk, want_grads):
        dtype = _compute_dtype(q)
        s = logit_scale.detach().to(dtype).reshape(())
        bias = logit_bias.detach().to(dtype).reshape(())
        q32, k32 = q.detach().to(dtype), k.detach().to(dtype)
        n_rows, n_cols = q.shape[0], k.shape[0]
        if n_rows <= chunk and n_cols <= chunk:  # one block: its results are the totals (no buffers, no running sums)
            # s scales the smaller of z (rows x cols) and q (rows x D)
            z = torch.mm(q32, k32.T).mul_(s).add_(bias) if n_cols < q.shape[1] else torch.addmm(bias, q32 * s, k32.T)
            total, g = _sigmoid_block(z, targets, 0, 0, want_grads)
            if want_grads:
                g_q, g_k, g_bias = g @ k32, g.T @ q32, g.sum()
        else:
            total = q32.new_zeros(())
            if want_grads:
                g_q, g_k, g_bias = torch.empty_like(q32), torch.empty_like(k32), q32.new_zeros(())
            buf = q32.new_empty(min(chunk, n_rows) * min(chunk, n_cols))
            for b in _block_views(q32, k32, s, chunk, buf):
                z = torch.addmm(bias, b.qs, b.k.T, out=b.views[0])
                part, g = _sigmoid_block(z, targets, b.i0, b.j0, want_grads)
                total += part
                if want_grads:
                    g_bias += g.sum()
                    _accumulate_mm(g_q[b.i0:b.i1], g, b.k, first=b.j0 == 0)
                    _accumulate_mm(g_k[b.j0:b.j1], g.T, b.q, first=b.i0 == 0)
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
        grad_bias = (g_bias * coef).reshape(ctx.bias_shape).to(ctx.in_dtypes[3]) if ctx.needs_input_grad[3] else None
        return (*_feature_grads(ctx, coef, q, s, g_q, g_k, in_place=False), grad_bias, None, None, None)


def block_options(chunk_size: int | None, block_memory_mb: float) -> dict:
    """The blockwise losses' keyword arguments, checked (the objectives check them when a recipe is built)."""
    if chunk_size is not None and int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if float(block_memory_mb) <= 0:
        raise ConfigError(f"block_memory_mb must be positive, got {block_memory_mb}")
    return {"chunk_size": None if chunk_size is None else int(chunk_size), "block_memory_mb": float(block_memory_mb)}


def _chunk(q: torch.Tensor, k: torch.Tensor, chunk_size: int | None, block_memory_mb: float) -> int:
    """``chunk_size`` if given, else :func:`block_size` for q's rows against k's."""
    opts = block_options(chunk_size, block_memory_mb)
    if opts["chunk_size"] is not None:
        return opts["chunk_size"]
    return block_size(q.shape[0], k.shape[0], q.shape[1], _compute_dtype(q), opts["block_memory_mb"])


def chunked_clip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor | float,
    chunk_size: int | None = None,
    block_memory_mb: float = DEFAULT_BLOCK_MEMORY_MB,
) -> torch.Tensor:
    """CLIP loss with the same value and gradients as :func:`clip_loss`, in O(B * D + chunk_size^2) memory.

    Blocks of ``chunk_size`` (default: :func:`block_size` within ``block_memory_mb`` MiB); each is computed once in
    forward (both directions) and, with several blocks, once more in backward.
    """
    s = _as_scalar(logit_scale, a)
    chunk = _chunk(a, b, chunk_size, block_memory_mb)
    return _ChunkedSoftmaxCE.apply(a, b, s, DiagonalTargets(0), True, chunk, _wants_grads(a, b, s))


def chunked_clip_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    row_offset: int = 0,
    chunk_size: int | None = None,
    block_memory_mb: float = DEFAULT_BLOCK_MEMORY_MB,
) -> torch.Tensor:
    """Blockwise :func:`clip_rows_loss`: rows ``row_offset : row_offset + len(a_rows)`` against all columns."""
    s = _as_scalar(logit_scale, a_rows)
    targets = DiagonalTargets(row_offset)
    chunk = _chunk(a_rows, b_all, chunk_size, block_memory_mb)
    loss_ab = _ChunkedSoftmaxCE.apply(a_rows, b_all, s, targets, False, chunk, _wants_grads(a_rows, b_all, s))
    loss_ba = _ChunkedSoftmaxCE.apply(b_rows, a_all, s, targets, False, chunk, _wants_grads(b_rows, a_all, s))
    return 0.5 * (loss_ab + loss_ba)


def chunked_siglip_rows_loss(
    a_rows: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    row_offset: int = 0,
    chunk_size: int | None = None,
    block_memory_mb: float = DEFAULT_BLOCK_MEMORY_MB,
) -> torch.Tensor:
    """Blockwise :func:`siglip_rows_loss` (same value and gradients, O(B * D + chunk_size^2) memory)."""
    s, bias = _as_scalar(logit_scale, a_rows), _as_scalar(logit_bias, a_rows)
    chunk = _chunk(a_rows, b_all, chunk_size, block_memory_mb)
    return _ChunkedSigmoid.apply(
        a_rows, b_all, s, bias, DiagonalTargets(row_offset), chunk, _wants_grads(a_rows, b_all, s, bias)
    )


def chunked_siglip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    chunk_size: int | None = None,
    block_memory_mb: float = DEFAULT_BLOCK_MEMORY_MB,
) -> torch.Tensor:
    """SigLIP loss with the same value and gradients as :func:`siglip_loss`, blockwise (3 GEMMs, no recompute)."""
    return chunked_siglip_rows_loss(a, b, logit_scale, logit_bias, 0, chunk_size, block_memory_mb)


@register_loss("chunked_clip")
class ChunkedClipObjective(Objective):
    """:class:`ClipObjective` computed blockwise: same value and gradients, logits never stored (large batches).

    On one process both directions come from one sweep over the blocks; under ``torch.distributed`` each rank
    computes its own rows against the gathered columns, in each direction. ``chunk_size`` forces the block size;
    by default it is chosen per call within ``block_memory_mb`` MiB (:func:`block_size`).
    """

    def __init__(
        self, modalities: list[str], chunk_size: int | None = None, block_memory_mb: float = DEFAULT_BLOCK_MEMORY_MB
    ):
        super().__init__(modalities)
        self.blocks = block_options(chunk_size, block_memory_mb)

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        embeddings = output.embeddings
        out: dict[str, torch.Tensor] = {}
        if world_size() == 1:
            for m1, m2 in combinations(self.modalities, 2):
                out[f"loss_{m1}_{m2}"] = chunked_clip_loss(embeddings[m1], embeddings[m2], logit_scale, **self.blocks)
        else:
            gathered = {m: gather_with_grad(embeddings[m]) for m in self.modalities}
            offset = rank() * embeddings[self.modalities[0]].shape[0]
            for m1, m2 in combinations(self.modalities, 2):
                out[f"loss_{m1}_{m2}"] = chunked_clip_rows_loss(
                    embeddings[m1], embeddings[m2], gathered[m1], gathered[m2], logit_scale, offset, **self.blocks
                )
        out["loss"] = torch.stack(list(out.values())).mean()
        return out


@register_loss("chunked_siglip")
class ChunkedSigLipObjective(SigLipObjective):
    """:class:`SigLipObjective` computed blockwise (local rows against gathered columns under distributed)."""

    def __init__(
        self, modalities: list[str], chunk_size: int | None = None, block_memory_mb: float = DEFAULT_BLOCK_MEMORY_MB
    ):
        super().__init__(modalities)
        self.blocks = block_options(chunk_size, block_memory_mb)

    def rows_loss(self, a_rows, b_all, logit_scale, logit_bias, row_offset) -> torch.Tensor:
        return chunked_siglip_rows_loss(a_rows, b_all, logit_scale, logit_bias, row_offset, **self.blocks)
