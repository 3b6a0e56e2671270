"""Loss modules: the state a recipe configures (modality order, options) around the pure loss functions.

Each module takes the dict of L2-normalised embeddings produced by ``AlignmentModel`` and returns a dict whose
``"loss"`` entry is the scalar to minimise. Under ``torch.distributed`` each rank gathers the other ranks' features
with gradient and computes the loss of its *own* rows against all columns, so the mean over ranks (what DDP's
gradient averaging optimises) equals the single-process loss on the concatenated batch.
"""
from __future__ import annotations

from itertools import combinations

import torch
from torch import nn

from ..distributed import gather_no_grad, gather_with_grad, rank, world_size
from ..errors import ConfigError
from .pairwise import clip_rows_loss, siglip_rows_loss
from .registry import register_loss

MISSING = ("drop", "learned")


class Objective(nn.Module):
    """Base class: holds the ordered modality names the objective aligns.

    ``needs_bias``: the model must carry a learnable logit bias. ``needs_features``: modalities whose tower features
    (before projection) the training loop passes to forward as ``frozen_features={name: B x D tensor}``.
    ``handles_missing``: takes the batch's presence masks as ``present=``, so it can train models with optional
    modalities. ``nway_score``: how a model trained with it scores a tuple of modalities against a candidate (see
    :mod:`mmalign.eval.nway`).
    """

    min_modalities = 2
    needs_bias = False
    needs_features: tuple[str, ...] = ()
    handles_missing = False
    nway_score = "cosine"

    def __init__(self, modalities: list[str]):
        super().__init__()
        if len(modalities) < self.min_modalities:
            raise ConfigError(
                f"loss {type(self).__name__} needs at least {self.min_modalities} modalities, got {modalities}"
            )
        self.modalities = list(modalities)


class PresenceObjective(Objective):
    """An objective that takes presence masks (``present={name: B booleans}``, for optional modalities only).

    ``missing="drop"``: a term over some modalities uses only the rows where all of them are present.
    ``missing="learned"``: every row takes part; an absent modality contributes the model's learned missing
    embedding (as in Symile, Saporta et al. 2024), which is how that embedding is trained.
    """

    handles_missing = True

    def __init__(self, modalities: list[str], missing: str = "drop"):
        super().__init__(modalities)
        if missing not in MISSING:
            raise ConfigError(f"missing must be one of {MISSING}, got {missing!r}")
        self.missing = missing

    def complete_rows(
        self, names: list[str], local: list[torch.Tensor], gathered: list[torch.Tensor],
        present: dict[str, torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
        """``(rows, cols, row_offset, n_total)``: the local rows and the gathered columns of ``names`` that take part.

        With masks, each rank keeps its complete rows, ``row_offset`` is the number of complete rows on lower
        ranks (the position of its first row among the gathered complete columns) and ``n_total`` the number on
        all ranks. A term computed as ``world / n_total * sum over rows`` then averages over ranks to the
        single-process mean over all complete rows of the concatenated batch. Whether masks apply depends only
        on ``names``, ``present``'s keys and ``missing``, so every rank makes the same collective calls.
        """
        n_local = local[0].shape[0]
        masks = [present[m] for m in names if m in present] if present and self.missing == "drop" else []
        if not masks:
            return local, gathered, rank() * n_local, world_size() * n_local
        keep = torch.stack([m.to(device=local[0].device, dtype=torch.bool) for m in masks]).all(0)
        keep_all = gather_no_grad(keep)
        offset = int(keep_all[: rank() * n_local].sum())
        return [x[keep] for x in local], [x[keep_all] for x in gathered], offset, int(keep_all.sum())

    @staticmethod
    def zero_in_graph(gathered) -> torch.Tensor:
        """An exact 0 that depends on every gathered feature: added to a loss where some (or all) terms have no
        complete row, it keeps every modality in the graph (DDP needs a gradient for every parameter, and every
        rank must run each gather's backward)."""
        return sum(g[:0].sum() for g in gathered)


@register_loss("clip")
class ClipObjective(PresenceObjective):
    """CLIP InfoNCE; with M > 2 modalities, the mean over all pairs (the pairwise baseline for Symile/GRAM).

    With presence masks (``missing="drop"``), each pair uses the rows where both of its modalities are present;
    ``loss`` is the mean over the pairs that have such rows (0, still in the graph, when none has).
    """

    def forward(
        self,
        embeddings: dict[str, torch.Tensor],
        logit_scale: torch.Tensor,
        present: dict[str, torch.Tensor] | None = None,
        **_,
    ) -> dict[str, torch.Tensor]:
        gathered = {m: gather_with_grad(embeddings[m]) for m in self.modalities}
        out: dict[str, torch.Tensor] = {}
        for m1, m2 in combinations(self.modalities, 2):
            rows, cols, offset, n_total = self.complete_rows(
                [m1, m2], [embeddings[m1], embeddings[m2]], [gathered[m1], gathered[m2]], present
            )
            if n_total:
                pair = clip_rows_loss(*rows, *cols, logit_scale, offset, reduction="sum")
                out[f"loss_{m1}_{m2}"] = pair * (world_size() / n_total)
        out["loss"] = (torch.stack(list(out.values())).mean() if out else 0.0) + self.zero_in_graph(gathered.values())
        return out


@register_loss("siglip")
class SigLipObjective(Objective):
    """SigLIP sigmoid loss (needs the model's learnable ``logit_bias``); with M > 2, mean over all pairs."""

    needs_bias = True

    def forward(
        self, embeddings: dict[str, torch.Tensor], logit_scale: torch.Tensor, logit_bias: torch.Tensor, **_
    ) -> dict[str, torch.Tensor]:
        offset = rank() * embeddings[self.modalities[0]].shape[0]
        out: dict[str, torch.Tensor] = {}
        for m1, m2 in combinations(self.modalities, 2):
            b_all = gather_with_grad(embeddings[m2])
            out[f"loss_{m1}_{m2}"] = self.rows_loss(embeddings[m1], b_all, logit_scale, logit_bias, offset)
        out["loss"] = torch.stack(list(out.values())).mean()
        return out

    def rows_loss(self, a_rows, b_all, logit_scale, logit_bias, row_offset) -> torch.Tensor:
        """The sigmoid loss of local rows against gathered columns (the blockwise subclass overrides this)."""
        return siglip_rows_loss(a_rows, b_all, logit_scale, logit_bias, row_offset)
