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

from ..distributed import gather_with_grad, rank
from ..errors import ConfigError
from .pairwise import clip_rows_loss, siglip_rows_loss
from .registry import register_loss


class Objective(nn.Module):
    """Base class: holds the ordered modality names the objective aligns.

    ``needs_bias``: the model must carry a learnable logit bias. ``needs_features``: modalities whose tower features
    (before projection) the training loop passes to forward as ``frozen_features={name: B x D tensor}``.
    """

    min_modalities = 2
    needs_bias = False
    needs_features: tuple[str, ...] = ()

    def __init__(self, modalities: list[str]):
        super().__init__()
        if len(modalities) < self.min_modalities:
            raise ConfigError(
                f"loss {type(self).__name__} needs at least {self.min_modalities} modalities, got {modalities}"
            )
        self.modalities = list(modalities)


@register_loss("clip")
class ClipObjective(Objective):
    """CLIP InfoNCE; with M > 2 modalities, the mean over all pairs (the pairwise baseline for Symile/GRAM)."""

    def forward(self, embeddings: dict[str, torch.Tensor], logit_scale: torch.Tensor, **_) -> dict[str, torch.Tensor]:
        gathered = {m: gather_with_grad(embeddings[m]) for m in self.modalities}
        offset = rank() * embeddings[self.modalities[0]].shape[0]
        out: dict[str, torch.Tensor] = {}
        for m1, m2 in combinations(self.modalities, 2):
            out[f"loss_{m1}_{m2}"] = clip_rows_loss(
                embeddings[m1], embeddings[m2], gathered[m1], gathered[m2], logit_scale, offset
            )
        out["loss"] = torch.stack(list(out.values())).mean()
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
            out[f"loss_{m1}_{m2}"] = siglip_rows_loss(embeddings[m1], b_all, logit_scale, logit_bias, offset)
        out["loss"] = torch.stack(list(out.values())).mean()
        return out
