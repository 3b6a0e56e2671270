"""Embed every sample of a shard set with a trained model (evaluation side of the data pipeline)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..data import expand_urls, iterate_batches


@torch.no_grad()
def embed_shards(model, data: str, modalities: list[str], batch_size: int = 256, num_workers: int = 0,
                 max_samples: int | None = None) -> dict:
    """Embeddings of ``modalities`` for every usable sample in ``data`` (a shard spec), in order; with
    ``max_samples``, of the first batches that hold that many samples (whole batches: possibly a few more).

    Returns ``{"embeddings": {name: N_or_M x D}, "owners": {name: M or None}, "labels": [...], "keys": [...],
    "skipped": {...}}``; items with several entries per sample (captions) come with the sample row they belong to.
    """
    model.eval()
    device = next(model.parameters()).device
    procs = {name: model.modalities[name] for name in modalities}
    urls = expand_urls(data)
    skipped: dict = {}
    embs = {name: [] for name in modalities}
    owners = {name: [] for name in modalities}
    labels, keys = [], []
    batches = iterate_batches(urls, procs, batch_size, train=False, num_workers=num_workers, skips=skipped)
    for batch in tqdm(batches, desc="embed", unit="batch", leave=False):
        for name in modalities:
            inputs = batch[name]
            inputs = inputs.to(device) if torch.is_tensor(inputs) else {k: v.to(device) for k, v in inputs.items()}
            embs[name].append(model.encode(name, inputs).float().cpu())
            if f"{name}__owner" in batch:
                owners[name].append(batch[f"{name}__owner"] + len(keys))
        labels += batch["label"]
        keys += batch["__key__"]
        if max_samples is not None and len(keys) >= max_samples:
            break
    return {
        "embeddings": {n: torch.cat(e) if e else torch.empty(0) for n, e in embs.items()},
        "owners": {n: torch.cat(o) if o else None for n, o in owners.items()},
        "labels": labels,
        "keys": keys,
        "skipped": skipped,
    }
