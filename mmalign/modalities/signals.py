"""Time series records (ECG, EEG, sensors) as stored: reading files and shard members, writing shard members.

A record in a shard is ``<name>.npy`` (channels x time, any numeric dtype) and ``<name>.json`` (``sampling_rate`` in
Hz, optional ``leads`` (one name per channel) and ``units`` (one string, or one per channel)). On disk it is an
``.npy`` file (metadata from a ``<stem>.json`` beside it), a WFDB record (its ``.hea`` header) or a signal CSV (a
header of channel names, optionally a first ``time`` column in seconds). The time series modality, ``mmalign data
shards`` and the demo data builders all read and write records with these functions.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from ..optional import require

TIME_COLUMNS = ("time", "t", "time_s", "seconds")


@dataclass
class Signal:
    """A record as stored: ``data`` is channels x time at ``rate`` Hz, with optional per-channel names and units."""

    data: np.ndarray
    rate: float
    leads: Optional[tuple] = None
    units: Optional[tuple] = None


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
    return parse_json(side.read_bytes(), f"{side}: ") if side.is_file() else {}


def load_npy(data: bytes, where: str) -> np.ndarray:
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


def parse_json(data: bytes | str, where: str) -> dict:
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
        return make_signal(load_npy(path.read_bytes(), f"{path}: "), _sidecar(path), f"{path}: ")
    if ext == ".csv":
        return _read_csv(path, _sidecar(path))
    raise DataError(f"{path}: not a time series file (expected .npy, .hea or .csv)")


def decode_signal_member(sample: dict, key: str) -> Signal:
    """The record held by member ``key`` (``npy``) of a raw sample and the ``json`` member beside it."""
    stem = key.rsplit(".", 1)[0] if "." in key else ""
    meta_key = f"{stem}.json" if stem else "json"
    if meta_key not in sample:
        raise DataError(f"no {meta_key} metadata member (sampling_rate, leads) beside {key}")
    return make_signal(load_npy(sample[key], ""), parse_json(sample[meta_key], f"{meta_key}: "))


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
