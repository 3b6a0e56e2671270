"""Contrastive-loss variants from the literature: CWCL soft targets, label smoothing, DCL, hard negatives (HCL).

One core serves every InfoNCE variant: :func:`infonce_rows` computes, for each query row i of a logits block z whose
positive is column ``row_offset + i``,

    l_i = log sum_j w_ij exp(z_ij) - [(1 - eps) sum_j t_ij z_ij / sum_j t_ij + eps mean_j z_ij]

and returns the mean over rows. t are the targets (one-hot positives unless given: CWCL passes its soft targets),
eps is label smoothing, and w are weights on the terms of the denominator, given as log w (-inf drops a term: DCL;
exp(beta z) on negatives: HCL; only HCL's debiasing, which subtracts the positive's mass, is computed beside it).
With t one-hot, eps = 0 and w = 1 it is ``F.cross_entropy(z, arange + row_offset)``, i.e. one direction of CLIP. The
``*_rows_loss`` functions compute both directions for a block of local rows against all (gathered) columns, as in
:mod:`.pairwise`; the plain functions are the same with every row local.

The registered objectives at the end of the module (``cwcl``, ``dcl``, ``clip_hard_negatives``, ``clip_plus``) are
:class:`~.objectives.PairwiseObjective` s, as ``clip`` is: each defines its ``pair_loss`` and shares the forward that
handles presence masks and the optional ``align_weight``/``uniform_weight`` regularisers.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..distributed import gather_no_grad
from ..errors import ConfigError
from .contract import AlignmentOutput
from .objectives import PairwiseObjective, Rows, Scale
from .pairwise import positive_mask
from .registry import register_loss


# --------------------------------------------------------------------------------------------------- the one core


def infonce_rows(
    logits: torch.Tensor,
    row_offset: int = 0,
    *,
    targets: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    log_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalised InfoNCE of a ``rows x N`` logits block (see the module docstring for the formula); mean over rows
    (``reduction="sum"``: the sum, for masked distributed use).

    ``targets``: non-negative ``rows x N`` soft targets, each row normalised by its sum inside (default: one-hot at
    column ``row_offset + i``). ``label_smoothing``: mixes the normalised targets with the uniform distribution over
    all N columns, exactly as ``F.cross_entropy(label_smoothing=eps)``. ``log_weights``: ``rows x N`` log-weights of
    the denominator terms (default 0 = plain softmax).
    """
    n_rows, n_cols = logits.shape
    if targets is None:
        idx = torch.arange(n_rows, device=logits.device)
        target_term = logits[idx, idx + row_offset]
    else:
        target_term = (targets * logits).sum(dim=-1) / targets.sum(dim=-1)
    if label_smoothing:
        target_term = (1.0 - label_smoothing) * target_term + label_smoothing * logits.mean(dim=-1)
    denominator = torch.logsumexp(logits if log_weights is None else logits + log_weights, dim=-1)
    per_row = denominator - target_term
    return per_row.sum() if reduction == "sum" else per_row.mean()


