"""Streaming WebDataset pipeline: shard list -> node/worker split -> samples -> decode per modality -> batches.

Nothing unusable stops a pass and nothing is dropped silently: every skipped shard or sample is *counted per
reason* (``SKIP_REASONS``) with a few examples. The counts travel with the batches out of the DataLoader workers
(``batch["_skipped"]``; a worker that ends with counts but no batch sends a stats-only item), so the training loop
and evaluation can report them and stop when too much of the data is bad.

A sample lacking a modality is skipped ("missing <name>") unless that modality is ``optional``: then the sample is
kept, the batch holds the modality's placeholder item in that row, and ``batch["<name>__present"]`` (a BoolTensor
with one flag per sample, present for every modality) says which rows are real.
"""
from __future__ import annotations

import functools
import glob
import logging
import math
import os
import random
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import webdataset as wds
from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ..distributed import rank, world_size
from ..errors import DataError
from ..modalities import Modality
from ..preemption import ignore_stop_signals

log = logging.getLogger(__name__)

LABEL_KEYS = ("label.txt", "cls", "cls.txt")

# Why a shard or sample is skipped ({name} is a modality name). Shard-level reasons count shards, the rest samples.
SKIP_REASONS = {
    "unreadable shard": "the shard cannot be opened (missing, no permission, network error)",
    "corrupt shard": "the tar stream breaks (truncated, not a tar); the samples before the break are kept",
    "empty shard": "a valid tar without samples",
    "missing {name}": "the sample has no member for the modality (and the modality is not optional)",
    "missing every modality": "the sample has no member for any modality (all of them optional)",
    "unsupported {name} type": "the modality's member has an extension its decoder does not read",
    "bad {name}": "the modality's member cannot be decoded (corrupt file, invalid text, ...)",
    "bad label": "the label member is not UTF-8",
}


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard spec -> list of urls: brace patterns, globs, ``::``-separated lists; local paths must exist.

    ``pipe:`` urls are refused: webdataset runs them through a shell, and a recipe must not run shell commands.
    """
    parts = spec if isinstance(spec, list) else str(spec).split("::")
    urls: list[str] = []
    for part in parts:
        for url in braceexpand(part.strip()):
            if url.startswith("pipe:"):
                raise DataError(f"shard url {url!r}: pipe: urls run shell commands and are not allowed; "
                                "use a local path or an http(s)/gs/hf url")
            if "://" in url:
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"shard list {spec!r} is empty")
    local_missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
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
    """Skip counts per reason, with a few example locations; lives in each worker, drained into batches."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where[:300])

    def drain(self) -> dict:
        out = {"counts": dict(self.counts), "examples": self.examples}
        self.counts, self.examples = Counter(), {}
        return out


def merge_skips(total: dict, new: dict | None) -> None:
    """Accumulate drained ``SkipStats`` into ``total`` ({"counts": {...}, "examples": {...}})."""
    if not new:
        return
    counts = total.setdefault("counts", {})
    examples = total.setdefault("examples", {})
    for reason, n in new["counts"].items():
        counts[reason] = counts.get(reason, 0) + n
    for reason, ex in new["examples"].items():
        examples[reason] = (examples.get(reason, []) + ex)[:3]


def report_skips(total: dict, new: dict | None) -> None:
    """``merge_skips``, logging the first skip of each reason with its example (bad data never goes unnoticed)."""
    if not new or not new.get("counts"):
        return
    for reason in new["counts"].keys() - total.get("counts", {}).keys():
        log.warning("skipping data: %s, e.g. %s", reason, new["examples"][reason][0])
    merge_skips(total, new)


def describe_error(exn: BaseException) -> str:
    """``Type: message`` without the stream objects and urls webdataset appends to an exception's args."""
    message = exn.strerror if isinstance(exn, OSError) and exn.strerror else (exn.args[0] if exn.args else "")
    return f"{type(exn).__name__}: {str(message).split(' @ <')[0]}"


