"""Small building blocks shared by towers of several kinds."""
from __future__ import annotations

import math

import torch


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """length x dim sine/cosine position codes (Vaswani et al. 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out
