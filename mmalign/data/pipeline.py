"""Streaming WebDataset pipeline: shard list -> node/worker split -> samples -> decode per modality -> batches.

Unusable samples and unreadable shard members are skipped and *counted per reason*; the counts travel with the
batches out of the DataLoader workers (``batch["_skipped"]``), so the training loop and evaluation can report them.

A sample lacking a modality is skipped ("missing <name>") unless that modality is ``optional``: then the sample is
kept, the batch holds the modality's placeholder item in that row, and ``batch["<name>__present"]`` (a BoolTensor
with one flag per sample, present for every modality) says which rows are real.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import webdataset as wds
from braceexpand import braceexpand

from ..distributed import rank, world_size
from ..errors import DataError
from ..modalities import Modality

log = logging.getLogger(__name__)

LABEL_KEYS = ("label.txt", "cls", "cls.txt")


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard spec -> list of urls: brace patterns, globs, ``::``-separated lists; local paths must exist."""
    parts = spec if isinstance(spec, list) else str(spec).split("::")
    urls: list[str] = []
    for part in parts:
        for url in braceexpand(part.strip()):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"shard list {spec!r} is empty")
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if local_missing:
        more = f" (and {len(local_missing) - 1} more)" if len(local_missing) > 1 else ""
        raise DataError(f"shard not found: {local_missing[0]}{more} (from {spec!r})")
    return urls


def find_member(sample: dict, name: str, extensions: Iterable[str]) -> str | None:
    """The sample key that holds modality ``name``: ``name.ext`` first, else a bare ``ext`` (open_clip-style)."""
    for ext in extensions:
        if f"{name}.{ext}" in sample:
            return f"{name}.{ext}"
    for ext in extensions:
        if ext in sample:
            return ext
    return None


@dataclass
class SkipStats:
    """Skip counts per reason, with a few example keys; lives in each worker, drained into batches."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def drain(self) -> dict:
        out = {"counts": dict(self.counts), "examples": self.examples}
        self.counts, self.examples = Counter(), {}
        return out

    def tar_handler(self, exn: Exception) -> bool:
        self.add("unreadable shard member", f"{type(exn).__name__}: {exn}"[:300])
        return True


def merge_skips(total: dict, new: dict | None) -> None:
    """Accumulate a drained ``SkipStats`` into ``total`` ({"counts": {...}, "examples": {...}})."""
    if not new:
        return
    counts = total.setdefault("counts", {})
    examples = total.setdefault("examples", {})
    for reason, n in new["counts"].items():
        counts[reason] = counts.get(reason, 0) + n
    for reason, ex in new["examples"].items():
        examples.setdefault(reason, [])
        examples[reason] = (examples[reason] + ex)[:3]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Python's and torch's RNG seeded to ``seed``, restoring both afterwards."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds every accelerator
        try:
            yield
        finally:
            random.setstate(py_state)


class Decoder:
    """Turn raw samples into per-modality items, skipping and counting what cannot be used.

    Random augmentations are seeded per (seed, epoch, sample key), so a sample is augmented the same way whatever
    worker or process reads it, and a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, modalities: dict[str, Modality], train: bool, stats: SkipStats, seed: int = 0, epoch: int = 0):
        self.modalities = modalities
        self.train = train
        self.stats = stats
        self.seed = f"{seed}:{epoch}:"

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            out: dict[str, Any] = {"__key__": sample.get("__key__")}
            try:
                with seeded(zlib.crc32(f"{self.seed}{sample.get('__key__')}".encode())):
                    for name, modality in self.modalities.items():
                        out[name] = self.decode_one(sample, name, modality)
                if all(out[name] is None for name in self.modalities):
                    raise DataError("missing every modality")
            except DataError as e:
                reason = str(e).split(":")[0] if str(e).startswith("missing") else f"bad {str(e).split(':')[0]}"
                self.stats.add(reason, f"{where} ({e})")
                continue
            label = next((sample[k] for k in LABEL_KEYS if k in sample), None)
            out["label"] = label.decode("utf-8").strip() if isinstance(label, bytes) else label
            yield out

    def decode_one(self, sample: dict, name: str, modality: Modality) -> Any:
        """The transformed item; None when the sample lacks an optional modality."""
        key = find_member(sample, name, modality.extensions)
        if key is None:
            if modality.cfg.optional:
                return None
            raise DataError(f"missing {name}")
        try:
            return modality.transform(modality.decode(sample[key], key.rsplit(".", 1)[-1]), self.train)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None