class ShardReader:
    """Shard urls -> raw samples, one shard at a time, so that a broken shard never mixes into the next one.

    A shard that cannot be opened, breaks off or holds no sample is counted once (``SKIP_REASONS``); the samples read
    before a break are kept (a sample cut by the break is then incomplete and skipped by the ``Decoder``).
    """

    def __init__(self, stats: SkipStats):
        self.stats = stats

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        for shard in shards:
            url = shard["url"]
            try:
                stream = gopen(url)
            except Exception as e:  # any opener failure (OS, network, unknown scheme) means: cannot read it
                self.stats.add("unreadable shard", f"{url}: {describe_error(e)}")
                continue
            errors: list[Exception] = []

            def stop(exn: Exception) -> bool:
                errors.append(exn)
                return False

            n = 0
            try:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=stop),
                                            handler=stop):
                    n += 1
                    yield sample
            finally:
                stream.close()
            if errors:
                self.stats.add("corrupt shard", f"{url}: {describe_error(errors[0])} after {n} sample(s)")
            elif n == 0:
                self.stats.add("empty shard", url)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Python's and torch's RNG seeded to ``seed``, restoring both afterwards.

    In a DataLoader worker the global RNGs serve only these blocks, so they are seeded without the restore (saving
    and restoring Python's state costs ~60 us, a tenth of loading a small image).
    """
    if torch.utils.data.get_worker_info() is not None:
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        yield
        return
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds every accelerator
        try:
            yield
        finally:
            random.setstate(py_state)


class SkipSample(Exception):
    """Internal: why a sample is skipped (a ``SKIP_REASONS`` key) and where."""

    def __init__(self, reason: str, where: str):
        super().__init__(reason)
        self.reason, self.where = reason, where


class Decoder:
    """Turn raw samples into per-modality items, skipping and counting what cannot be used.

    Random augmentations are seeded per (seed, epoch, sample key), so a sample is augmented the same way whatever
    worker or process reads it, and a resumed run sees exactly the batches an uninterrupted run would.
    Decoders signal unusable input with ``DataError``; any other exception is a bug and propagates.
    """

    def __init__(self, modalities: dict[str, Modality], train: bool, stats: SkipStats, seed: int = 0, epoch: int = 0):
        self.modalities = modalities
        self.train = train
        self.stats = stats
        self.seed = f"{seed}:{epoch}:"

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                yield self.decode(sample)
            except SkipSample as e:
                self.stats.add(e.reason, e.where)

    def decode(self, sample: dict) -> dict:
        key = sample.get("__key__")
        where = f"{sample.get('__url__', '?')}:{key}"
        out: dict[str, Any] = {"__key__": key, "label": decode_label(sample, where)}
        with seeded(zlib.crc32(f"{self.seed}{key}".encode())):
            for name, modality in self.modalities.items():
                member = find_member(sample, name, modality.extensions)
                if member is None:
                    other = next((k for k in sample if k.split(".", 1)[0] == name), None)
                    if other is not None:
                        raise SkipSample(f"unsupported {name} type",
                                         f"{where}: {other} (reads {', '.join(modality.extensions)})")
                    if not modality.cfg.optional:
                        raise SkipSample(f"missing {name}", where)
                    out[name] = None  # absent: the Batcher puts the modality's placeholder in its row
                    continue
                try:
                    item = modality.decode_member(sample, member)
                    out[name] = modality.transform(item, self.train)
                except DataError as e:
                    raise SkipSample(f"bad {name}", f"{where}: {member}: {e}") from None
        if all(out[name] is None for name in self.modalities):
            raise SkipSample("missing every modality", where)
        return out


def shard_labels(urls: list[str]) -> Counter:
    """Samples per label (``label.txt``/``cls``; ``None`` for samples without one) over ``urls``, from the tar headers
    and the label members only: nothing is decoded, so a check of the labels costs a read of the shards, not an
    evaluation. A shard that cannot be read is left out (the evaluation that reads it counts it as skipped)."""
    counts: Counter = Counter()
    for url in urls:
        labels: dict[str, str | None] = {}  # sample key -> its label
        try:
            with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                    if key is None:
                        continue
                    labels.setdefault(key, None)
                    if ext in LABEL_KEYS:
                        labels[key] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
        except Exception as e:  # unreadable or corrupt: what was read before still counts
            log.debug("labels of %s: %s", url, describe_error(e))
        counts.update(labels.values())
    return counts


def decode_label(sample: dict, where: str) -> str | None:
    label = next((sample[k] for k in LABEL_KEYS if k in sample), None)
    if not isinstance(label, bytes):
        return label
    try:
        return label.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SkipSample("bad label", f"{where}: {e}") from None


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


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    log.warning(message)


def loader_workers(n_shards: int, num_workers: int, train: bool = True, resampled: bool = False) -> int:
    """DataLoader workers for this process: never more than the shards it reads in a pass (idle workers only cost).

    With fewer shards than processes every process reads every shard and keeps its share of the samples.
    """
    world = world_size() if train else 1
    if resampled:
        return num_workers
    if n_shards < world:
        warn_once(f"{n_shards} shard(s) for {world} processes: every process reads every shard and keeps 1/{world} "
                  f"of the samples; write at least processes x workers shards to read them in parallel")
        mine = n_shards
    else:
        mine = len(range(rank(), n_shards, world))
    workers = min(num_workers, mine)
    if workers < num_workers:
        warn_once(f"{mine} shard(s) for this process: using {workers} DataLoader worker(s) instead of {num_workers}")
    return workers


def make_dataset(
    urls: list[str],
    modalities: dict[str, Modality],
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    workers: int = 1,
) -> wds.DataPipeline:
    """The WebDataset pipeline for one pass (epoch) over ``urls``.

    Epoch mode reads every shard once, in an order shuffled per (seed, epoch); resampled mode draws as many shards
    with replacement, seeded per (seed, epoch, rank, worker). Either way a pass is reproducible from its seed.
    """
    stats = SkipStats()
    # Training splits the shards between processes; evaluation runs in one process and reads them all.
    shard_level_split = not train or len(urls) >= world_size()
    if resampled:
        per_worker = math.ceil(len(urls) / (world_size() * max(1, workers)))
        shard_seed = zlib.crc32(f"shards:{seed}:{epoch}".encode())  # webdataset adds the rank and worker to it
        stages: list = [wds.ResampledShards(urls, nshards=per_worker, seed=shard_seed, deterministic=True)]
    else:
        order = list(urls)
        if train:
            random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        stages = [wds.SimpleShardList(order)]
        if train and shard_level_split:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages.append(ShardReader(stats))
    if not resampled and not shard_level_split:
        stages.append(split_samples_by_node)
    if train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                                  rng=random.Random(f"samples:{seed}:{epoch}")))
    stages.append(Decoder(modalities, train, stats, seed, epoch))
    stages.append(Batcher(modalities, batch_size, train, stats))
    return wds.DataPipeline(*stages)


def make_loader(dataset: wds.DataPipeline, workers: int, pin_memory: bool = False, seed: int = 0):
    """A DataLoader over a batched pipeline.

    Its own generator keeps worker seeds deterministic and leaves the global RNG (dropout, ...) untouched. Workers
    ignore the stop signals a cluster sends to every process of a job: the loop finishes its step with them.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals,
    )


