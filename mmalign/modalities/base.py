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

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModalityConfig, register_modality_config
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
        if cfg.optional:
            self.placeholder(train=True)  # fail at build time, not at the first incomplete batch

    def decode(self, data: bytes, ext: str) -> Any:
        """Bytes of one shard member -> item. Raise ``DataError`` with the reason for unusable input."""
        raise NotImplementedError

    def transform(self, item: Any, train: bool) -> Any:
        return item

    def collate(self, items: list) -> Any:
        return torch.stack(items)

    def placeholder(self, train: bool) -> Any:
        """The item collated in place of an absent one (samples lacking an ``optional`` modality).

        Shaped like ``transform``'s output, so it collates with real items and is a valid tower input; its embedding
        is never used (the model substitutes its learned missing embedding for absent rows). Kinds whose items have a
        fixed shape return zeros of that shape; a kind that cannot say cannot be optional.
        """
        raise ConfigError(
            f"modality {self.name!r} cannot be optional: kind {self.kind!r} defines no placeholder() for absent items"
        )

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


class ModalityAdapter(nn.Module):
    """Tower + projection head -> L2-normalised embeddings in the shared space.

    An ``optional`` modality also has a learned missing embedding (Symile, Saporta et al. 2024): rows whose presence
    flag is False get it instead of the tower's output, so every row has an embedding and the objectives can either
    contrast it like any other (``missing="learned"``) or drop those rows (``missing="drop"``).
    """

    def __init__(self, modality: Modality, embed_dim: int, cache_size: int = 200_000):
        super().__init__()
        cfg = modality.cfg
        self.tower = modality.build_tower()
        self.proj = build_projection(cfg.proj, self.tower.out_dim, embed_dim, cfg.proj_hidden)
        self.missing = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0)) if cfg.optional else None
        self.fully_locked = cfg.lock and cfg.unlocked_layers == 0 and not cfg.unlock_norms
        if cfg.lock:
            lock_tower(self.tower, cfg.unlocked_layers, cfg.unlock_norms)
        self.cache_frozen = cfg.cache_frozen and self.fully_locked
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
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
        keys = _row_keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            unique = list(dict.fromkeys(keys[i] for i in missing))
            first = [keys.index(k) for k in unique]
            feats = self.tower(_rows(inputs, torch.tensor(first)))
            for k, f in zip(unique, feats):
                self._cache[k] = f.detach()
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return torch.stack([self._cache[k] for k in keys])

    def embed(self, inputs: Any) -> torch.Tensor:
        return F.normalize(self.proj(self.tower_features(inputs)), dim=-1)

    def forward(self, inputs: Any, present: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of every row; with ``present`` (B booleans), absent rows get the learned missing embedding.

        The tower sees only the present rows, so placeholders never enter normalisation statistics. With none
        present it still runs on one placeholder whose output is discarded: every parameter stays in the autograd
        graph (with zero gradient), as DistributedDataParallel requires on every rank and step.
        """
        if self.missing is None or present is None:
            return self.embed(inputs)
        present = present.to(device=self.missing.device, dtype=torch.bool)
        index = present.nonzero().squeeze(1) if bool(present.any()) else present.new_zeros(1, dtype=torch.long)
        rows = self.embed(_rows(inputs, index))
        placed = rows.new_zeros(present.shape[0], rows.shape[1]).index_copy(0, index, rows)
        missing = F.normalize(self.missing, dim=0).to(rows.dtype)
        return torch.where(present[:, None], placed, missing)
