"""``ModalityAdapter``: any tower -> embeddings in the shared space (unit length, or as ``output_norm`` says).

It wraps a tower with a projection head to the shared dimension (or, for the captioned modality of a CoCa model, with
the head of ``coca.py``), applies locking or LoRA (``tuning.py``), averages the rows of one item (``inputs.py``) and
caches a frozen tower's outputs on request (``frozen_cache.py``). Nothing here knows which modality it serves.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .coca import check_context_tower, coca_head
from .frozen_cache import cached_features, frozen_tower_fingerprint, shared_cache
from .inputs import mean_by_owner, place_rows, select_items, split_owner
from .registry import Modality
from .tuning import add_lora, lock_tower, unlock


def build_projection(kind: str, in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        hidden = hidden or max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    if kind == "none":
        if in_dim != out_dim:
            raise ConfigError(f"proj: none needs the tower's output ({in_dim}) to equal embed_dim ({out_dim})")
        return nn.Identity()
    raise ConfigError(f"unknown projection {kind!r}; use linear, mlp or none")


class ModalityAdapter(nn.Module):
    """Tower + projection head -> embeddings in the shared space, normalised as ``output_norm`` says (unit length by
    default).

    An input dict may carry ``owner`` (several rows of one item, e.g. the windows of a long caption): the tower
    encodes every row and the item's feature is the mean over its rows.

    With ``coca`` (``{"context_dim", "n_queries", "n_heads"}``) the head is instead a ``CocaHead`` on the tower's
    tokens: its one-query pooler gives the embedding and its ``n_queries`` pooler the context a caption decoder
    reads (``embed_with_context``). With ``n_queries`` 0 the tower pools itself: the embedding is its pooled output
    through the projection, the context its tokens as they are (``forward_pooled_tokens``, one pass).

    An ``optional`` modality also has a learned missing embedding (Symile, Saporta et al. 2024): items whose presence
    flag is False get it instead of the tower's output, so every row has an embedding and the objectives can either
    contrast it like any other (``missing="learned"``) or drop those rows (``missing="drop"``).
    """

    def __init__(self, modality: Modality, embed_dim: int, cache_size: int = 200_000, coca: dict | None = None):
        super().__init__()
        cfg = modality.cfg
        self.modality_cfg = cfg
        tower = modality.build_tower()
        self.proj, self.coca_head = None, None
        if coca is not None:
            check_context_tower(tower, modality, coca)
            self.coca_head = coca_head(tower, embed_dim, coca)
        if self.coca_head is None:
            self.proj = build_projection(cfg.proj, tower.out_dim, embed_dim, cfg.proj_hidden)
        self.fully_locked = cfg.fully_locked
        if cfg.lora is not None:
            tower = add_lora(tower, cfg.lora)
            unlock(tower, cfg.unlocked_layers, cfg.unlock_norms)
        elif cfg.lock:
            lock_tower(tower, cfg.unlocked_layers, cfg.unlock_norms)
        self.tower = tower
        self.output_norm = cfg.output_norm
        self.layer_norm = nn.LayerNorm(embed_dim) if cfg.output_norm == "layernorm" else None
        self.missing = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0)) if cfg.optional else None
        self.cache_frozen = cfg.caches_features
        self._fingerprint: str | None = None  # of the frozen tower, taken at first use, once weights are loaded
        self._cache_size = cache_size

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The projected rows as embeddings: unit length (``output_norm: l2``), through a LayerNorm (``layernorm``,
        as Symile's real-data models) or as they are (``none``)."""
        if self.layer_norm is not None:
            return self.layer_norm(x)
        return F.normalize(x, dim=-1) if self.output_norm == "l2" else x

    def train(self, mode: bool = True) -> "ModalityAdapter":
        super().train(mode)
        if self.fully_locked:
            self.tower.eval()  # frozen towers keep eval behaviour (dropout off, norm statistics fixed)
        return self

    def tower_features(self, inputs: Any) -> torch.Tensor:
        inputs, owner = split_owner(inputs)
        if not self.fully_locked:
            features = self.tower(inputs)
        else:
            with torch.no_grad():
                features = self._cached_features(inputs) if self.cache_frozen else self.tower(inputs)
        return features if owner is None else mean_by_owner(features, owner)

    def tower_tokens(self, inputs: Any, pooled: bool = False) -> tuple:
        """``tower.forward_tokens`` (or ``forward_pooled_tokens``), without gradient for a locked tower."""
        fn = self.tower.forward_pooled_tokens if pooled else self.tower.forward_tokens
        if not self.fully_locked:
            return fn(inputs)
        with torch.no_grad():
            return fn(inputs)

    def _cached_features(self, inputs: Any) -> torch.Tensor:
        """Features per distinct input, from the cache shared by every identical frozen tower of this process."""
        if self._fingerprint is None:
            self._fingerprint = frozen_tower_fingerprint(self.modality_cfg, self.tower)
        return cached_features(shared_cache(self._fingerprint, self.tower), self.tower, inputs, self._cache_size)

    def forward(
        self, inputs: Any, return_features: bool = False, present: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings; with ``return_features`` also the tower's output before projection (same pass).

        With ``present`` (one flag per item) and a missing embedding (``optional`` modality), absent items get the
        learned missing embedding (and zero features). The tower sees only the present items, so placeholders never
        enter normalisation statistics; with none present it still runs on one placeholder whose output is
        discarded, so every parameter stays in the autograd graph (as DistributedDataParallel requires).
        """
        if self.coca_head is not None:
            if return_features:
                raise ConfigError("a tower read through a CoCa head gives tokens, not pooled features to return")
            return self.normalise(self.coca_head.embed(*self.tower_tokens(inputs)))
        index = None
        if self.missing is not None and present is not None:
            present = present.to(device=self.missing.device, dtype=torch.bool)
            index = present.nonzero().squeeze(1) if bool(present.any()) else present.new_zeros(1, dtype=torch.long)
            inputs = select_items(inputs, index)
        features = self.tower_features(inputs)
        embeddings = self.normalise(self.proj(features))
        if index is not None:
            embeddings = place_rows(embeddings, index, present, self.normalise(self.missing[None])[0])
            features = place_rows(features, index, present, features.new_zeros(()))
        return (embeddings, features) if return_features else embeddings

    def embed_with_context(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embedding B x D, caption context B x N x context_dim) from one pass of the tower."""
        if self.coca_head is None:  # the tower pools itself
            pooled, tokens, _ = self.tower_tokens(inputs, pooled=True)
            return self.normalise(self.proj(pooled)), tokens
        out = self.coca_head(*self.tower_tokens(inputs))
        return self.normalise(out["embedding"]), out["context"]

    def caption(self, inputs: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption decoder towers: (normalised text embedding B x D, logits B x T x V) in one pass."""
        features, logits = self.tower.caption(inputs, context)
        return self.normalise(self.proj(features)), logits