def pass_items(urls, modalities, batch_size, train, seed=0, epoch=0, shuffle_buffer=1000, resampled=False,
               num_workers=0, pin_memory: bool = False) -> Iterator[dict]:
    """The DataLoader's items for one pass: batches and stats-only items (``_empty``), in a reproducible order."""
    workers = loader_workers(len(urls), num_workers, train, resampled)
    if workers:
        for modality in modalities.values():
            modality.prepare()  # once here, not in every worker of every pass (a tokenizer takes ~0.1 s to load)
    dataset = make_dataset(urls, modalities, batch_size, train, seed, epoch, shuffle_buffer, resampled, workers)
    return iter(make_loader(dataset, workers, pin_memory, seed=zlib.crc32(f"loader:{seed}:{epoch}".encode())))


def counted_batches(items: Iterable[dict], skips: dict, replay: int = 0) -> Iterator[tuple[int, dict]]:
    """``(number, batch)`` for the batches of one pass (numbered from 1), merging skip counts into ``skips``.

    A batch is handed out once the next one (or the end of the pass) has been read, so that when the last batch of a
    pass is used, the pass's skip counts are complete. The first ``replay`` batches (a resumed run's position) are
    read but not handed out; their skip counts, and those read with the batch after them, were counted before the
    checkpoint and are not counted again. The first skip for a reason is logged with its example.
    """
    counting = replay == 0
    produced = 0
    pending = None
    for item in items:
        is_batch = not item.get("_empty")
        produced += is_batch
        if counting:
            report_skips(skips, item.get("_skipped"))
        elif is_batch and produced == replay + 1:
            counting = True
        if is_batch and produced > replay:
            if pending is not None:
                yield pending
            pending = (produced, item)
    if pending is not None:
        yield pending


def iterate_batches(urls, modalities, batch_size, train, seed=0, epoch=0, shuffle_buffer=1000, resampled=False,
                    num_workers=0, skips: dict | None = None, pin_memory: bool = False) -> Iterator[dict]:
    """Batches of one pass, with skip counts merged into ``skips``. The DataLoader workers start decoding when this
    is called, not at the first batch, so that work done in between (a label check) overlaps their decoding."""
    items = pass_items(urls, modalities, batch_size, train, seed, epoch, shuffle_buffer, resampled, num_workers,
                       pin_memory)
    return (batch for _, batch in counted_batches(items, {} if skips is None else skips))
