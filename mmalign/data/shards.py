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
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Iterator

import webdataset as wds

from ..errors import DataError
from ..modalities import MODALITIES, Modality

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "caption", "captions")


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


def _records_from_table(rows: Iterator[tuple[str, dict]], base: Path) -> Iterator[dict]:
    """Group rows by their file columns; each group is one sample {files: {modality: path}, captions, label}."""
    groups: dict[tuple, dict] = {}
    for where, row in rows:
        files, captions, label = {}, [], None
        for column, value in row.items():
            if column is None:
                raise DataError(f"{where}: more values than header columns")
            column = column.strip()
            if column in TEXT_FIELDS:
                captions += _captions(value)
            elif column == "label":
                label = str(value).strip() if value not in (None, "") else None
            elif value not in (None, ""):
                path = Path(str(value).strip())
                path = path if path.is_absolute() else base / path
                if not path.is_file():
                    raise DataError(f"{where}: {column} file not found: {path}")
                files[column] = path
        if not files and not captions:
            raise DataError(f"{where}: no file or caption in this row")
        key = tuple(sorted((k, str(v)) for k, v in files.items())) or (where,)
        group = groups.setdefault(key, {"files": files, "captions": [], "label": label, "where": where})
        group["captions"] += captions
    yield from groups.values()


def records_from_csv(path: Path) -> Iterator[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (expected a header such as image,text)")
        rows = [(f"{path} line {i + 2}", row) for i, row in enumerate(reader)]
    yield from _records_from_table(iter(rows), path.parent)


def records_from_jsonl(path: Path) -> Iterator[dict]:
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
    yield from _records_from_table(iter(rows), path.parent)


def records_from_folder(root: Path) -> Iterator[dict]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: expected one sub-folder per class")
    for cls in classes:
        for path in sorted((root / cls).iterdir()):
            kind = kind_of_extension(path.suffix)
            if kind is None or not path.is_file():
                log.warning("skipping %s: unknown file type", path)
                continue
            yield {"files": {kind: path}, "captions": [cls.replace("_", " ")], "label": cls, "where": str(path)}


def write_shards(source: str | Path, out_dir: str | Path, shard_size: int = 1000, prefix: str = "shard") -> dict:
    """Convert ``source`` (CSV, JSONL or class-folder tree) into shards; returns a summary with the shard pattern."""
    source, out_dir = Path(source), Path(out_dir)
    if source.is_dir():
        records = records_from_folder(source)
    elif not source.is_file():
        raise DataError(f"source not found: {source}")
    elif source.suffix.lower() == ".csv":
        records = records_from_csv(source)
    elif source.suffix.lower() in (".jsonl", ".json"):
        records = records_from_jsonl(source)
    else:
        raise DataError(f"{source}: expected a .csv, .jsonl or a folder with one sub-folder per class")
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    n, labels = 0, set()
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for rec in records:
            sample = {"__key__": f"{n:09d}"}
            for modality, path in rec["files"].items():
                for ext, data in file_members(path).items():
                    sample[f"{modality}.{ext}"] = data
            if rec["captions"]:
                sample["text.json"] = json.dumps(rec["captions"]).encode()
            if rec["label"] is not None:
                sample["label.txt"] = rec["label"].encode()
                labels.add(rec["label"])
            sink.write(sample)
            n += 1
        shards = sink.shard
    if n == 0:
        raise DataError(f"{source}: no samples found")
    summary = {"samples": n, "shards": f"{out_dir}/{prefix}-{{{0:06d}..{shards - 1:06d}}}.tar", "n_shards": shards}
    if labels:
        (out_dir / "classes.txt").write_text("\n".join(sorted(labels)) + "\n")
        summary["classes"] = str(out_dir / "classes.txt")
    return summary
