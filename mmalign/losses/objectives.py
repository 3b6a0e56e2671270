"""Loss modules: the state a recipe configures (modality order, options) around the pure loss functions.

Each objective declares what it needs from the model (``requirements``, a :class:`~.contract.Requirements`), takes
the model's :class:`~.contract.AlignmentOutput` with the logit scale (and bias) and returns a dict whose ``"loss"``
entry is the scalar to minimise. Under ``torch.distributed`` each rank gathers the other ranks' features with
gradient and computes the loss of its *own* rows against all columns, so the mean over ranks (what DDP's gradient
averaging optimises) equals the single-process loss on the concatenated batch.
"""
from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

import torch
from torch import nn

from ..distributed import gather_no_grad, gather_with_grad, rank, world_size
from ..errors import ConfigError
from .contract import AlignmentOutput, Requirements
from .pairwise import clip_rows_loss, siglip_rows_loss
from .registry import register_loss
from .regularisers import alignment_loss, distributed_uniformity

MISSING = ("drop", "learned")
Scale = torch.Tensor | float


class Objective(nn.Module):
    """Base class: holds the ordered modality names the objective aligns and declares its ``requirements``."""

    min_modalities = 2
    requirements = Requirements()

    def __init__(self, modalities: list[str]):
        super().__init__()
        if len(modalities) < self.min_modalities:
            raise ConfigError(
                f"loss {type(self).__name__} needs at least {self.min_modalities} modalities, got {modalities}"
            )
        self.modalities = list(modalities)

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Rows(NamedTuple):
    """The rows of some modalities that take part in a term (see :meth:`PresenceObjective.complete_rows`)."""

    local: list[torch.Tensor]  # this process's rows, per modality
    columns: list[torch.Tensor]  # the rows of all processes (the columns of the logits), per modality
    offset: int  # position of the first local row among the columns
    total: int  # number of columns
    keep: torch.Tensor | None  # which local rows take part (None: all)
    keep_all: torch.Tensor | None  # which gathered rows take part (None: all)


class PresenceObjective(Objective):
    """An objective that takes presence masks (``output.present``, for optional modalities only).

    ``missing="drop"``: a term over some modalities uses only the rows where all of them are present.
    ``missing="learned"``: every row takes part; an absent modality contributes the model's learned missing
    embedding (as in Symile, Saporta et al. 2024), which is how that embedding is trained.
    """

    requirements = Requirements(presence=True)

    def __init__(self, modalities: list[str], missing: str = "drop"):
        super().__init__(modalities)
        if missing not in MISSING:
            raise ConfigError(f"missing must be one of {MISSING}, got {missing!r}")
        self.missing = missing

    def complete_rows(
        self, names: list[str], local: list[torch.Tensor], gathered: list[torch.Tensor],
        present: dict[str, torch.Tensor] | None,
    ) -> Rows:
        """The local rows and the gathered columns of ``names`` that take part in a term.

        With masks, each rank keeps its complete rows, ``offset`` is the number of complete rows on lower ranks
        (the position of its first row among the gathered complete columns) and ``total`` the number on all
        ranks. A term computed as ``world / total * sum over rows`` then averages over ranks to the single-process
        mean over all complete rows of the concatenated batch. Whether masks apply depends only on ``names``,
        ``present``'s keys and ``missing``, so every rank makes the same collective calls.
        """
        n_local = local[0].shape[0]
        masks = [present[m] for m in names if m in present] if present and self.missing == "drop" else []
        if not masks:
            return Rows(local, gathered, rank() * n_local, world_size() * n_local, None, None)
        keep = torch.stack([m.to(device=local[0].device, dtype=torch.bool) for m in masks]).all(0)
        keep_all = gather_no_grad(keep)
        offset = int(keep_all[: rank() * n_local].sum())
        return Rows([x[keep] for x in local], [x[keep_all] for x in gathered], offset, int(keep_all.sum()),
                    keep, keep_all)

    @staticmethod
    def zero_in_graph(gathered) -> torch.Tensor:
        """An exact 0 that depends on every gathered feature: added to a loss where some (or all) terms have no
        complete row, it keeps every modality in the graph (DDP needs a gradient for every parameter, and every
        rank must run each gather's backward)."""
        return sum(g[:0].sum() for g in gathered)


