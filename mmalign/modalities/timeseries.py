"""Time series modality (ECG, EEG, sensors): ``npy`` + ``json`` members, preprocessing, augmentations, 1-D towers.

A sample holds ``<name>.npy`` (channels x time, any numeric dtype) and ``<name>.json`` (``sampling_rate`` in Hz,
optional ``leads`` (one name per channel) and ``units`` (one string, or one per channel)). ``mmalign data shards``
packs ``.npy`` files (metadata from a ``<stem>.json`` beside them), WFDB records (their ``.hea`` header) and signal
CSVs (a header of channel names, optionally a first ``time`` column in seconds) into those two members.

Preprocessing, in order: voltages to mV, lead selection and reordering by name (missing leads zero-filled and
masked), resampling to the tower's rate (polyphase, scipy), optional zero-phase Butterworth band-pass, a fixed-length
window (random in training, centred in evaluation), per-lead standardisation, then (training only) the augmentations
of ECG contrastive work (Kiyasseh et al. 2021 "CLOCS", Gopal et al. 2021 "3KG"): amplitude scaling, baseline wander,
Gaussian noise, lead dropout and time masking. A batch is ``{"signal": B x C x T, "mask": B x C}`` (True = lead
present).

Towers: ``resnet1d`` (a 1-D ResNet) and ``patch_transformer`` (per-lead patches with lead and position embeddings,
missing leads left out of attention), both from scratch for any channel count, or from a local checkpoint
(``pretrained``: a safetensors file or a torch state dict, read with ``weights_only=True``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import ModalityConfig
from ..errors import ConfigError, DataError
from ..optional import require
from .base import Modality, register_modality, register_tower, sinusoidal_positions

TO_MILLIVOLT = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6}
TIME_COLUMNS = ("time", "t", "time_s", "seconds")


@dataclass
class TimeseriesAugment:
    """Training-only augmentations, in standardised units (all off by default)."""

    scale: Optional[tuple] = None  # (low, high): per-lead amplitude factor drawn uniformly
    baseline_wander: float = 0.0  # largest amplitude of a 0.05-0.5 Hz sinusoid added per lead
    noise: float = 0.0  # standard deviation of added Gaussian noise
    lead_dropout: float = 0.0  # probability to zero (and mask) each present lead; one lead always stays
    time_mask: float = 0.0  # largest fraction of the window zeroed as one span across leads


@dataclass
class TimeseriesConfig(ModalityConfig):
    sample_rate: float = 100.0  # Hz the tower sees; records are resampled to it
    window_s: float = 10.0  # window length in seconds: random crop in training, centred in evaluation
    leads: Optional[tuple] = None  # channel names in the tower's order; records are reordered by name (any case)
    channels: int = 0  # channel count when `leads` is not given (records are then used in stored order)
    missing_leads: str = "mask"  # "mask": zero-fill and mask a requested lead a record lacks; "error": skip it
    standardize: bool = True  # per lead: zero mean, unit variance over the window
    bandpass: Optional[tuple] = None  # (low, high) Hz, either may be null (high-/low-pass): zero-phase Butterworth
    augment: TimeseriesAugment = field(default_factory=TimeseriesAugment)


@dataclass
class Signal:
    """A record as stored: ``data`` is channels x time at ``rate`` Hz, with optional per-channel names and units."""

    data: np.ndarray
    rate: float
    leads: Optional[tuple] = None
    units: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------- reading


def make_signal(data: np.ndarray, meta: dict, where: str = "") -> Signal:
    """Check an array (channels x time, or time for one channel) against its metadata; ``where`` prefixes errors."""
    if data.dtype.kind not in "fiu":
        raise DataError(f"{where}signal dtype {data.dtype} is not numeric")
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.size == 0:
        raise DataError(f"{where}signal has shape {tuple(data.shape)}; expected channels x time")
    rate = meta.get("sampling_rate")
    try:  # float() of a huge JSON integer overflows
        valid_rate = not isinstance(rate, bool) and isinstance(rate, (int, float)) and 0 < float(rate) < math.inf
    except OverflowError:
        valid_rate = False
    if not valid_rate:
        raise DataError(f"{where}metadata needs sampling_rate (a positive number of Hz), got {rate!r}")
    leads, units = meta.get("leads"), meta.get("units")
    if leads is not None:
        if not isinstance(leads, list) or not all(isinstance(n, str) and n.strip() for n in leads):
            raise DataError(f"{where}metadata leads must be a list of names, got {leads!r}")
        if len(leads) != data.shape[0]:
            raise DataError(f"{where}metadata names {len(leads)} leads but the signal has {data.shape[0]} channels "
                            f"(shape {tuple(data.shape)}; expected channels x time)")
        folded = [n.strip().lower() for n in leads]
        if len(set(folded)) != len(folded):
            raise DataError(f"{where}duplicate lead names in {leads}")
        leads = tuple(n.strip() for n in leads)
    if isinstance(units, str):
        units = [units] * data.shape[0]
    if units is not None:
        if not isinstance(units, list) or len(units) != data.shape[0] or not all(isinstance(u, str) for u in units):
            raise DataError(f"{where}metadata units must be one string or one per channel, got {units!r}")
        units = tuple(units)
    return Signal(data, float(rate), leads, units)


def _sidecar(path: Path) -> dict:
    side = path.with_suffix(".json")
    return _parse_json(side.read_bytes(), f"{side}: ") if side.is_file() else {}


def _load_npy(data: bytes, where: str) -> np.ndarray:
    """An npy file's array, read from its header and buffer (no allocation beyond what the bytes hold)."""
    from numpy.lib import format as npy

    buf = io.BytesIO(data)
    try:
        version = npy.read_magic(buf)
        read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported npy version {version}")
        shape, fortran, dtype = read_header(buf)
        array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=buf.tell())
        return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    except Exception as e:  # numpy's header parser fails in many ways on bad bytes (tokenize, syntax, value errors)
        raise DataError(f"{where}cannot read npy ({type(e).__name__}: {str(e)[:200]})") from None


