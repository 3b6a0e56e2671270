"""Small building blocks shared by towers of several kinds."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """length x dim sine/cosine position codes (Vaswani et al. 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out


def norm_layer(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """The normalisation of a convolutional tower: ``batch`` (BatchNorm over ``dims`` spatial dims) or ``group``
    (GroupNorm, 8 groups at most). BatchNorm mixes the rows of a batch, so its statistics differ per process and per
    GradCache chunk; GroupNorm normalises each row alone."""
    if kind == "batch":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ConfigError(f"norm must be 'batch' or 'group', got {kind!r}")
