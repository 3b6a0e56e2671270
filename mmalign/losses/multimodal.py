"""Objectives for three and more modalities: Symile (total correlation) and GRAM (Gram volume).

Pure functions of L2-normalised features; ``logit_scale`` is the multiplier itself (already ``exp()``-ed).
As in ``pairwise.py``, the ``*_rows_loss`` variants compute the loss of a block of local rows against all
(gathered) columns, and ``symile_loss``/``gram_loss`` are the same computation with every row local.

- Symile: Saporta et al., "Contrasting with Symile: Simple Model-Agnostic Representation Learning for Unlimited
  Modalities", NeurIPS 2024. Score = multilinear inner product MIP(x, y, z, ...) = sum_d x_d y_d z_d ...
- GRAM: Cicchetti et al., "Gramian Multimodal Representation Learning and Alignment", ICLR 2025.
  Score = -volume of the parallelotope spanned by (anchor_i, others_j...), V = sqrt(det(X X^T)).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..distributed import gather_with_grad, world_size
from ..errors import ConfigError
from .contract import AlignmentOutput, Requirements
from .objectives import PresenceObjective, Rows, Scale
from .registry import register_loss

log = logging.getLogger(__name__)

NEGATIVES = ("n_squared", "n")


# ----------------------------------------------------------------------------------------------------------- Symile


def mip_logits(anchor_rows: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """All-combinations MIP scores: R x B^(M-1), entry [r, (j_1, ..., j_{M-1})] = sum_d x_r[d] prod_m y_m[j_m][d].

    Columns are the row-major flattening of (j_1, ..., j_{M-1}). The contraction is the einsum
    ``'rd,jd,kd->rjk'`` (M = 3) evaluated as elementwise outer products followed by one matmul with the last
    modality, so memory is O(R B^(M-2) D + R B^(M-1)). With M = 2 it is ``anchor_rows @ others[0].T``.
    """
    r, d = anchor_rows.shape
    prod = anchor_rows
    for y in others[:-1]:
        prod = (prod[:, None, :] * y[None, :, :]).reshape(-1, d)
    return (prod @ others[-1].T).reshape(r, -1)


def _shuffled_mip_logits(
    anchor_rows: torch.Tensor,
    others: list[torch.Tensor],
    row_offset: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """O(B) negatives (Symile "n" sampling): R x B scores against one shuffled tuple per column.

    Each non-anchor modality's rows are permuted independently (one ``randperm`` per modality, drawn from
    ``generator``), the permuted rows are multiplied elementwise into B candidate tuples, and the positive
    MIP(x_i, y_i, z_i, ...) replaces column ``row_offset + i`` of row i. So each positive has B - 1 shuffled
    negatives (with a small chance of an accidental positive), as in the reference implementation.
    """
    n = others[0].shape[0]
    device = anchor_rows.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    tuples = None
    for y in others:
        perm = torch.randperm(n, generator=generator, device=gen_device).to(device)
        tuples = y[perm] if tuples is None else tuples * y[perm]
    logits = anchor_rows @ tuples.T
    rows = torch.arange(anchor_rows.shape[0], device=device)
    positive = anchor_rows
    for y in others:
        positive = positive * y[rows + row_offset]
    is_pos = torch.zeros_like(logits, dtype=torch.bool)
    is_pos[rows, rows + row_offset] = True
    return torch.where(is_pos, positive.sum(-1, keepdim=True).expand_as(logits), logits)


def symile_rows_loss(
    rows: list[torch.Tensor],
    cols: list[torch.Tensor],
    logit_scale: torch.Tensor | float,
    row_offset: int = 0,
    negatives: str = "n_squared",
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symile loss of rows ``row_offset : row_offset + R`` (``rows[m]``) against all columns (``cols[m]``).

    For each modality m as anchor: logits = s * MIP(x^m_r, candidate tuples of the other modalities) and
    L_m = CE(logits, positive); L = 1/M sum_m L_m. ``negatives="n_squared"``: all B^(M-1) combinations of the
    other modalities' columns (exact); ``"n"``: B - 1 shuffled tuples per positive (see ``_shuffled_mip_logits``).
    ``reduction="sum"`` sums the cross-entropies over rows instead of averaging them (for masked distributed use).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if len(rows) < 2 or len(rows) != len(cols):
        raise ValueError("symile needs M >= 2 modalities, the same number in rows and cols")
    n_rows, n_cols, m = rows[0].shape[0], cols[0].shape[0], len(rows)
    idx = torch.arange(n_rows, device=rows[0].device) + row_offset
    if negatives == "n_squared":
        # position of the tuple (i, i, ..., i) in the row-major flattening of B^(M-1) columns
        labels = idx * sum(n_cols**k for k in range(m - 1))
    else:
        labels = idx
    losses = []
    for a in range(m):
        anchor = logit_scale * rows[a]
        others = [c for k, c in enumerate(cols) if k != a]
        if negatives == "n_squared":
            logits = mip_logits(anchor, others)
        else:
            logits = _shuffled_mip_logits(anchor, others, row_offset, generator)
        losses.append(F.cross_entropy(logits, labels, reduction=reduction))
    return sum(losses) / m


def symile_loss(
    feats: list[torch.Tensor],
    logit_scale: torch.Tensor | float,
    negatives: str = "n_squared",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Symile loss (Saporta et al. 2024) over the full batch: every modality in turn is the anchor.

    ``negatives="n_squared"`` is exact (all combinations; with M = 2 equals ``clip_loss``); ``"n"`` draws
    B - 1 negatives per positive by shuffling with ``generator`` (the global RNG if None).
    """
    return symile_rows_loss(feats, feats, logit_scale, 0, negatives, generator)


