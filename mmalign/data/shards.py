"""Write WebDataset shards from pairs on disk: a CSV or JSONL of file paths and captions, or a folder per class.

Sample layout: ``<modality>.<ext>`` members (``image.png``, ``audio.flac``, ...), captions as ``text.json``
(a list, so several captions per item survive), the class name as ``label.txt``.

* CSV/JSONL: a column/field named ``text``, ``caption`` or ``captions`` holds captions (a JSON list or one
  string; rows that repeat the same files are merged into one sample with several captions); ``label`` holds a
  class name; every other column is a file path (relative to the CSV's folder) whose modality is the column name.
  A time series file (``.npy``, a WFDB ``.hea`` header, a signal ``.csv``) becomes ``<modality>.npy`` (channels x
  time) + ``<modality>.json`` (sampling rate, lead names, units).
* Folder tree ``DIR/<class>/<file>``: the file's kind comes from its extension, the caption and label are the
  class name (underscores read as spaces); ``classes.txt`` lists the classes.

Every file is decoded as training will decode it before it is packed: a file that does not decode, a row with an
empty caption, a missing file or one of an unknown type is skipped and reported with its reason (``strict``: the
first one stops the command instead). Samples are shuffled across shards (seeded), a ``split`` writes stratified
shard sets (``train-*.tar``, ``test-*.tar``), and a folder already holding shards is refused unless ``overwrite``.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import webdataset as wds

from ..errors import ConfigError, DataError
from ..modalities import MODALITIES, Modality, build_modality
from ..modality_config import MODALITY_CONFIGS

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "caption", "captions")
SHARD_GLOB = "*.tar"
REPORTED_SKIPS = 100  # skipped files listed in the summary (all are logged)


def kind_of_extension(ext: str) -> str | None:
    ext = ext.lower().lstrip(".")
    for kind, cls in MODALITIES.items():
        if kind != "text" and ext in cls.extensions + cls.file_extensions:
            return kind
    return None


def file_members(path: Path) -> dict[str, bytes]:
    """Shard members for a file on disk, packed as the modality kind of its extension does (a WFDB header or
    signal CSV becomes ``npy`` + ``json``); other files are stored as they are."""
    kind = kind_of_extension(path.suffix)
    return (MODALITIES[kind] if kind else Modality).file_members(path)


@functools.lru_cache(maxsize=None)
def checking_modality(kind: str) -> Modality:
    """A modality of ``kind`` with its default config, whose decoder checks a file's content as training will
    (a time series needs a channel count to be built; decoding does not use it)."""
    return build_modality(kind, MODALITY_CONFIGS[kind](kind=kind, **({"channels": 1} if kind == "timeseries" else {})))


@dataclass
class Packing:
    """What packing skipped (reason -> count, and ``(where, reason)`` per skip) and noticed; ``strict`` raises at the
    first skip instead."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        message = f"{where}: {detail or reason}"
        if self.strict:
            raise DataError(f"{message} (--strict: nothing was written)")
        log.warning("skipping %s", message)
        self.counts[reason] += 1
        self.skipped.append((where, detail or reason))

    def summary(self) -> dict:
        out: dict = {"skipped": dict(self.counts)}
        if self.skipped:
            out["skipped_files"] = [{"file": w, "reason": r} for w, r in self.skipped[:REPORTED_SKIPS]]
        if self.empty_classes:
            out["empty_classes"] = self.empty_classes
        return out