def _both_directions(
    a_rows: torch.Tensor, b_rows: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, logit_scale: Scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the local rows in both directions: (s A_r B^T, s B_r A^T), each ``rows x N``."""
    return logit_scale * a_rows @ b_all.T, logit_scale * b_rows @ a_all.T


# ------------------------------------------------------------------------------------------ CWCL and label smoothing


def cwcl_weights(
    q: torch.Tensor, columns: torch.Tensor | None = None, *, center: bool = False, sharpness: float = 1.0
) -> torch.Tensor:
    """CWCL soft targets from a frozen tower's features (Srinivasa et al. 2023), optionally conditioned.

        w_ij = ((1 + c_ij) / 2) ** gamma,   c_ij = cos(q_i - mu, q_j - mu)

    With the defaults (``center=False``: mu = 0; ``sharpness`` gamma = 1) this is the paper's w = 1/2 q_n q_n^T + 1/2.
    The conditioning is for anisotropic frozen towers (e.g. MiniLM, whose unrelated captions sit at cosine ~0.3, so
    every w_ij is ~0.65 and the own pair holds ~1/B of a row's target):

    - ``center=True``: mu = the mean of the column features, so the direction all features share is removed before
      the cosine and unrelated items sit near c = 0 (Mu & Viswanath 2018, "All-but-the-Top");
    - ``sharpness`` gamma > 1 raises the weights to a power, a temperature on the frozen similarities: near c = 1,
      w = exp(gamma log((1 + c) / 2)) ~ exp(-gamma (1 - c) / 2), so gamma = 2 / tau for a temperature tau. Similar
      items keep most of their weight while unrelated ones fall to 2^-gamma (centred) and the targets tend to CLIP's
      identity as gamma grows.

    ``q`` (B x D_q) is detached, so the weights carry no gradient; w_ij lies in [0, 1] and w_ii = 1 (unless centring
    puts q_i exactly at the mean). ``columns``: the (gathered) features of all columns, for a ``rows x N`` block of
    local rows; default ``q`` itself (B x B). The mean mu always comes from the columns, so a block of rows equals
    the same rows of the full matrix.
    """
    if sharpness <= 0:
        raise ValueError(f"cwcl sharpness must be > 0, got {sharpness}")
    with torch.no_grad():
        q = q.detach()
        cols = q if columns is None else columns.detach()
        if center:
            mu = cols.mean(dim=0, keepdim=True)
            q, cols = q - mu, cols - mu
        cos = F.normalize(q, dim=-1) @ F.normalize(cols, dim=-1).T
        w = (0.5 * cos + 0.5).clamp_(0.0, 1.0)
        return w if sharpness == 1 else w.pow_(sharpness)


def cwcl_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: Scale,
    weights_ab: torch.Tensor,
    weights_ba: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric soft-target InfoNCE of local rows against all columns.

    L = 1/2 [L_{A->B}(w) + L_{B->A}(w^T)], L_{A->B} = -1/B sum_i sum_j w_ij log softmax_j(s a_i . b_j) / sum_j w_ij.
    ``weights_ab`` are the local rows of w, ``weights_ba`` the local rows of w^T (both ``rows x N``); for symmetric
    weights such as :func:`cwcl_weights`' they are the same tensor.
    """
    z_ab, z_ba = _both_directions(a_rows, b_rows, a_all, b_all, logit_scale)
    return 0.5 * (infonce_rows(z_ab, targets=weights_ab, reduction=reduction)
                  + infonce_rows(z_ba, targets=weights_ba, reduction=reduction))


def cwcl_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: Scale, weights: torch.Tensor) -> torch.Tensor:
    """CWCL (continuously weighted contrastive loss) over the full batch; with ``weights`` = identity it is CLIP."""
    return cwcl_rows_loss(a, b, a, b, logit_scale, weights, weights.T)


def label_smoothed_clip_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: Scale,
    label_smoothing: float,
    row_offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """CLIP with label smoothing: 1/2 [CE_eps(s A_r B^T, y) + CE_eps(s B_r A^T, y)] (Szegedy et al. 2016), where
    CE_eps is ``F.cross_entropy(..., label_smoothing=eps)``: targets (1 - eps) one-hot + eps / N over all N columns."""
    z_ab, z_ba = _both_directions(a_rows, b_rows, a_all, b_all, logit_scale)
    return 0.5 * (
        infonce_rows(z_ab, row_offset, label_smoothing=label_smoothing, reduction=reduction)
        + infonce_rows(z_ba, row_offset, label_smoothing=label_smoothing, reduction=reduction)
    )


def label_smoothed_clip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: Scale, label_smoothing: float
) -> torch.Tensor:
    """CLIP with label smoothing over the full batch; ``label_smoothing=0`` is ``clip_loss``."""
    return label_smoothed_clip_rows_loss(a, b, a, b, logit_scale, label_smoothing)


# ----------------------------------------------------------------------------------------- DCL and hard negatives