def _parse_json(data: bytes | str, where: str) -> dict:
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError covers JSONDecodeError
        raise DataError(f"{where}invalid JSON ({str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}metadata must be a JSON object with sampling_rate, leads, units")
    return meta


def _read_wfdb(path: Path) -> Signal:
    wfdb = require("wfdb", "timeseries", f"{path}: reading a WFDB record")
    try:
        record = wfdb.rdrecord(str(path.with_suffix("")))
    except Exception as e:  # wfdb raises many types for bad headers or data files; all mean "unreadable record"
        raise DataError(f"{path}: cannot read WFDB record ({type(e).__name__}: {e})") from None
    if record.p_signal is None:
        raise DataError(f"{path}: WFDB record has no physical signal")
    meta = {"sampling_rate": float(record.fs), "leads": list(record.sig_name), "units": list(record.units)}
    return make_signal(record.p_signal.T.astype(np.float32), meta, f"{path}: ")


def _read_csv(path: Path, meta: dict) -> Signal:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: empty signal CSV")
    try:
        [float(c) for c in rows[0]]
        header = None
    except ValueError:
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: not a numeric table with one column per channel ({e})") from None
    if values.ndim != 2 or values.shape[0] < 2:
        raise DataError(f"{path}: expected at least two rows of samples, one column per channel")
    meta = dict(meta)
    if header and header[0].lower() in TIME_COLUMNS:
        step = float(np.median(np.diff(values[:, 0])))
        if step <= 0:
            raise DataError(f"{path}: the {header[0]!r} column does not increase")
        meta.setdefault("sampling_rate", round(1.0 / step, 6))  # 6 decimals: the text rounds the times
        values, header = values[:, 1:], header[1:]
    if header:
        meta.setdefault("leads", header)
    if "sampling_rate" not in meta:
        raise DataError(f"{path}: no sampling rate (add a first 'time' column in seconds, or {path.stem}.json "
                        f"with sampling_rate)")
    return make_signal(values.T.astype(np.float32), meta, f"{path}: ")


