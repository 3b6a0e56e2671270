"""Per-query candidate sets (``mmalign eval ... --candidates FILE``): each query ranks its own list of candidates.

This is Symile-MIMIC's retrieval protocol (each (ECG, labs) query ranks its true chest X-ray among a few X-rays of
other patients), instead of every query ranking the whole gallery.

The file is JSON Lines, one query per line (blank lines are skipped)::

    {"query": "s00012", "candidates": ["s00012", "s00345", "s00078"]}

``query`` is the key (``__key__``) of a sample in the evaluated shards. ``candidates`` are, for ``eval retrieval``,
the keys of the samples whose gallery items (every item of a sample with several, e.g. captions) the query ranks, and
for ``eval zeroshot`` the class names (lines of the classes file) the sample is classified among. Only the samples
the file lists are evaluated. A hit is as without the file (the query's own item, or with ``--match label`` an item
with its label), so every query needs at least one hit among its candidates.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Collection

from ..errors import DataError


def read_candidates(path: str | Path, known: Collection[str], what: str) -> dict[str, list[str]]:
    """Query key -> its candidates, from the JSON Lines file ``path``; each candidate must be in ``known`` (``what``
    names them in errors, e.g. "a sample key of the data"). Errors name the file, line and value to fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"candidates file not found: {path}")
    known = set(known)
    out: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg}); each line is "
                            '{"query": KEY, "candidates": [KEY, ...]}') from None
        if not isinstance(entry, dict) or not isinstance(entry.get("query"), str):
            raise DataError(f'{where}: each line needs "query" (a sample key) and "candidates" (a list)')
        query, candidates = entry["query"], entry.get("candidates")
        if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
            raise DataError(f'{where}: "candidates" of query {query!r} must be a non-empty list of strings')
        if query in out:
            raise DataError(f"{where}: query {query!r} is listed twice")
        unknown = [c for c in candidates if c not in known]
        if unknown:
            raise DataError(f"{where}: candidate {unknown[0]!r} of query {query!r} is not {what}")
        out[query] = list(dict.fromkeys(candidates))
    if not out:
        raise DataError(f"candidates file has no queries: {path}")
    return out