class PairwiseObjective(PresenceObjective):
    """The shared forward of the pairwise objectives (CLIP and its variants), with presence masks and regularisers.

    For every pair of modalities, the variant's loss (``pair_loss``: a sum over the pair's complete local rows
    against the gathered complete columns) times ``world / complete rows on all ranks``; ``loss`` = mean over the
    pairs that have complete rows + ``align_weight`` * mean over pairs of :func:`.regularisers.alignment_loss` +
    ``uniform_weight`` * mean over modalities of the uniformity (global over ranks). Components are returned as
    ``loss_<m1>_<m2>``, ``align`` and ``uniform`` (the last two only when their weight is non-zero), with any
    ``batch_metrics`` (logged, not optimised).
    """

    def __init__(self, modalities: list[str], align_weight: float = 0.0, uniform_weight: float = 0.0,
                 uniform_t: float = 2.0, missing: str = "drop"):
        super().__init__(modalities, missing)
        if align_weight < 0 or uniform_weight < 0:
            raise ConfigError(f"align_weight and uniform_weight must be >= 0, got {align_weight}, {uniform_weight}")
        self.align_weight = float(align_weight)
        self.uniform_weight = float(uniform_weight)
        self.uniform_t = float(uniform_t)

    def batch_state(self, output: AlignmentOutput) -> object:
        """Per-batch state shared by all pairs (e.g. CWCL's weights); computed once per forward."""
        return None

    def batch_metrics(self, state: object, row_offset: int) -> dict[str, torch.Tensor]:
        """Scalars about the batch state to log next to the loss (no gradient)."""
        return {}

    def pair_loss(self, rows: Rows, logit_scale: Scale, state: object) -> torch.Tensor:
        """The loss of a pair's local rows ``rows.local`` against its columns ``rows.columns``, summed over rows."""
        raise NotImplementedError

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        emb = output.embeddings
        state = self.batch_state(output)
        gathered = {m: gather_with_grad(emb[m]) for m in self.modalities}
        out: dict[str, torch.Tensor] = {}
        aligned = []
        for m1, m2 in combinations(self.modalities, 2):
            rows = self.complete_rows([m1, m2], [emb[m1], emb[m2]], [gathered[m1], gathered[m2]], output.present)
            if rows.total:
                share = world_size() / rows.total
                out[f"loss_{m1}_{m2}"] = self.pair_loss(rows, logit_scale, state) * share
                if self.align_weight:
                    aligned.append(alignment_loss(*rows.local, reduction="sum") * share)
        loss = torch.stack(list(out.values())).mean() if out else 0.0
        if aligned:
            out["align"] = torch.stack(aligned).mean()
            loss = loss + self.align_weight * out["align"]
        if self.uniform_weight:
            out["uniform"] = torch.stack([self.uniformity(m, emb[m], gathered[m], output.present)
                                          for m in self.modalities]).mean()
            loss = loss + self.uniform_weight * out["uniform"]
        out.update(self.batch_metrics(state, rank() * emb[self.modalities[0]].shape[0]))
        out["loss"] = loss + self.zero_in_graph(gathered.values())
        return out

    def uniformity(self, name: str, local: torch.Tensor, gathered: torch.Tensor,
                   present: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The uniformity of one modality's present rows on all ranks (0, still in the graph, below two rows)."""
        rows = self.complete_rows([name], [local], [gathered], present)
        if rows.total < 2:
            return self.zero_in_graph([gathered])
        return distributed_uniformity(rows.local[0], rows.columns[0], rows.offset, self.uniform_t)


@register_loss("clip")
class ClipObjective(PairwiseObjective):
    """CLIP InfoNCE; with M > 2 modalities, the mean over all pairs (the pairwise baseline for Symile/GRAM).

    With presence masks (``missing="drop"``), each pair uses the rows where both of its modalities are present;
    ``loss`` is the mean over the pairs that have such rows (0, still in the graph, when none has).
    """

    def pair_loss(self, rows: Rows, logit_scale: Scale, state: object) -> torch.Tensor:
        return clip_rows_loss(*rows.local, *rows.columns, logit_scale, rows.offset, reduction="sum")


@register_loss("siglip")
class SigLipObjective(Objective):
    """SigLIP sigmoid loss (needs the model's learnable ``logit_bias``); with M > 2, mean over all pairs."""

    requirements = Requirements(logit_bias=True)

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            raise ConfigError(f"loss {type(self).__name__} needs the model's logit bias (model.logit_bias)")
        emb = output.embeddings
        offset = rank() * emb[self.modalities[0]].shape[0]
        out: dict[str, torch.Tensor] = {}
        for m1, m2 in combinations(self.modalities, 2):
            b_all = gather_with_grad(emb[m2])
            out[f"loss_{m1}_{m2}"] = self.rows_loss(emb[m1], b_all, logit_scale, logit_bias, offset)
        out["loss"] = torch.stack(list(out.values())).mean()
        return out

    def rows_loss(self, a_rows, b_all, logit_scale, logit_bias, row_offset) -> torch.Tensor:
        """The sigmoid loss of local rows against gathered columns (the blockwise subclass overrides this)."""
        return siglip_rows_loss(a_rows, b_all, logit_scale, logit_bias, row_offset)
