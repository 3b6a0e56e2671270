"""The modality interface and the adapter that turns any tower into normalised embeddings.

A modality has two halves:

* ``Modality`` (CPU side, picklable, runs in DataLoader workers): decode bytes from a shard, train/eval
  transforms, collate a list of items into a batch, and (for text) tokenise.
* A tower (``nn.Module`` with an ``out_dim`` attribute, ``forward(batch) -> B x out_dim``) built by a builder from
  the modality's tower registry.

``ModalityAdapter`` wraps a tower with a projection head to the shared dimension, applies LiT-style locking and
caches a frozen tower's outputs on request. Nothing here knows which modality it serves.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModalityConfig, register_modality_config, to_dict
from ..errors import ConfigError, closest

log = logging.getLogger(__name__)

MODALITIES: dict[str, type["Modality"]] = {}
TowerBuilder = Callable[[ModalityConfig], nn.Module]


class Modality:
    """CPU side of a modality. Subclasses set ``kind``, ``extensions``, ``config_class`` and override the hooks."""

    kind: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[ModalityConfig]] = ModalityConfig
    towers: ClassVar[dict[str, TowerBuilder]]
    default_tower: ClassVar[str]

    def __init__(self, name: str, cfg: ModalityConfig):
        self.name = name
        self.cfg = cfg
        if not cfg.tower:
            cfg.tower = self.default_tower
        if cfg.tower not in self.towers:
            raise ConfigError(
                f"modality {name!r}: unknown {self.kind} tower {cfg.tower!r}{closest(cfg.tower, self.towers)}; "
                f"known: {', '.join(sorted(self.towers))}"
            )

    def decode(self, data: bytes, ext: str) -> Any:
        """Bytes of one shard member -> item. Raise ``DataError`` with the reason for unusable input."""
        raise NotImplementedError

    def transform(self, item: Any, train: bool) -> Any:
        return item

    def collate(self, items: list) -> Any:
        return torch.stack(items)

    def build_tower(self) -> nn.Module:
        return self.towers[self.cfg.tower](self.cfg)

    def save_assets(self, tower: nn.Module, directory: Path) -> dict:
        """Write what is needed to rebuild the tower without its original source (tokenizer, HF config).

        Returns updates to this modality's config in the saved model (paths relative to the model folder).
        """
        return {}


def register_modality(cls: type[Modality]) -> type[Modality]:
    MODALITIES[cls.kind] = cls
    register_modality_config(cls.kind, cls.config_class)
    return cls


def register_tower(modality_cls: type[Modality], name: str) -> Callable[[TowerBuilder], TowerBuilder]:
    def add(fn: TowerBuilder) -> TowerBuilder:
        modality_cls.towers[name] = fn
        return fn

    return add


def build_modality(name: str, cfg: ModalityConfig) -> Modality:
    if cfg.kind not in MODALITIES:
        raise ConfigError(f"unknown modality kind {cfg.kind!r}{closest(cfg.kind, MODALITIES)}")
    return MODALITIES[cfg.kind](name, cfg)


# --------------------------------------------------------------------------------------------------- adapter

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def tower_blocks(tower: nn.Module) -> nn.ModuleList | None:
    """The tower's sequence of blocks (transformer layers, CNN stages): its longest ``nn.ModuleList``/Sequential."""
    if hasattr(tower, "blocks") and isinstance(tower.blocks, (nn.ModuleList, nn.Sequential)):
        return tower.blocks
    best = None
    for module in tower.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > (len(best) if best is not None else 1):
            best = module
    return best


def lock_tower(tower: nn.Module, unlocked_layers: int = 0, unlock_norms: bool = False) -> None:
    """LiT locking: freeze every parameter, then unfreeze the last ``unlocked_layers`` blocks and/or all norms."""
    for p in tower.parameters():
        p.requires_grad_(False)
    if unlocked_layers > 0:
        blocks = tower_blocks(tower)
        if blocks is None:
            raise ConfigError(f"cannot unlock {unlocked_layers} layers: {type(tower).__name__} has no block list")
        for block in list(blocks)[-unlocked_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
    if unlock_norms:
        for module in tower.modules():
            if isinstance(module, NORM_TYPES):
                for p in module.parameters():
                    p.requires_grad_(True)


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


def _rows(inputs: Any, index: torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def _row_keys(inputs: Any) -> list[bytes]:
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [inputs[k] for k in sorted(inputs)]
    flat = [t.detach().reshape(t.shape[0], -1).cpu().numpy() for t in tensors]
    return [b"".join(f[i].tobytes() for f in flat) for i in range(flat[0].shape[0])]


# Frozen-feature caches of this process, one per distinct frozen tower (see ``frozen_tower_fingerprint``).
_FROZEN_CACHES: dict[str, OrderedDict] = {}


def frozen_tower_fingerprint(cfg: ModalityConfig, tower: nn.Module) -> str:
    """Hash of a tower's modality config and weights: equal fingerprints compute the same features (in eval mode)."""
    h = hashlib.blake2b(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode(), digest_size=16)
    for name, t in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ModalityAdapter(nn.Module):
    """Tower + projection head -> L2-normalised embeddings in the shared space."""

    def __init__(self, modality: Modality, embed_dim: int, cache_size: int = 200_000):
        super().__init__()
        cfg = modality.cfg
        self.modality_cfg = cfg
        self.tower = modality.build_tower()
        self.proj = build_projection(cfg.proj, self.tower.out_dim, embed_dim, cfg.proj_hidden)
        self.fully_locked = cfg.lock and cfg.unlocked_layers == 0 and not cfg.unlock_norms
        if cfg.lock:
            lock_tower(self.tower, cfg.unlocked_layers, cfg.unlock_norms)
        self.cache_frozen = cfg.cache_frozen and self.fully_locked
        self._cache: OrderedDict[bytes, torch.Tensor] | None = None  # chosen at first use, once weights are loaded
        self._cache_size = cache_size

    def train(self, mode: bool = True) -> "ModalityAdapter":
        super().train(mode)
        if self.fully_locked:
            self.tower.eval()  # frozen towers keep eval behaviour (dropout off, norm statistics fixed)
        return self

    def tower_features(self, inputs: Any) -> torch.Tensor:
        if not self.fully_locked:
            return self.tower(inputs)
        with torch.no_grad():
            if not self.cache_frozen:
                return self.tower(inputs)
            return self._cached_features(inputs)

    def _cached_features(self, inputs: Any) -> torch.Tensor:
        """Features per distinct input, cached; the cache is shared by every adapter of this process whose frozen
        tower is identical (same config and weights), so repeated runs (seeds, comparisons) encode each input once."""
        if self._cache is None:
            device = next(self.tower.parameters()).device
            key = f"{frozen_tower_fingerprint(self.modality_cfg, self.tower)}:{device}"
            self._cache = _FROZEN_CACHES.setdefault(key, OrderedDict())
        keys = _row_keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            unique = list(dict.fromkeys(keys[i] for i in missing))
            first = [keys.index(k) for k in unique]
            feats = self.tower(_rows(inputs, torch.tensor(first)))
            for k, f in zip(unique, feats):
                self._cache[k] = f.detach().float()  # one dtype whether or not a run uses autocast
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return torch.stack([self._cache[k] for k in keys])

    def forward(self, inputs: Any, return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings; with ``return_features`` also the tower's output before projection (same pass)."""
        features = self.tower_features(inputs)
        embeddings = F.normalize(self.proj(features), dim=-1)
        return (embeddings, features) if return_features else embeddings