def _captions(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    value = str(value).strip()
    if value.startswith("["):
        try:
            return _captions(json.loads(value))
        except json.JSONDecodeError:
            pass
    return [value] if value else []


def _records_from_table(rows: Iterable[tuple[str, dict]], base: Path, packing: Packing) -> list[dict]:
    """Group rows by their file columns; each group is one sample {files: {modality: path}, captions, label, where}.
    A row naming a missing file, or with a caption column left empty, is skipped (``packing``)."""
    groups: dict[tuple, dict] = {}
    for where, row in rows:
        files, captions, label, has_text = {}, [], None, False
        missing = None
        for column, value in row.items():
            if column is None:
                raise DataError(f"{where}: more values than header columns")
            column = column.strip()
            if column in TEXT_FIELDS:
                has_text = True
                captions += _captions(value)
            elif column == "label":
                label = str(value).strip() if value not in (None, "") else None
            elif value not in (None, ""):
                path = Path(str(value).strip())
                path = path if path.is_absolute() else base / path
                if not path.is_file():
                    missing = f"{column} file not found: {path}"
                files[column] = path
        if missing:
            packing.skip("file not found", where, missing)
            continue
        if has_text and not captions:
            packing.skip("empty caption", where)
            continue
        if not files and not captions:
            raise DataError(f"{where}: no file or caption in this row")
        key = tuple(sorted((k, str(v)) for k, v in files.items())) or (where,)
        group = groups.setdefault(key, {"files": files, "captions": [], "label": label, "where": where})
        group["captions"] += captions
    return list(groups.values())


def records_from_csv(path: Path, packing: Packing) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (expected a header such as image,text)")
        rows = [(f"{path} line {i + 2}", row) for i, row in enumerate(reader)]
    return _records_from_table(rows, path.parent, packing)


def records_from_jsonl(path: Path, packing: Packing) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {i}: expected a JSON object")
            rows.append((f"{path} line {i}", obj))
    return _records_from_table(rows, path.parent, packing)


def records_from_folder(root: Path, packing: Packing) -> list[dict]:
    """One sample per file of ``root/<class>/``; files of unknown type are skipped, empty class folders noted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: expected one sub-folder per class")
    records = []
    for cls in classes:
        files = sorted(p for p in (root / cls).iterdir() if not p.name.startswith("."))
        for path in files:
            kind = kind_of_extension(path.suffix) if path.is_file() else None
            if kind is None:
                packing.skip("unknown file type", str(path), f"not of a known kind ({path.suffix or 'no suffix'})")
                continue
            records.append({"files": {kind: path}, "captions": [cls.replace("_", " ")], "label": cls,
                            "where": str(path)})
        if not files:
            log.warning("class folder %s is empty: class %r gets no samples", root / cls, cls)
            packing.empty_classes.append(cls)
    return records


def read_records(source: Path, packing: Packing) -> list[dict]:
    if source.is_dir():
        return records_from_folder(source, packing)
    if not source.is_file():
        raise DataError(f"source not found: {source}")
    if source.suffix.lower() == ".csv":
        return records_from_csv(source, packing)
    if source.suffix.lower() in (".jsonl", ".json"):
        return records_from_jsonl(source, packing)
    raise DataError(f"{source}: expected a .csv, .jsonl or a folder with one sub-folder per class")


def sample_members(record: dict) -> dict[str, bytes]:
    """The shard members of a record: its files (as their kind packs them), ``text.json``, ``label.txt``."""
    members = {}
    for modality, path in record["files"].items():
        for ext, data in file_members(path).items():
            members[f"{modality}.{ext}"] = data
    if record["captions"]:
        members["text.json"] = json.dumps(record["captions"]).encode()
    if record["label"] is not None:
        members["label.txt"] = record["label"].encode()
    return members


def decodes(record: dict, packing: Packing) -> bool:
    """Whether every file of ``record`` decodes as training will decode it (else it is skipped with the reason)."""
    for column, path in record["files"].items():
        kind = kind_of_extension(path.suffix)
        modality = checking_modality(kind) if kind else None
        members = file_members(path) if kind else {}
        member = next((ext for ext in members if ext in modality.extensions), None) if kind else None
        if member is None:
            packing.skip("unknown file type", record["where"],
                         f"{column} file {path} is not of a known kind ({path.suffix or 'no suffix'})")
            return False
        try:
            modality.decode_member(members, member)
        except DataError as e:
            packing.skip(f"bad {kind}", record["where"], f"{column} file {path}: {e}")
            return False
    return True


def split_records(records: list[dict], split: dict[str, float], rng: random.Random) -> dict[str, list[dict]]:
    """Stratified split: within each label (unlabelled records together) the given fractions go to the named sets,
    the rest to ``train``; which records go where is drawn with ``rng``."""
    by_label: dict = defaultdict(list)
    for record in records:
        by_label[record["label"]].append(record)
    sets: dict[str, list[dict]] = {"train": [], **{name: [] for name in split}}
    for label in sorted(by_label, key=str):
        group = by_label[label]
        rng.shuffle(group)
        start, cumulative = 0, 0.0
        for name, fraction in split.items():
            cumulative += fraction
            end = round(cumulative * len(group))
            sets[name] += group[start:end]
            start = end
        sets["train"] += group[start:]
    for name, chosen in sets.items():
        if not chosen:
            raise DataError(f"--split {', '.join(f'{n}={f:g}' for n, f in split.items())} of {len(records)} samples "
                            f"leaves the {name} set empty")
    return sets


def write_shard_set(samples: Iterable[dict], out_dir: Path, prefix: str, shard_size: int) -> dict:
    """Write sample dicts (``__key__`` + member bytes) to ``out_dir/prefix-%06d.tar``: the count and brace pattern."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            n += 1
        shards = sink.shard
    return {"samples": n, "shards": f"{out_dir}/{prefix}-{{{0:06d}..{shards - 1:06d}}}.tar", "n_shards": shards}


def parse_split(items: list[str]) -> dict[str, float]:
    """``["test=0.2", "val=0.1"]`` -> {"test": 0.2, "val": 0.1}, checked (fractions in (0, 1), summing below 1)."""
    split: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not name.strip().isidentifier() or name.strip() == "train" or not 0 < fraction < 1:
            raise ConfigError(f"--split {item!r}: expected NAME=FRACTION with a name other than train and a "
                              f"fraction in (0, 1), e.g. test=0.2")
        split[name.strip()] = fraction
    if sum(split.values()) >= 1:
        raise ConfigError(f"--split fractions add up to {sum(split.values()):g}: leave some for train")
    return split


def write_shards(source: str | Path, out_dir: str | Path, shard_size: int = 1000, prefix: str = "shard", *,
                 strict: bool = False, overwrite: bool = False, shuffle: bool = True, seed: int = 0,
                 split: dict[str, float] | None = None) -> dict:
    """Convert ``source`` (CSV, JSONL or class-folder tree) into shards in ``out_dir``; returns the summary line.

    Every file is decoded first; what cannot be used is skipped and listed (``strict``: an error instead). Samples
    are shuffled across shards with ``seed`` unless ``shuffle`` is false. ``split`` (name -> fraction) writes a
    stratified set per name plus ``train`` with the rest, each with its own pattern (``test-{...}.tar``). A folder
    that already holds shards is refused unless ``overwrite``, which replaces them once the new ones are written.
    """
    source, out_dir = Path(source), Path(out_dir)
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    old = sorted(out_dir.glob(SHARD_GLOB)) if out_dir.is_dir() else []
    if old and not overwrite:
        raise DataError(f"{out_dir} already holds {len(old)} shard(s) ({old[0].name}, ...): a pattern such as *.tar "
                        f"would mix them with the new ones; pass --overwrite to replace them, or choose another --out")
    packing = Packing(strict)
    records = [r for r in read_records(source, packing) if decodes(r, packing)]
    if not records:
        examples = "; ".join(f"{w}: {r}" for w, r in packing.skipped[:3])
        raise DataError(f"{source}: no usable samples to write (skipped: {dict(packing.counts)}; e.g. {examples})")
    rng = random.Random(seed)
    sets = split_records(records, split, rng) if split else {prefix: records}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shards.tmp-", dir=out_dir))
    try:
        summary: dict = {"samples": len(records)}
        written = {}
        for name, chosen in sets.items():
            if shuffle:
                rng.shuffle(chosen)
            samples = ({"__key__": f"{i:09d}", **sample_members(r)} for i, r in enumerate(chosen))
            written[name] = write_shard_set(samples, tmp, name, shard_size)
        for path in old:
            path.unlink()
        for path in sorted(tmp.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for info in written.values():
        info["shards"] = info["shards"].replace(str(tmp), str(out_dir))
    if split:
        summary["splits"] = written
    else:
        summary.update(written[prefix])
    labels = sorted({r["label"] for r in records if r["label"] is not None})
    if labels:
        (out_dir / "classes.txt").write_text("\n".join(labels) + "\n")
        summary["classes"] = str(out_dir / "classes.txt")
    elif old:
        (out_dir / "classes.txt").unlink(missing_ok=True)  # the replaced shards' classes
    if old:
        log.info("removed the %d shard(s) %s held before (--overwrite)", len(old), out_dir)
    summary.update(packing.summary())
    return summary