def read_signal_file(path: Path) -> Signal:
    """A time series file on disk: ``.npy`` (+ ``<stem>.json``), WFDB ``.hea`` (+ data files) or a signal CSV."""
    ext = path.suffix.lower()
    if ext == ".hea":
        return _read_wfdb(path)
    if ext == ".npy":
        return make_signal(_load_npy(path.read_bytes(), f"{path}: "), _sidecar(path), f"{path}: ")
    if ext == ".csv":
        return _read_csv(path, _sidecar(path))
    raise DataError(f"{path}: not a time series file (expected .npy, .hea or .csv)")


def encode_signal(sig: Signal, **extra) -> dict[str, bytes]:
    """Shard members ``npy`` (the array as it is) and ``json`` (rate, leads, units, plus ``extra`` fields)."""
    buf = io.BytesIO()
    np.save(buf, sig.data, allow_pickle=False)
    meta = {"sampling_rate": sig.rate, **extra}
    if sig.leads is not None:
        meta["leads"] = list(sig.leads)
    if sig.units is not None:
        meta["units"] = list(sig.units)
    return {"npy": buf.getvalue(), "json": json.dumps(meta).encode()}


# ----------------------------------------------------------------------------------------------- preprocessing


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


# ----------------------------------------------------------------------------------------------- the modality


def channel_count(cfg: TimeseriesConfig) -> int:
    return len(cfg.leads) if cfg.leads else cfg.channels


@register_modality
class TimeseriesModality(Modality):
    kind = "timeseries"
    extensions = ("npy",)
    file_extensions = ("hea", "csv")
    config_class = TimeseriesConfig
    towers = {}
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
        stem = key.rsplit(".", 1)[0] if "." in key else ""
        meta_key = f"{stem}.json" if stem else "json"
        if meta_key not in sample:
            raise DataError(f"no {meta_key} metadata member (sampling_rate, leads) beside {key}")
        return make_signal(_load_npy(sample[key], ""), _parse_json(sample[meta_key], f"{meta_key}: "))

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

    if not (cfg.sample_rate > 0 and cfg.window_s > 0):
        fail("sample_rate and window_s must be > 0")
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
    if aug.scale is not None and not (len(aug.scale) == 2 and 0 < aug.scale[0] <= aug.scale[1]):
        fail(f"augment.scale must be [low, high] with 0 < low <= high, got {aug.scale!r}")
    if min(aug.baseline_wander, aug.noise) < 0:
        fail("augment.baseline_wander and augment.noise must be >= 0")
    if not (0 <= aug.lead_dropout < 1 and 0 <= aug.time_mask < 1):
        fail("augment.lead_dropout and augment.time_mask must be in [0, 1)")


# ----------------------------------------------------------------------------------------------- towers


def load_tower_weights(tower: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``tower``: safetensors, or a torch state dict read with ``weights_only=True``.

    A wrapping ``state_dict``/``model`` entry is unwrapped, a key prefix (``module.``, or ``adapters.<name>.tower.``
    of a saved mmalign model) is found by matching the tower's own keys, and keys beyond them (a head) are ignored.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in several types; all mean "not a plain state dict"
            raise ConfigError(f"{path}: not a state dict loadable with weights_only=True ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict (parameter name -> tensor)")
    own = set(tower.state_dict())
    probe = min(own)
    prefixes = [k[: len(k) - len(probe)] for k in state if k.endswith(probe)]
    matches = [p for p in prefixes if {k[len(p):] for k in state if k.startswith(p)} >= own]
    if len(matches) > 1:
        raise ConfigError(f"{path}: several towers match ({', '.join(repr(p) for p in matches)}); save one alone")
    if not matches:
        missing = sorted(own - set(state))
        raise ConfigError(f"{path}: does not fit this {type(tower).__name__}: {len(missing)} missing key(s) "
                          f"(e.g. {', '.join(missing[:3])}); check tower and tower_kwargs")
    prefix = matches[0]
    try:
        tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k[len(prefix):] in own
                               and k.startswith(prefix)})
    except RuntimeError as e:
        raise ConfigError(f"{path}: shapes do not fit this tower ({str(e).splitlines()[-1].strip()})") from None


class ResBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when needed) shortcut, then ReLU (He et al. 2016, in 1-D)."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm1d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv1d(c_out, c_out, kernel, 1, kernel // 2, bias=False), nn.BatchNorm1d(c_out),
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet1d(nn.Module):
    """A 1-D ResNet over leads as input channels: strided stem, stages halving time, global average pooling."""

    def __init__(self, in_channels: int, widths: tuple = (32, 64, 128, 256), depths: tuple = (1, 1, 1, 1),
                 kernel: int = 7, stem_kernel: int = 15):
        super().__init__()
        if len(widths) != len(depths):
            raise ConfigError(f"resnet1d: widths {list(widths)} and depths {list(depths)} differ in length")
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, widths[0], stem_kernel, 2, stem_kernel // 2, bias=False),
            nn.BatchNorm1d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool1d(3, 2, 1),
        )
        blocks, c = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                blocks.append(ResBlock1d(c, w, 2 if i > 0 and j == 0 else 1, kernel))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["signal"] * inputs["mask"].unsqueeze(-1).to(inputs["signal"].dtype)
        return self.blocks(self.stem(x)).mean(dim=-1)


class PatchTransformer(nn.Module):
    """Each lead is cut into patches of ``patch_size`` samples; a patch token = linear(patch) + lead embedding +
    position code. A CLS token attends over all leads' patches; missing leads are masked out of attention."""

    def __init__(self, in_channels: int, patch_size: int = 25, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"patch_transformer: dim {dim} must be divisible by heads {heads}")
        self.patch_size = patch_size
        self.patch = nn.Linear(patch_size, dim)
        self.lead_embed = nn.Parameter(torch.randn(in_channels, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x, mask = inputs["signal"], inputs["mask"]
        B, C, T = x.shape
        n = T // self.patch_size
        if n == 0:
            raise DataError(f"patch_transformer: {T} samples are fewer than one patch ({self.patch_size})")
        tokens = self.patch(x[..., : n * self.patch_size].reshape(B, C, n, self.patch_size))
        positions = sinusoidal_positions(n, tokens.shape[-1], x.device)
        tokens = tokens + self.lead_embed[None, :, None] + positions[None, None]
        tokens = torch.cat([self.cls.expand(B, -1, -1), tokens.reshape(B, C * n, -1)], dim=1)
        pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=x.device),
                         (~mask.bool()).repeat_interleave(n, dim=1)], dim=1)
        for block in self.blocks:
            tokens = block(tokens, src_key_padding_mask=pad)
        return self.norm(tokens[:, 0])


def _build(cls: type[nn.Module], cfg: TimeseriesConfig) -> nn.Module:
    try:
        tower = cls(channel_count(cfg), **cfg.tower_kwargs)
    except TypeError as e:
        raise ConfigError(f"{cfg.tower} tower_kwargs: {e}") from None
    if cfg.pretrained and cfg.init == "pretrained":
        load_tower_weights(tower, cfg.pretrained)
    return tower


@register_tower(TimeseriesModality, "resnet1d")
def resnet1d(cfg: TimeseriesConfig) -> nn.Module:
    return _build(ResNet1d, cfg)


@register_tower(TimeseriesModality, "patch_transformer")
def patch_transformer(cfg: TimeseriesConfig) -> nn.Module:
    return _build(PatchTransformer, cfg)
