"""Time series modality (ECG, EEG, sensors): records from ``npy`` + ``json`` members (``signals.py``), preprocessed
and augmented (``signal_transforms.py``) into a batch ``{"signal": B x C x T, "mask": B x C}`` (True = lead present)
for 1-D towers (``timeseries_towers.py``).

``mmalign data shards`` packs ``.npy`` files (metadata from a ``<stem>.json`` beside them), WFDB records (their
``.hea`` header) and signal CSVs (a header of channel names, optionally a first ``time`` column in seconds) into those
two members (``file_members``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..modality_config import TimeseriesConfig
from ..optional import require
from .registry import Modality, register_modality
from .signal_transforms import augment, bandpass_sos, crop, resample, select_leads, standardize, to_millivolts
from .signals import Signal, decode_signal_member, encode_signal, read_signal_file


def channel_count(cfg: TimeseriesConfig) -> int:
    return len(cfg.leads) if cfg.leads else cfg.channels


@register_modality
class TimeseriesModality(Modality):
    kind = "timeseries"
    extensions = ("npy",)
    file_extensions = ("hea", "csv")
    config_class = TimeseriesConfig
    default_tower = "resnet1d"

    def __init__(self, name: str, cfg: TimeseriesConfig):
        super().__init__(name, cfg)
        require("scipy.signal", "timeseries", f"time series modality {name!r}")
        _validate(name, cfg)
        self.window = int(round(cfg.window_s * cfg.sample_rate))
        self.sos = bandpass_sos(*cfg.bandpass, cfg.sample_rate) if cfg.bandpass else None

    @classmethod
    def file_members(cls, path: Path) -> dict[str, bytes]:
        return encode_signal(read_signal_file(path))

    def decode_member(self, sample: dict, key: str) -> Signal:
        return decode_signal_member(sample, key)

    def transform(self, sig: Signal, train: bool) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        data, mask = select_leads(to_millivolts(sig), sig.leads, cfg.leads, channel_count(cfg), cfg.missing_leads)
        bad = ~np.isfinite(data).all(axis=1)
        if bad.any():
            names = cfg.leads or sig.leads or [f"channel {i}" for i in range(len(bad))]
            lead = names[int(bad.argmax())]
            raise DataError(f"signal has NaN/inf values (lead {lead}, {int((~np.isfinite(data)).sum())} samples)")
        data = resample(data, sig.rate, cfg.sample_rate)
        if data.shape[-1] < self.window:
            raise DataError(f"signal too short: {sig.data.shape[-1] / sig.rate:.2f} s, the window is "
                            f"{cfg.window_s:g} s")
        if self.sos is not None:
            from scipy.signal import sosfiltfilt

            try:
                data = sosfiltfilt(self.sos, data, axis=-1)
            except ValueError as e:
                raise DataError(f"cannot band-pass {data.shape[-1]} samples ({e})") from None
        x = torch.from_numpy(np.ascontiguousarray(crop(data, self.window, train), dtype=np.float32))
        mask_t = torch.from_numpy(mask)
        if cfg.standardize:
            x = standardize(x)
        if train:
            x, mask_t = augment(x, mask_t, cfg.augment, cfg.sample_rate)
        if not torch.isfinite(x).all():
            raise DataError("signal values overflow float32 after preprocessing")
        return {"signal": x * mask_t[:, None], "mask": mask_t}

    def placeholder(self, train: bool) -> dict[str, torch.Tensor]:
        """A flat window with every lead masked (channels x window zeros, mask 0)."""
        n = channel_count(self.cfg)
        return {"signal": torch.zeros(n, self.window), "mask": torch.zeros(n, dtype=torch.bool)}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {"signal": torch.stack([i["signal"] for i in items]), "mask": torch.stack([i["mask"] for i in items])}


def _validate(name: str, cfg: TimeseriesConfig) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"modality {name!r}: {message}")

    if cfg.leads is not None:
        if not cfg.leads or not all(isinstance(n, str) and n.strip() for n in cfg.leads):
            fail(f"leads must be a non-empty list of names, got {cfg.leads!r}")
        if len({n.lower() for n in cfg.leads}) != len(cfg.leads):
            fail(f"leads has duplicate names: {list(cfg.leads)}")
        if cfg.channels not in (0, len(cfg.leads)):
            fail(f"channels={cfg.channels} disagrees with the {len(cfg.leads)} leads named")
    elif cfg.channels < 1:
        fail("set leads (channel names in the tower's order) or channels (a count)")
    if cfg.missing_leads not in ("mask", "error"):
        fail(f"missing_leads must be mask or error, got {cfg.missing_leads!r}")
    if cfg.bandpass is not None:
        if len(cfg.bandpass) != 2 or not any(cfg.bandpass):
            fail(f"bandpass must be [low, high] Hz (one may be null), got {list(cfg.bandpass)}")
        low, high = cfg.bandpass
        if (low is not None and low <= 0) or (high is not None and not 0 < high < cfg.sample_rate / 2) or (
                low and high and low >= high):
            fail(f"bandpass {list(cfg.bandpass)} must satisfy 0 < low < high < sample_rate/2 = {cfg.sample_rate / 2:g}")
    aug = cfg.augment
    if aug.scale is not None and aug.scale[0] > aug.scale[1]:
        fail(f"augment.scale must be [low, high] with low <= high, got {aug.scale!r}")
