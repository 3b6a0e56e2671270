"""Time series preprocessing, in the order the modality applies it: voltages to mV, lead selection and reordering
by name (missing leads zero-filled and masked), resampling to the tower's rate (polyphase, scipy), optional
zero-phase Butterworth band-pass, a fixed-length window (random in training, centred in evaluation), per-lead
standardisation, then (training only) the augmentations of ECG contrastive work (Kiyasseh et al. 2021 "CLOCS", Gopal
et al. 2021 "3KG"): amplitude scaling, baseline wander, Gaussian noise, lead dropout and time masking.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from ..modality_config import TimeseriesAugment
from .signals import Signal

TO_MILLIVOLT = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6}


def to_millivolts(sig: Signal) -> np.ndarray:
    """float32 copy of the data with voltage channels (V, mV, uV, nV) in mV; other units are left as they are."""
    data = sig.data.astype(np.float32)
    for i, unit in enumerate(sig.units or ()):
        factor = TO_MILLIVOLT.get(unit.strip().lower())
        if factor is not None and factor != 1.0:
            data[i] *= factor
    return data


def select_leads(data: np.ndarray, leads: Optional[tuple], wanted: Optional[tuple], n_channels: int,
                 missing: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``data`` in the order of ``wanted`` (names, any case) and a presence mask.

    Without ``wanted`` (or without names in the record) channels are taken in stored order and must number
    ``n_channels``. A wanted lead the record lacks is zero-filled and masked, or an error when ``missing="error"``.
    """
    if wanted is None or leads is None:
        if data.shape[0] != n_channels:
            named = f" ({', '.join(leads)})" if leads else ""
            hint = "" if wanted is None else " and no lead names to select by"
            raise DataError(f"signal has {data.shape[0]} channels{named}{hint}; the modality expects {n_channels}")
        return data, np.ones(n_channels, dtype=bool)
    index = {name.lower(): i for i, name in enumerate(leads)}
    rows = [index.get(name.lower()) for name in wanted]
    absent = [name for name, r in zip(wanted, rows) if r is None]
    if len(absent) == len(wanted):
        raise DataError(f"none of the leads {', '.join(wanted)} is in the record (it has {', '.join(leads)})")
    if absent and missing == "error":
        raise DataError(f"missing lead(s) {', '.join(absent)} (record has {', '.join(leads)})")
    out = np.zeros((len(wanted), data.shape[1]), dtype=data.dtype)
    mask = np.array([r is not None for r in rows])
    for j, r in enumerate(rows):
        if r is not None:
            out[j] = data[r]
    return out, mask


def resample(data: np.ndarray, rate: float, target: float) -> np.ndarray:
    """Polyphase resampling along time (anti-aliased), ``rate`` -> ``target`` Hz as a ratio of small integers."""
    if rate == target:
        return data
    if not 1e-3 <= target / rate <= 1e3:
        raise DataError(f"sampling rate {rate:g} Hz is too far from the tower's {target:g} Hz to resample")
    from scipy.signal import resample_poly

    ratio = Fraction(target / rate).limit_denominator(1000)
    return resample_poly(data, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def bandpass_sos(low: Optional[float], high: Optional[float], rate: float, order: int = 2) -> np.ndarray:
    """Butterworth second-order sections: band-pass, or high-/low-pass when one edge is None."""
    from scipy.signal import butter

    if low and high:
        return butter(order, [low, high], btype="bandpass", fs=rate, output="sos")
    if low:
        return butter(order, low, btype="highpass", fs=rate, output="sos")
    return butter(order, high, btype="lowpass", fs=rate, output="sos")


def crop(data: np.ndarray, length: int, train: bool) -> np.ndarray:
    """A ``length``-sample window: uniformly random start in training, centred in evaluation."""
    extra = data.shape[-1] - length
    start = random.randint(0, extra) if train else extra // 2
    return data[..., start:start + length]


def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per lead (row): (x - mean) / std; flat leads become zeros."""
    centred = x - x.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))


def augment(x: torch.Tensor, mask: torch.Tensor, aug: TimeseriesAugment, rate: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scaling, baseline wander, noise, time masking and lead dropout (torch's default generator)."""
    C, T = x.shape
    if aug.scale:
        low, high = aug.scale
        x = x * (low + (high - low) * torch.rand(C, 1))
    if aug.baseline_wander > 0:
        t = torch.arange(T) / rate
        freq, phase = 0.05 + 0.45 * torch.rand(C, 1), 2 * math.pi * torch.rand(C, 1)
        x = x + aug.baseline_wander * torch.rand(C, 1) * torch.sin(2 * math.pi * freq * t + phase)
    if aug.noise > 0:
        x = x + aug.noise * torch.randn(C, T)
    if aug.time_mask > 0:
        span = int(torch.rand(()).item() * aug.time_mask * T)
        start = int(torch.randint(0, T - span + 1, ()).item())
        x = x.clone()
        x[:, start:start + span] = 0
    if aug.lead_dropout > 0:
        drop = (torch.rand(C) < aug.lead_dropout) & mask
        if drop.sum() == mask.sum():  # keep one present lead
            present = mask.nonzero().flatten()
            drop[present[torch.randint(len(present), ())]] = False
        mask = mask & ~drop
    return x * mask[:, None], mask
