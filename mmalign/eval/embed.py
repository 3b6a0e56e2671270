"""Embed every sample of a shard set with a trained model (evaluation side of the data pipeline)."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch
from tqdm import tqdm

from ..data import expand_urls, iterate_batches
from ..modalities import inputs_to

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_shards(model, data: str, modalities: list[str], batch_size: int = 256, num_workers: int | None = 0,
                 max_samples: int | None = None, before_encoding: Callable[[], object] | None = None) -> dict:
    """Embeddings of ``modalities`` for every usable sample in ``data`` (a shard spec), in order; with
    ``max_samples``, of the first batches that hold that many samples (whole batches: possibly a few more).
    ``num_workers``: DataLoader workers decoding the shards (None: :func:`eval_workers`). ``before_encoding`` runs
    once the workers have started decoding and before anything is encoded (a check that may fail, e.g. of the
    labels: it costs no encoding, and its time overlaps the workers' decoding).

    Returns ``{"embeddings": {name: N_or_M x D}, "owners": {name: M or None}, "present": {name: N booleans},
    "labels": [...], "keys": [...], "skipped": {...}, "samples_per_s": ...}`` (samples read and embedded per second
    of the pass); items with several entries per sample (captions) come with
    the sample row they belong to. Rows of a sample lacking an optional modality hold its missing embedding.
    """
    model.eval()
    device = next(model.parameters()).device
    procs = {name: model.modalities[name] for name in modalities}
    urls = expand_urls(data)
    if num_workers is None:
        num_workers = eval_workers(len(urls))
        log.info("%d shard(s) decoded by %d DataLoader worker(s)", len(urls), num_workers)
    skipped: dict = {}
    embs = {name: [] for name in modalities}
    owners = {name: [] for name in modalities}
    present = {name: [] for name in modalities}
    labels, keys = [], []
    start = time.perf_counter()
    batches = iterate_batches(urls, procs, batch_size, train=False, num_workers=num_workers, skips=skipped)
    if before_encoding is not None:
        before_encoding()
    for batch in tqdm(batches, desc="embed", unit="batch", leave=False):
        for name in modalities:
            inputs = inputs_to(batch[name], device)
            flags = batch[f"{name}__present"]
            owner = batch.get(f"{name}__owner")
            row_flags = flags[owner] if owner is not None else flags
            embs[name].append(model.encode(name, inputs, row_flags.to(device)).float().cpu())
            present[name].append(flags)
            if owner is not None:
                owners[name].append(owner + len(keys))
        labels += batch["label"]
        keys += batch["__key__"]
        if max_samples is not None and len(keys) >= max_samples:
            break
    return {
        "embeddings": {n: torch.cat(e) if e else torch.empty(0) for n, e in embs.items()},
        "owners": {n: torch.cat(o) if o else None for n, o in owners.items()},
        "present": {n: torch.cat(p) if p else torch.empty(0, dtype=torch.bool) for n, p in present.items()},
        "labels": labels,
        "keys": keys,
        "skipped": skipped,
        "samples_per_s": len(keys) / (time.perf_counter() - start),
    }


def eval_workers(n_shards: int) -> int:
    """Default DataLoader workers for evaluation: one per shard, at most 4 and at most the CPUs this process may
    run on (the workers decode while the main process encodes)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus, n_shards)


def complete_samples(emb: dict, names: list[str]) -> dict:
    """``emb`` (from ``embed_shards``) restricted to the samples where every modality in ``names`` is present;
    owners are renumbered to the kept samples."""
    keep = torch.stack([emb["present"][n] for n in names]).all(dim=0)
    if bool(keep.all()):
        return emb
    renumber = keep.long().cumsum(0) - 1  # old sample index -> new one (for kept samples)
    out = {**emb, "embeddings": {}, "owners": {}, "present": {n: p[keep] for n, p in emb["present"].items()},
           "labels": [x for x, k in zip(emb["labels"], keep.tolist()) if k],
           "keys": [x for x, k in zip(emb["keys"], keep.tolist()) if k]}
    for name, e in emb["embeddings"].items():
        owner = emb["owners"][name]
        rows = keep if owner is None else keep[owner]
        out["embeddings"][name] = e[rows]
        out["owners"][name] = None if owner is None else renumber[owner[rows]]
    return out
