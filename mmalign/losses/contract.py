"""The contract between the model and the objectives: what an objective needs, and what the model gives it.

An objective declares its needs once (:class:`Requirements`); the training setup checks them against the recipe and
asks the model for exactly that. ``AlignmentModel.forward`` returns one :class:`AlignmentOutput` (in the spirit of
HF ``ModelOutput``), which every objective takes together with the logit scale (and bias).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class Requirements:
    """What an objective needs from the model and the data.

    ``logit_bias``: a learnable logit bias (SigLIP). ``features``: modalities whose tower outputs before projection
    the objective reads (``AlignmentOutput.frozen_features``, e.g. CWCL's soft targets). ``captions``: caption
    logits and targets from a caption decoder (CoCa). ``presence``: takes presence masks, so it can train models with
    optional modalities. ``nway_score``: how a model trained with it scores a tuple of modalities against a
    candidate (a name in ``mmalign.eval.nway.NWAY_SCORES``). ``matching``: the modalities, in the order it reads
    them, of the tuples a matching head classifies (GRAM's data-anchor matching): the model gets one.
    """

    logit_bias: bool = False
    features: tuple[str, ...] = ()
    captions: bool = False
    presence: bool = False
    nway_score: str = "cosine"
    matching: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionTargets:
    """A caption decoder's next-token logits B x T x V and their targets B x T (``labels[b, t]`` is the target of
    ``logits[b, t]``); positions to ignore hold ``pad_id``."""

    logits: torch.Tensor
    labels: torch.Tensor
    pad_id: int


@dataclass(frozen=True)
class AlignmentOutput:
    """What the model computes for a batch.

    ``embeddings``: B x D per modality the batch carries, normalised as the modality's ``output_norm`` says (unit
    length by default). ``present``: the presence masks (B booleans)
    of the model's optional modalities, None when it has none (which masks are given depends only on the model, so
    every process makes the same collective calls in the loss). ``frozen_features``: tower outputs before projection
    of the modalities asked for (``Requirements.features``), from the same pass. ``caption``: the caption decoder's
    logits and targets, for a captioning model whose batch carries both the captioned modality and the text.
    ``matching``: the model's matching head (``heads.MatchingHead``: a list of N x D embeddings in
    ``Requirements.matching`` order -> N x 2 logits), for an objective that trains it; None when it has none.
    """

    embeddings: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor] | None = None
    frozen_features: dict[str, torch.Tensor] = field(default_factory=dict)
    caption: CaptionTargets | None = None
    matching: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def float(self) -> AlignmentOutput:
        """Embeddings and features in float32 (what the objectives compute in, whatever the autocast dtype)."""
        return replace(self, embeddings={k: v.float() for k, v in self.embeddings.items()},
                       frozen_features={k: v.float() for k, v in self.frozen_features.items()})

    @staticmethod
    def cat(parts: list[AlignmentOutput]) -> AlignmentOutput:
        """The output of a batch from the outputs of its row chunks, in order (no caption targets)."""
        if any(p.caption is not None for p in parts):
            raise ValueError("caption targets cannot be concatenated over chunks")

        def cat(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}

        first = parts[0]
        return AlignmentOutput(cat([p.embeddings for p in parts]),
                               None if first.present is None else cat([p.present for p in parts]),
                               cat([p.frozen_features for p in parts]), matching=first.matching)