# ------------------------------------------------------------------------------------------------------------- GRAM


def _det_sym(g: torch.Tensor) -> torch.Tensor:
    """Determinant of symmetric ... x k x k matrices: closed form for k <= 3 (polynomial, finite gradients
    everywhere), ``torch.linalg.det`` otherwise (its backward also handles singular matrices)."""
    k = g.shape[-1]
    if k == 1:
        return g[..., 0, 0]
    if k == 2:
        return g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] ** 2
    if k == 3:
        a, b, c = g[..., 0, 0], g[..., 1, 1], g[..., 2, 2]
        x, y, z = g[..., 0, 1], g[..., 1, 2], g[..., 0, 2]
        return a * b * c + 2 * x * y * z - a * y**2 - b * z**2 - c * x**2
    return torch.linalg.det(g)


def gram_volume(anchor: torch.Tensor, others: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Volumes V_ij = sqrt(det(X X^T) + eps), X rows = (anchor_i, others[0]_j, others[1]_j, ...): R x B.

    The Gram matrix entries are assembled from R x B and B-sized inner products (never an R x B x D tensor).
    ``eps`` inside the square root keeps the value and gradient finite when the vectors are identical or
    collinear (det = 0); det is clamped at 0 against rounding. With k = 2 unit vectors V = sin(angle).

    Computed in at least float32 with autocast off, as GRAM's code does (``torch.det(G.float())``): the volume
    of a well-aligned tuple is a small difference of inner products near 1 (det = 1 - c^2 for k = 2), which
    bf16/fp16 inner products (8/11-bit mantissas) get wrong: by 5% (bf16) and 0.4% (fp16) for k = 3 tuples at
    cosine ~0.96, by 12% (bf16) at ~0.99. Half-precision inputs are upcast (float64 stays float64), and the result
    has that dtype.
    """
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(anchor.device.type, enabled=False):
        anchor, vecs_b = anchor.to(dtype), [u.to(dtype) for u in others]
        k = 1 + len(vecs_b)
        n_r, n_b = anchor.shape[0], vecs_b[0].shape[0]
        entries: list[list[torch.Tensor | None]] = [[None] * k for _ in range(k)]
        entries[0][0] = (anchor * anchor).sum(-1)[:, None].expand(n_r, n_b)
        for p, u in enumerate(vecs_b, start=1):
            entries[0][p] = entries[p][0] = anchor @ u.T
            for q in range(p, k):
                v = vecs_b[q - 1]
                entries[p][q] = entries[q][p] = (u * v).sum(-1)[None, :].expand(n_r, n_b)
        gram = torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)  # R x B x k x k
        return torch.sqrt(_det_sym(gram).clamp_min(0) + eps)


def gram_rows_loss(
    rows: list[torch.Tensor],
    cols: list[torch.Tensor],
    logit_scale: torch.Tensor | float,
    row_offset: int = 0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRAM loss of rows ``row_offset : row_offset + R`` against all columns; modality 0 is the anchor.

    L = 1/2 [CE(-s V(anchor_r, tuples_all), y) + CE(-s V(anchor_all, tuples_r)^T, y)], y_i = row_offset + i,
    with label smoothing (0.1 in the paper). When ``rows`` are ``cols`` the volume matrix is computed once.
    """
    if len(rows) < 2 or len(rows) != len(cols):
        raise ValueError("gram needs M >= 2 modalities, the same number in rows and cols")
    labels = torch.arange(rows[0].shape[0], device=rows[0].device) + row_offset
    vol_a2t = gram_volume(rows[0], cols[1:], eps)
    if all(r is c for r, c in zip(rows, cols)):
        vol_t2a = vol_a2t.T
    else:
        vol_t2a = gram_volume(cols[0], rows[1:], eps).T
    return 0.5 * (
        F.cross_entropy(-logit_scale * vol_a2t, labels, label_smoothing=label_smoothing, reduction=reduction)
        + F.cross_entropy(-logit_scale * vol_t2a, labels, label_smoothing=label_smoothing, reduction=reduction)
    )


def gram_loss(
    feats: list[torch.Tensor], logit_scale: torch.Tensor | float, label_smoothing: float = 0.0, eps: float = 1e-6
) -> torch.Tensor:
    """GRAM contrastive loss (Cicchetti et al. 2025) over the full batch; ``feats[0]`` is the anchor.

    L = 1/2 [CE_ls(-s V, arange) + CE_ls(-s V^T, arange)], V from :func:`gram_volume`; GRAM's code uses label
    smoothing 0.1 and s = 1 / tau with a learnable tau initialised at 0.07.
    """
    return gram_rows_loss(feats, feats, logit_scale, 0, label_smoothing, eps=eps)


def volume_hard_negatives(
    volumes: torch.Tensor, logit_scale: torch.Tensor | float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAM's hard negatives for data-anchor matching, drawn by volume: ``(tuple_of, anchor_of)``, B each.

    ``volumes[i, j]`` is V(anchor_i, tuple_j) over a batch (B x B). Anchor i's negative tuple is drawn with
    probability proportional to softmax_j(-s V[i, j]) + 1e-4, tuple j's negative anchor proportional to
    softmax_i(-s V[i, j]) + 1e-4, never the sample's own (as GRAM's training code draws them; small volumes, i.e.
    tuples that nearly align with the anchor, are the likely draws). No gradient.
    """
    with torch.no_grad():
        logits = -float(logit_scale) * volumes.float()
        own = torch.eye(volumes.shape[0], dtype=torch.bool, device=volumes.device)
        weights = [(logits.softmax(dim=1) + 1e-4).masked_fill(own, 0),
                   (logits.T.softmax(dim=1) + 1e-4).masked_fill(own, 0)]
        tuple_of, anchor_of = (torch.multinomial(w, 1, generator=generator).squeeze(1) for w in weights)
    return tuple_of, anchor_of


def dam_rows_loss(
    head, rows: list[torch.Tensor], cols: list[torch.Tensor], neg_tuple: torch.Tensor, neg_anchor: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Data-anchor matching loss of the local ``rows`` (anchor first, then the tuple's modalities; R each).

    ``head`` (a matching head: a list of N x D embeddings -> N x 2 logits) classifies 3R pairs: each row's own
    (anchor, tuple) as a match, and as mismatches its anchor with tuple ``neg_tuple[r]`` of ``cols`` and anchor
    ``neg_anchor[r]`` of ``cols`` with its tuple. L = CE over the 3R pairs (GRAM's DTM term before ``itm_ratio``);
    ``reduction="sum"`` sums over rows and divides by 3, so that a sum over all rows / B is the mean over 3B pairs.
    """
    pairs = [torch.cat([rows[0], rows[0], cols[0][neg_anchor]])]
    pairs += [torch.cat([r, c[neg_tuple], r]) for r, c in zip(rows[1:], cols[1:])]
    n = rows[0].shape[0]
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(rows[0].device)
    loss = F.cross_entropy(head(pairs), labels, reduction=reduction)
    return loss / 3 if reduction == "sum" else loss


def text_anchor(modalities: list[str], kinds: dict[str, str] | None = None) -> str | None:
    """GRAM's default anchor, text as in the paper and its code: the modality named ``text``, else the first listed
    whose kind (``kinds``: name -> modality kind) is ``text``; None when there is none (the first listed then)."""
    if "text" in modalities:
        return "text"
    return next((m for m in modalities if (kinds or {}).get(m) == "text"), None)


# ------------------------------------------------------------------------------------------------------- objectives


class _AllPresentObjective(PresenceObjective):
    """Shared plumbing: gather with gradient, keep the rows where every modality is present, sum the row terms.

    Each term of a rank is ``world / N * sum over its complete rows`` (N = complete rows on all ranks), so the mean
    over ranks equals the single-process mean over the concatenated batch, and the gathers' backward (a sum over
    ranks) gives each rank N_ranks x the global gradient, which DDP's averaging turns back into the global one.
    With ``missing="learned"`` every row is complete (absent modalities hold the model's missing embedding).
    ``loss`` is the sum of the terms; with several, each is returned too.
    """

    def _row_terms(self, rows: Rows, logit_scale: Scale, output: AlignmentOutput
                   ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """The loss terms of ``rows.local`` against ``rows.columns``, each summed over the local rows."""
        raise NotImplementedError

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        local = [output.embeddings[m] for m in self.modalities]
        gathered = [gather_with_grad(x) for x in local]
        rows = self.complete_rows(self.modalities, local, gathered, output.present)
        if rows.total == 0:
            log.warning("%s: no row has all of %s present; loss is 0", type(self).__name__, self.modalities)
            return {"loss": self.zero_in_graph(gathered)}
        share = world_size() / rows.total
        terms = {name: term * share for name, term in self._row_terms(rows, logit_scale, output).items()}
        loss = sum(terms.values())
        out = terms if len(terms) > 1 else {}
        return {**out, "loss": loss, "complete_rows": torch.tensor(float(rows.total), device=loss.device)}


@register_loss("symile")
class SymileObjective(_AllPresentObjective):
    """Symile over all listed modalities (each one the anchor in turn).

    ``negatives="n"`` draws from a generator seeded with ``seed`` (a recipe's ``seed`` when it leaves this unset).
    In a distributed run every rank holds a generator seeded with the same ``seed`` and draws its permutations over
    the *gathered* batch in the same order, so all ranks use identical shuffled tuples and the mean over ranks
    equals one process on the concatenated batch with the same generator state. The generator state is not part of
    the checkpoint (a resumed run draws a different but equally valid sequence).

    ``missing="learned"`` by default, as in the Symile paper: a sample lacking an optional modality takes part with
    that modality's learned missing embedding (``"drop"`` uses only the rows where every modality is present).
    """

    requirements = Requirements(presence=True, nway_score="mip")

    def __init__(self, modalities: list[str], negatives: str = "n_squared", seed: int | None = None,
                 missing: str = "learned"):
        super().__init__(modalities, missing)
        if negatives not in NEGATIVES:
            raise ConfigError(f"symile negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.negatives = negatives
        self.generator = torch.Generator().manual_seed(seed or 0)

    def _row_terms(self, rows, logit_scale, output) -> dict[str, torch.Tensor]:
        return {"loss": symile_rows_loss(rows.local, rows.columns, logit_scale, rows.offset, self.negatives,
                                         self.generator, "sum")}


@register_loss("gram")
class GramObjective(_AllPresentObjective):
    """GRAM volume contrast with ``anchor`` against the tuples of the other modalities, and optionally GRAM's
    data-anchor matching (DAM) term.

    The anchor defaults to :func:`text_anchor` of the modality names (text, as in the paper), else the first listed
    modality. For a text modality under another name, pass ``anchor`` (a caller that knows the kinds can compute
    it with ``text_anchor(names, kinds)``).

    ``itm_ratio > 0`` (GRAM's code: 0.1) adds ``itm_ratio`` x :func:`dam_rows_loss`: the model's matching head
    (``output.matching``; the model gets one, ``Requirements.matching``) classifies each (anchor, tuple) pair against
    two negatives drawn by volume (:func:`volume_hard_negatives`) from a generator seeded with ``seed`` (a recipe's
    ``seed`` when it leaves this unset). The draws are made for every row of the gathered batch on every rank from
    the same generator, so a distributed run equals one process on the concatenated batch. ``loss`` is then
    ``loss_volume + loss_dam`` (``loss_dam`` already weighted, as GRAM logs it).
    """

    requirements = Requirements(presence=True, nway_score="volume")

    def __init__(
        self, modalities: list[str], label_smoothing: float = 0.0, eps: float = 1e-6, anchor: str | None = None,
        missing: str = "drop", itm_ratio: float = 0.0, seed: int | None = None,
    ):
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"gram label_smoothing must be in [0, 1), got {label_smoothing}")
        if not itm_ratio >= 0.0:
            raise ConfigError(f"gram itm_ratio must be >= 0, got {itm_ratio}")
        anchor = anchor if anchor is not None else text_anchor(modalities)
        if anchor is not None:
            if anchor not in modalities:
                raise ConfigError(f"gram anchor {anchor!r} is not one of the modalities {modalities}")
            modalities = [anchor] + [m for m in modalities if m != anchor]
        super().__init__(modalities, missing)
        self.label_smoothing = label_smoothing
        self.eps = eps
        self.itm_ratio = float(itm_ratio)
        self.seed = seed or 0
        self.generator: torch.Generator | None = None  # on the features' device, made at the first draw
        if self.itm_ratio:
            self.requirements = replace(type(self).requirements, matching=tuple(self.modalities))

    def _row_terms(self, rows, logit_scale, output) -> dict[str, torch.Tensor]:
        volume = gram_rows_loss(rows.local, rows.columns, logit_scale, rows.offset, self.label_smoothing, "sum",
                                self.eps)
        if not self.itm_ratio:
            return {"loss": volume}
        if output.matching is None:
            raise ConfigError("gram itm_ratio > 0 needs the model's matching head (model.matching)")
        cols = rows.columns
        with torch.no_grad():
            volumes = gram_volume(cols[0], cols[1:], self.eps)  # all anchors x all tuples
        neg_tuple, neg_anchor = volume_hard_negatives(volumes, logit_scale, self._generator(volumes.device))
        local = slice(rows.offset, rows.offset + rows.local[0].shape[0])
        dam = dam_rows_loss(output.matching, rows.local, cols, neg_tuple[local], neg_anchor[local], "sum")
        return {"loss_volume": volume, "loss_dam": self.itm_ratio * dam}

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self.generator