def dcl_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: Scale,
    row_offset: int = 0,
    reduction: str = "mean",
    weight_sigma: float | None = None,
) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022), symmetric: the positive is removed from each denominator.

    l_i = -w_i s a_i . b_i + log sum_{j != i} exp(s a_i . b_j); L = 1/2 (mean_i l_i^{A->B} + mean_i l_i^{B->A}).
    DCL has w_i = 1: then L = CLIP + mean_i log(1 - p_ii) per direction (p = the CLIP softmax); needs N >= 2 columns.
    ``weight_sigma`` sigma gives DCL-W, the paper's von Mises-Fisher weighting of the positive term over all N pairs
    of the (gathered) batch: w_i = 2 - N exp(a_i . b_i / sigma) / sum_k exp(a_k . b_k / sigma) (sigma = 0.5 in the
    paper; cosines, not logits; with gradient, as in the authors' code), so easy positives (high cosine) weigh
    less than 1 and hard ones more, with mean 1.
    """
    z_ab, z_ba = _both_directions(a_rows, b_rows, a_all, b_all, logit_scale)
    drop_positive = torch.zeros_like(z_ab).masked_fill_(
        positive_mask(*z_ab.shape, row_offset, device=z_ab.device), float("-inf")
    )
    loss = 0.5 * (
        infonce_rows(z_ab, row_offset, log_weights=drop_positive, reduction=reduction)
        + infonce_rows(z_ba, row_offset, log_weights=drop_positive, reduction=reduction)
    )
    if weight_sigma is None:
        return loss
    if weight_sigma <= 0:
        raise ValueError(f"dcl weight_sigma must be > 0, got {weight_sigma}")
    positives = (a_all * b_all).sum(-1)
    w = 2.0 - positives.shape[0] * torch.softmax(positives / weight_sigma, dim=0)
    w_rows = w[row_offset: row_offset + a_rows.shape[0]]
    # both directions' positive logit is s a_i . b_i: replace its weight 1 by w_i
    correction = (w_rows - 1.0) * logit_scale * (a_rows * b_rows).sum(-1)
    return loss - (correction.sum() if reduction == "sum" else correction.mean())


def dcl_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: Scale, weight_sigma: float | None = None
) -> torch.Tensor:
    """Decoupled contrastive loss over the full batch; DCL-W with ``weight_sigma`` (see :func:`dcl_rows_loss`)."""
    return dcl_rows_loss(a, b, a, b, logit_scale, weight_sigma=weight_sigma)


def hard_negative_log_weights(logits: torch.Tensor, beta: float, row_offset: int = 0) -> torch.Tensor:
    """Log of the HCL importance weights of the denominator terms (Robinson et al. 2021), ``rows x N``.

    Negatives: w_ij = (N - 1) exp(beta z_ij) / sum_{k != i} exp(beta z_ik), so they sum to the number of negatives
    and beta = 0 gives w = 1 (CLIP); the positive keeps weight 1. beta multiplies the logit z = s a . b, as in the
    paper's code (exp(beta sim / tau)); the weights are not detached, also as there.
    """
    pos = positive_mask(*logits.shape, row_offset, device=logits.device)
    n_negatives = logits.shape[1] - 1
    log_w = torch.log_softmax((beta * logits).masked_fill(pos, float("-inf")), dim=-1) + math.log(n_negatives)
    return log_w.masked_fill(pos, 0.0)


def hcl_rows(
    logits: torch.Tensor, beta: float, tau_plus: float, logit_scale: Scale, row_offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """One direction of HCL (Robinson et al. 2021) for a ``rows x N`` logits block; mean over rows
    (``reduction="sum"``: the sum, for masked distributed use).

    l_i = -z_ii + log(exp(z_ii) + Ng_i) with the debiased, reweighted estimate of the negatives' mass

        Ng_i = max( (sum_{j != i} w_ij exp(z_ij) - tau_plus (N - 1) exp(z_ii)) / (1 - tau_plus),  (N - 1) e^{-s} )

    w from :func:`hard_negative_log_weights`, tau_plus the class prior of false negatives (Chuang et al. 2020) and
    (N - 1) e^{-s} the estimate's least possible value (every cosine -1), the clamp of the paper's code. tau_plus = 0
    is the reweighting alone (no clamp needed: a weighted mean of exp(z) >= e^{-s}); tau_plus = beta = 0 is CLIP.
    """
    log_w = hard_negative_log_weights(logits, beta, row_offset)
    if not tau_plus:
        return infonce_rows(logits, row_offset, log_weights=log_w, reduction=reduction)
    # The debiased estimate subtracts the positive's mass, which no log-weight can express: computed in log space.
    n_rows, n_cols = logits.shape
    idx = torch.arange(n_rows, device=logits.device)
    z_pos = logits[idx, idx + row_offset]
    pos = positive_mask(n_rows, n_cols, row_offset, device=logits.device)
    log_neg = torch.logsumexp((logits + log_w).masked_fill(pos, float("-inf")), dim=-1)
    # Ng = exp(log_neg) (1 - r) / (1 - tau_plus), r = tau_plus (N - 1) exp(z_ii) / sum_j w_ij exp(z_ij)
    r = tau_plus * (n_cols - 1) * torch.exp(z_pos - log_neg)
    positive_estimate = r < 1
    debiased = log_neg + torch.log1p(-torch.where(positive_estimate, r, 0.0)) - math.log1p(-tau_plus)
    floor = torch.as_tensor(math.log(n_cols - 1) - logit_scale, dtype=logits.dtype, device=logits.device)
    log_neg = torch.where(positive_estimate, torch.maximum(debiased, floor), floor.expand_as(debiased))
    per_row = torch.logaddexp(z_pos, log_neg) - z_pos
    return per_row.sum() if reduction == "sum" else per_row.mean()


def hard_negative_clip_rows_loss(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: Scale,
    beta: float,
    row_offset: int = 0,
    reduction: str = "mean",
    tau_plus: float = 0.0,
) -> torch.Tensor:
    """Symmetric HCL: 1/2 [HCL(s A_r B^T) + HCL(s B_r A^T)], each direction :func:`hcl_rows`.

    beta = tau_plus = 0 is CLIP; beta > 0 upweights hard negatives; tau_plus > 0 debiases the negatives for false
    negatives. HCL's defaults are beta = 1, tau_plus = 0.1 (the registered objective's defaults).
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    z_ab, z_ba = _both_directions(a_rows, b_rows, a_all, b_all, logit_scale)
    return 0.5 * (hcl_rows(z_ab, beta, tau_plus, logit_scale, row_offset, reduction)
                  + hcl_rows(z_ba, beta, tau_plus, logit_scale, row_offset, reduction))


