"""Attentional pooling (CoCa, Yu et al. 2022): a fixed number of learned queries cross-attend to a token sequence.

Same computation as open_clip's ``AttentionalPooler`` (LayerNorm on queries and keys, one multi-head attention),
plus an optional mask so sequences of different lengths (audio frames, time-series patches) can share a batch.
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries of width ``d_model`` attend to ``x``: B x N x context_dim -> B x n_queries x d_model.

    With ``n_queries=1`` it is a learned global pooling (the CoCa contrastive embedding); with e.g. 256 queries it
    compresses a tower's tokens into a fixed-size context for a caption decoder.
    """

    def __init__(self, d_model: int, context_dim: int, n_queries: int = 256, n_heads: int = 8):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(d_model, n_heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: B x N x context_dim tokens; mask: optional B x N, True (or 1) where a token is real, False for padding.

        Every row needs at least one real token. Returns B x n_queries x d_model.
        """
        kv = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        key_padding_mask = None if mask is None else ~mask.bool()
        return self.attn(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