class Batcher:
    """Collate samples into batch dicts with presence masks; absent items are replaced by the modality's
    placeholder. In evaluation a list item (several captions) is flattened with owners. Training drops the last
    partial batch, evaluation keeps it."""

    def __init__(self, modalities: dict[str, Modality], batch_size: int, train: bool, stats: SkipStats):
        self.modalities = modalities
        self.batch_size = batch_size
        self.train = train
        self.stats = stats

    def collate(self, samples: list[dict]) -> dict:
        batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples], "label": [s["label"] for s in samples]}
        for name, modality in self.modalities.items():
            present = [s[name] is not None for s in samples]
            items = [s[name] if ok else modality.placeholder(self.train) for s, ok in zip(samples, present)]
            batch[f"{name}__present"] = torch.tensor(present, dtype=torch.bool)
            if isinstance(items[0], list):
                owners = [i for i, item in enumerate(items) for _ in item]
                items = [x for item in items for x in item]
                batch[f"{name}__owner"] = torch.tensor(owners)
            batch[name] = modality.collate(items)
        batch["_skipped"] = self.stats.drain()
        return batch

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) == self.batch_size:
                yield self.collate(buf)
                buf = []
        if buf and not self.train:
            yield self.collate(buf)
        elif self.stats.counts:
            yield {"_skipped": self.stats.drain(), "_empty": True}


def split_samples_by_node(samples: Iterator[dict]) -> Iterator[dict]:
    """With fewer shards than processes every rank reads all shards and keeps every world-th sample."""
    r, n = rank(), world_size()
    for i, s in enumerate(samples):
        if i % n == r:
            yield s


def make_dataset(
    urls: list[str],
    modalities: dict[str, Modality],
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
) -> wds.DataPipeline:
    """The WebDataset pipeline for one pass (epoch) over ``urls``, or an endless resampled stream."""
    stats = SkipStats()
    shard_level_split = len(urls) >= world_size()
    if resampled:
        stages: list = [wds.ResampledShards(urls, seed=seed + 1000 * rank(), deterministic=True)]
    else:
        order = list(urls)
        if train:
            random.Random(seed + epoch).shuffle(order)
        stages = [wds.SimpleShardList(order)]
        if shard_level_split:
            stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, wds.tarfile_to_samples(handler=stats.tar_handler)]
    if not resampled and not shard_level_split:
        stages.append(split_samples_by_node)
    if train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed + epoch)))
    stages.append(Decoder(modalities, train, stats, seed, epoch))
    stages.append(Batcher(modalities, batch_size, train, stats))
    return wds.DataPipeline(*stages)


def make_loader(dataset: wds.DataPipeline, num_workers: int, n_shards: int, pin_memory: bool = False):
    """A DataLoader over a batched pipeline; never more workers than shards per process (idle workers only cost)."""
    per_rank = max(1, n_shards // world_size())
    workers = min(num_workers, per_rank)
    if workers < num_workers:
        log.warning("only %d shard(s) per process: using %d DataLoader worker(s) instead of %d",
                    per_rank, workers, num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )


def iterate_batches(urls, modalities, batch_size, train, seed=0, epoch=0, shuffle_buffer=1000, resampled=False,
                    num_workers=0, skips: dict | None = None, pin_memory: bool = False) -> Iterator[dict]:
    """Batches of one pass, with skip counts merged into ``skips`` and stats-only items removed."""
    dataset = make_dataset(urls, modalities, batch_size, train, seed, epoch, shuffle_buffer, resampled)
    for batch in make_loader(dataset, num_workers, len(urls), pin_memory):
        if skips is not None:
            merge_skips(skips, batch.get("_skipped"))
        if not batch.get("_empty"):
            yield batch