def hard_negative_clip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: Scale, beta: float, tau_plus: float = 0.0
) -> torch.Tensor:
    """HCL over the full batch (see :func:`hard_negative_clip_rows_loss`)."""
    return hard_negative_clip_rows_loss(a, b, a, b, logit_scale, beta, tau_plus=tau_plus)


# ------------------------------------------------------------------------------------------- registered objectives


@register_loss("clip_plus")
class ClipPlusObjective(PairwiseObjective):
    """CLIP with optional ``label_smoothing`` and alignment/uniformity regularisers; with the defaults it is ``clip``."""

    def __init__(self, modalities: list[str], label_smoothing: float = 0.0, align_weight: float = 0.0,
                 uniform_weight: float = 0.0, uniform_t: float = 2.0, missing: str = "drop"):
        super().__init__(modalities, align_weight, uniform_weight, uniform_t, missing)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def pair_loss(self, rows: Rows, logit_scale: Scale, state: object) -> torch.Tensor:
        return label_smoothed_clip_rows_loss(*rows.local, *rows.columns, logit_scale, self.label_smoothing,
                                             rows.offset, reduction="sum")


@register_loss("dcl")
class DclObjective(PairwiseObjective):
    """Decoupled contrastive loss (positive removed from the denominators); mean over pairs of modalities.
    ``weight_sigma`` (e.g. the paper's 0.5) turns it into DCL-W (see :func:`dcl_rows_loss`)."""

    def __init__(self, modalities: list[str], weight_sigma: float | None = None, align_weight: float = 0.0,
                 uniform_weight: float = 0.0, uniform_t: float = 2.0, missing: str = "drop"):
        super().__init__(modalities, align_weight, uniform_weight, uniform_t, missing)
        if weight_sigma is not None and not weight_sigma > 0:
            raise ConfigError(f"dcl: weight_sigma must be > 0 (or null for plain DCL), got {weight_sigma}")
        self.weight_sigma = None if weight_sigma is None else float(weight_sigma)

    def pair_loss(self, rows: Rows, logit_scale: Scale, state: object) -> torch.Tensor:
        return dcl_rows_loss(*rows.local, *rows.columns, logit_scale, rows.offset, reduction="sum",
                             weight_sigma=self.weight_sigma)


