"""A matching head: does a tuple of embeddings (anchor, other modalities) belong together?

GRAM (Cicchetti et al., ICLR 2025) trains, next to its volume contrast, a data-anchor matching (DAM) term: a binary
classifier over (anchor, tuple) pairs, each positive pair contrasted with two hard negatives drawn by volume (the
anchor with another sample's tuple, another sample's anchor with the tuple; see
``mmalign.losses.multimodal.volume_hard_negatives``), weighted by ``itm_ratio``. At evaluation it re-ranks the
top candidates of a volume ranking. GRAM's classifier reads the [CLS] token of a BERT fusion encoder; this head reads
the concatenated embeddings instead (the towers stay independent), through the same two-layer classifier:
Linear -> GELU -> LayerNorm -> Linear to two logits (no match, match).
"""
from __future__ import annotations

import torch
from torch import nn


class MatchingHead(nn.Module):
    """Two-way logits (no match, match) for tuples of ``n_inputs`` embeddings of width ``embed_dim``."""

    def __init__(self, embed_dim: int, n_inputs: int, hidden: int | None = None):
        super().__init__()
        width = embed_dim * n_inputs
        hidden = hidden or width
        self.n_inputs = n_inputs
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, 2))

    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """``embeddings``: ``n_inputs`` tensors N x D, in the head's order. Returns N x 2 logits."""
        if len(embeddings) != self.n_inputs:
            raise ValueError(f"the matching head reads {self.n_inputs} embeddings, got {len(embeddings)}")
        return self.mlp(torch.cat(embeddings, dim=-1))

    def match_probability(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """P(match) of each tuple: softmax over the two logits, the second one (GRAM's re-ranking score). N."""
        return self(embeddings).float().softmax(dim=-1)[:, 1]
