"""Shared pieces of the demo data builders: writing sample dicts to shards, and a 'built already' marker."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import webdataset as wds


def write_samples(samples: Iterable[dict], out_dir: Path, prefix: str, shard_size: int) -> str:
    """Write sample dicts (``__key__`` + ``name.ext`` bytes) to ``prefix-%06d.tar``; returns the brace pattern."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
        n = sink.shard
    return f"{out_dir}/{prefix}-{{{0:06d}..{n - 1:06d}}}.tar"


def cached_build(out_dir: Path, version: str, build) -> dict:
    """Run ``build(out_dir) -> dict`` once; later calls read the saved summary (rebuilt when ``version`` changes)."""
    marker = out_dir / "built.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("version") == version:
            return saved["paths"]
    paths = build(out_dir)
    marker.write_text(json.dumps({"version": version, "paths": paths}, indent=2))
    return paths