@register_loss("clip_hard_negatives")
class HardNegativeClipObjective(PairwiseObjective):
    """HCL (Robinson et al. 2021): hard-negative reweighting of strength ``beta`` and false-negative debiasing with
    class prior ``tau_plus``; the defaults are the paper's code's (beta = 1, tau_plus = 0.1), beta = tau_plus = 0 is
    CLIP. See :func:`hcl_rows`."""

    def __init__(self, modalities: list[str], beta: float = 1.0, tau_plus: float = 0.1, align_weight: float = 0.0,
                 uniform_weight: float = 0.0, uniform_t: float = 2.0, missing: str = "drop"):
        super().__init__(modalities, align_weight, uniform_weight, uniform_t, missing)
        if beta < 0 or not 0.0 <= tau_plus < 1.0:
            raise ConfigError(f"clip_hard_negatives: beta must be >= 0 and tau_plus in [0, 1), got beta={beta}, "
                              f"tau_plus={tau_plus}")
        self.beta = float(beta)
        self.tau_plus = float(tau_plus)

    def pair_loss(self, rows: Rows, logit_scale: Scale, state: object) -> torch.Tensor:
        return hard_negative_clip_rows_loss(*rows.local, *rows.columns, logit_scale, self.beta, rows.offset,
                                            reduction="sum", tau_plus=self.tau_plus)


@register_loss("cwcl")
class CwclObjective(PairwiseObjective):
    """CWCL with soft targets from a frozen tower: needs ``output.frozen_features[weights_from]`` (B x D_q).

    ``weights_from`` (default: the first modality) names the modality whose frozen tower's features q give the
    weights :func:`cwcl_weights`; they are computed once per batch without gradient (q gathered without gradient
    across ranks) and used for every pair of modalities (restricted to the pair's complete rows). ``center`` and
    ``sharpness`` condition the weights (see :func:`cwcl_weights`; the defaults are the paper's weights).
    """

    def __init__(self, modalities: list[str], weights_from: str | None = None, center: bool = False,
                 sharpness: float = 1.0, align_weight: float = 0.0, uniform_weight: float = 0.0,
                 uniform_t: float = 2.0, missing: str = "drop"):
        super().__init__(modalities, align_weight, uniform_weight, uniform_t, missing)
        self.weights_from = weights_from if weights_from is not None else self.modalities[0]
        if self.weights_from not in self.modalities:
            raise ConfigError(f"cwcl: weights_from={self.weights_from!r} is not one of the modalities {self.modalities}")
        if not sharpness > 0:
            raise ConfigError(f"cwcl: sharpness must be > 0, got {sharpness}")
        self.requirements = replace(type(self).requirements, features=(self.weights_from,))
        self.center = bool(center)
        self.sharpness = float(sharpness)

    def batch_state(self, output: AlignmentOutput) -> torch.Tensor:
        features = output.frozen_features
        if self.weights_from not in features:
            raise ConfigError(
                f"loss 'cwcl' needs frozen_features={{{self.weights_from!r}: features of its frozen tower}}, got "
                f"{sorted(features) if features else None}"
            )
        q = features[self.weights_from].detach()
        n_local = output.embeddings[self.modalities[0]].shape[0]
        if q.shape[0] != n_local:
            raise ValueError(f"cwcl: frozen features have {q.shape[0]} rows, embeddings {n_local}")
        return cwcl_weights(q, columns=gather_no_grad(q), center=self.center, sharpness=self.sharpness)

    def batch_metrics(self, state: torch.Tensor, row_offset: int) -> dict[str, torch.Tensor]:
        """``cwcl_positive_mass``: mean share of a row's normalised soft targets on its own pair, w_ii / sum_j w_ij
        (1 for CLIP's one-hot targets; about 1/B when the frozen tower finds every pair alike)."""
        pos = positive_mask(*state.shape, row_offset, device=state.device)
        return {"cwcl_positive_mass": (state[pos] / state.sum(dim=-1)).mean()}

    def pair_loss(self, rows: Rows, logit_scale: Scale, state: torch.Tensor) -> torch.Tensor:
        weights = state if rows.keep is None else state[rows.keep][:, rows.keep_all]
        # The weights are symmetric, so the local rows of w^T are the local rows of w.
        return cwcl_rows_loss(*rows.local, *rows.columns, logit_scale, weights, weights, reduction="sum")
