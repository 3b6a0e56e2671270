"""Features of a frozen tower, cached per distinct input and shared by every adapter of this process whose frozen
tower is identical (same config and weights) and computes in the same precision (device, autocast dtype), so
repeated runs (seeds, comparisons) encode each input once."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..config import to_dict
from ..modality_config import ModalityConfig
from .inputs import select_rows

# This process's caches, one per distinct frozen tower, device and autocast dtype (see ``shared_cache``).
_FROZEN_CACHES: dict[str, OrderedDict] = {}


def frozen_tower_fingerprint(cfg: ModalityConfig, tower: nn.Module) -> str:
    """Hash of a tower's modality config and weights: equal fingerprints compute the same features (in eval mode)."""
    h = hashlib.blake2b(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode(), digest_size=16)
    for name, t in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shared_cache(fingerprint: str, tower: nn.Module) -> OrderedDict:
    """The cache (input row bytes -> feature) of the frozen tower with this fingerprint, on its device and in the
    precision it computes in now: under autocast its features are those of the autocast dtype (a bf16 run's
    features differ from a float32 run's by ~1e-3), so each precision has a cache of its own."""
    device = next(tower.parameters()).device
    precision = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else "no autocast"
    return _FROZEN_CACHES.setdefault(f"{fingerprint}:{device}:{precision}", OrderedDict())


def row_keys(inputs: Any) -> list[bytes]:
    """One key per input row: a 128-bit digest of the bytes of its tensors (of every key, in sorted order), so the
    cache holds 16 bytes per input, not the input (an image's pixels)."""
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [inputs[k] for k in sorted(inputs)]
    flat = [t.detach().reshape(t.shape[0], -1).cpu().numpy() for t in tensors]
    keys = []
    for i in range(flat[0].shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for f in flat:
            h.update(f[i].tobytes())
        keys.append(h.digest())
    return keys


def cached_features(cache: OrderedDict, tower: nn.Module, inputs: Any, max_size: int) -> torch.Tensor:
    """``tower(inputs)`` (call without gradient), encoding only the distinct rows not yet in ``cache``; the cache
    keeps at most ``max_size`` rows, dropping the oldest."""
    keys = row_keys(inputs)
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        unique = list(dict.fromkeys(keys[i] for i in missing))
        first = [keys.index(k) for k in unique]
        feats = tower(select_rows(inputs, torch.tensor(first)))
        for k, f in zip(unique, feats):
            cache[k] = f.detach().float()  # one dtype whether or not a run uses autocast
        while len(cache) > max_size:
            cache.popitem(last=False)
    return torch.stack([cache[k] for k in keys])
