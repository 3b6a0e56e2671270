"""Shard loading throughput: mmalign's data pipeline vs a bare webdataset loop doing the same work.

Both read the same image + caption shards (synthetic photo-like images and captions, built offline once and cached
in ``benchmarks/_work/``) with the same number of DataLoader workers and produce the same training batches: image ->
RGB PIL image -> open_clip's training transform (random resized crop, normalise) -> stacked float tensor, and the
captions tokenised with open_clip's CLIP tokenizer, batch by batch, last partial batch dropped, no shuffling. Three
datasets (``DATASETS``): tiny PNGs (per-sample overhead shows), 256-512 px JPEGs cropped to 224 (what photo
datasets written by img2dataset and the like hold) and 800-1,600 px JPEGs (photos as cameras write them), where
mmalign decodes at reduced size (:meth:`mmalign.modalities.image.ImageModality.decode`).

* ``mmalign``: ``mmalign.data.iterate_batches`` (train mode, ``shuffle_buffer: 0``) with an image and an open_clip
  text modality. On top of the bare loop it reads shard by shard counting broken shards, looks modality members up
  by name, seeds each sample's augmentation from its key (reproducible whatever worker reads it), counts skipped
  samples per reason and carries the counts in the batches, builds presence masks and attention masks, and counts
  truncated captions.
* ``webdataset``: ``wds.WebDataset(...).decode("pilrgb").to_tuple(...).map_tuple(transform, ...)
  .batched(...).map_tuple(..., tokenizer)`` in a ``wds.WebLoader`` (``pilrgb``: PIL converted to RGB, as mmalign
  does).

Throughput = samples / wall time of a whole pass (worker start-up included, as in training). The two alternate
(ABBA order) for several rounds after an untimed warm-up pass each; the ratios are mmalign / webdataset per round
(medians reported), in samples/s and in samples per CPU second. Results go to ``results.json`` / ``results.md``
(section ``data_cpu``).

    python -m benchmarks.bench_data            # full run (a few minutes on 2 busy CPU cores)
    python -m benchmarks.bench_data --quick    # smoke test on a few samples per dataset, into benchmarks/_work/
"""
from __future__ import annotations

import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks._data import WORK_DIR, image_text_shards
from benchmarks._results import bench_parser, describe_machine, machine_info, publish

log = logging.getLogger(__name__)

METHODS = ["mmalign", "webdataset"]
PACKAGES = ("open_clip", "webdataset")
TOKENIZER = "ViT-B-32"  # open_clip's CLIP BPE (ships with open_clip: offline)
TARGET_RATIO = 1.0  # mmalign / webdataset, in samples/s and in samples per CPU second
# name -> image format, image sides (each drawn from the range), training crop, samples (full, quick), shard size
DATASETS = {
    "png": {"fmt": "png", "image_px": (72, 72), "crop": 64, "samples": (2000, 128), "shard_size": (250, 32)},
    "jpeg": {"fmt": "jpg", "image_px": (256, 512), "crop": 224, "samples": (640, 32), "shard_size": (80, 8)},
    "jpeg-large": {"fmt": "jpg", "image_px": (800, 1600), "crop": 224, "samples": (256, 16), "shard_size": (32, 4)},
}


def mmalign_loader(batch_size: int, workers: int, crop: int) -> Callable[[list[str], int], tuple[int, int]]:
    """A pass ``(urls, epoch) -> (samples, skipped)`` through ``mmalign.data.iterate_batches`` in train mode, with
    an image and an open_clip text modality built once (as a training run builds them)."""
    from mmalign.config import ModelConfig, from_dict
    from mmalign.data import iterate_batches
    from mmalign.modalities import build_modality

    cfg = from_dict(ModelConfig, {"modalities": {
        "image": {"tower": "small_cnn", "image_size": crop},
        "text": {"tower": "open_clip", "model": TOKENIZER},
    }})
    modalities = {name: build_modality(name, m) for name, m in cfg.modalities.items()}

    def one_pass(urls: list[str], epoch: int) -> tuple[int, int]:
        skips: dict = {}
        n = 0
        for batch in iterate_batches(urls, modalities, batch_size, train=True, seed=0, epoch=epoch,
                                     shuffle_buffer=0, num_workers=workers, skips=skips):
            n += len(batch["__key__"])
        return n, sum(skips.get("counts", {}).values())

    return one_pass


def _keep(x):
    return x


def webdataset_loader(batch_size: int, workers: int, crop: int, fmt: str = "png"
                      ) -> Callable[[list[str], int], tuple[int, int]]:
    """A pass ``(urls, epoch) -> (samples, 0)`` through a bare webdataset loop doing the same decoding, transforms
    and batching (transform and tokenizer built once)."""
    import open_clip
    import webdataset as wds

    from mmalign.modalities.image import OPENAI_MEAN, OPENAI_STD

    transform = open_clip.image_transform(crop, is_train=True, mean=OPENAI_MEAN, std=OPENAI_STD,
                                          resize_mode="shortest", interpolation="bicubic",
                                          aug_cfg={"scale": (0.8, 1.0)})
    tokenizer = open_clip.get_tokenizer(TOKENIZER)

    def one_pass(urls: list[str], epoch: int) -> tuple[int, int]:
        dataset = (wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple(f"image.{fmt}", "text.txt")
                   .map_tuple(transform, _keep).batched(batch_size, partial=False).map_tuple(_keep, tokenizer))
        n = 0
        for images, _ in wds.WebLoader(dataset, batch_size=None, num_workers=workers):
            n += len(images)
        return n, 0

    return one_pass


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(dataset: str, urls: list[str], batch_size: int, workers: int, rounds: int) -> list[dict]:
    """Warm-up pass of each method, then ``rounds`` timed passes of each in ABBA order; returns the rows."""
    crop, fmt = DATASETS[dataset]["crop"], DATASETS[dataset]["fmt"]
    passes = {"mmalign": mmalign_loader(batch_size, workers, crop),
              "webdataset": webdataset_loader(batch_size, workers, crop, fmt)}
    for method in METHODS:  # untimed: page cache, lazy set-up, imports
        passes[method](urls[:max(1, workers)], 0)
    rows: list[dict] = []
    for r in range(rounds):
        for method in METHODS if r % 2 == 0 else METHODS[::-1]:
            c0, t0 = cpu_seconds(), time.perf_counter()
            n, skipped = passes[method](urls, r)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            rows.append({"kind": "pass", "dataset": dataset, "method": method, "round": r, "samples": n,
                         "skipped": skipped,
                         "time_s": dt, "cpu_s": cpu, "samples_per_s": n / dt, "samples_per_cpu_s": n / cpu})
            log.info("%s round %d %s: %d samples in %.2f s (%.2f CPU s) = %.0f samples/s", dataset, r, method, n,
                     dt, cpu, n / dt)
    return rows


def summarise(passes: list[dict]) -> list[dict]:
    """Per method (of one dataset): median (min, max) samples/s and median samples per CPU second; mmalign /
    webdataset.

    The ratio is the median of the per-round ratios: a round's two passes run back to back, so they see about the
    same load from other processes.
    """
    dataset = passes[0]["dataset"]
    out = []
    for method in METHODS:
        mine = [p for p in passes if p["method"] == method]
        rates = [p["samples_per_s"] for p in mine]
        out.append({"kind": "summary", "dataset": dataset, "method": method, "passes": len(mine),
                    "samples_per_pass": mine[0]["samples"],
                    "samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                    "samples_per_cpu_s": statistics.median(p["samples_per_cpu_s"] for p in mine)})
    rounds: dict[int, dict] = {}
    for p in passes:
        rounds.setdefault(p["round"], {})[p["method"]] = p
    wall = [r["mmalign"]["samples_per_s"] / r["webdataset"]["samples_per_s"] for r in rounds.values()]
    cpu = [r["mmalign"]["samples_per_cpu_s"] / r["webdataset"]["samples_per_cpu_s"] for r in rounds.values()]
    out.append({"kind": "ratio", "dataset": dataset, "of": "mmalign / webdataset", "ratio": statistics.median(wall),
                "per_round": wall,
                "cpu_ratio": statistics.median(cpu), "cpu_per_round": cpu})
    return out


def markdown(rows: list[dict], quick: bool) -> str:
    machine = next(r for r in rows if r["kind"] == "machine")
    setups = [r for r in rows if r["kind"] == "setup"]
    common = setups[0]
    out = [f"Shard loading throughput: image + caption samples, CLIP tokenizer, batch {common['batch_size']}, "
           f"{common['workers']} DataLoader worker(s) in both loops, {common['rounds']} rounds of one pass each "
           f"(order alternating){' (QUICK smoke run: tiny data, not representative)' if quick else ''}.",
           "", f"Machine: {describe_machine(machine, PACKAGES)}", "",
           "Both loops decode the image to an RGB PIL image, apply open_clip's training transform, stack the images "
           "and tokenise the captions per batch; mmalign also seeds each sample's augmentation from its key, counts "
           "skipped samples per reason, and builds presence and attention masks, and it decodes a JPEG at reduced "
           "size when no training crop would then be enlarged (see the module docstring). Samples/s: wall time of a "
           "whole pass, worker start-up included. Samples per CPU s: the same pass over the CPU time of the process "
           "and its workers (less sensitive to other processes' load). Ratios: medians of the per-round ratios.", "",
           "| data | loader | samples/s (median) | min | max | samples per CPU s | mmalign / webdataset: samples/s "
           "| per CPU s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for setup in setups:
        name = setup["dataset"]
        low, high = setup["image_px"]
        kind = "PNG" if setup["format"] == "png" else "JPEG"
        sides = f"{low}" if low == high else f"{low}-{high}"
        data = f"{name}: {setup['samples']:,} {kind}s of {sides} px, {setup['shards']} shards, {setup['crop']} px crop"
        summary = {r["method"]: r for r in rows if r["kind"] == "summary" and r["dataset"] == name}
        ratio = next(r for r in rows if r["kind"] == "ratio" and r["dataset"] == name)
        for method in METHODS:
            s = summary[method]
            rel = (f"{ratio['ratio']:.2f} | {ratio['cpu_ratio']:.2f}" if method == "mmalign" else "1.00 | 1.00")
            out.append(f"| {data if method == METHODS[0] else ''} | {method} | {s['samples_per_s']:,.0f} | "
                       f"{s['min']:,.0f} | {s['max']:,.0f} | {s['samples_per_cpu_s']:,.0f} | {rel} |")
        met = "met" if min(ratio["ratio"], ratio["cpu_ratio"]) >= TARGET_RATIO else "NOT met"
        skipped = sum(r["skipped"] for r in rows if r["kind"] == "pass" and r["dataset"] == name)
        notes.append(f"{name}: mmalign / webdataset = {ratio['ratio']:.2f} samples/s, {ratio['cpu_ratio']:.2f} per "
                     f"CPU s ({met}, target >= {TARGET_RATIO} in both); per round "
                     f"{', '.join(f'{x:.2f}' for x in ratio['per_round'])}; samples skipped by mmalign: {skipped}.")
    return "\n".join(out + [""] + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench_data", __doc__, "a few samples per dataset", WORK_DIR)
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                   help="which datasets (default: all)")
    p.add_argument("--batch-size", type=int, help="default 64, quick 16")
    p.add_argument("--workers", type=int, help="DataLoader workers, both loops (default 2, quick 1)")
    p.add_argument("--rounds", type=int, help="timed passes per loader and dataset (default 8, quick 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    batch_size = args.batch_size or (16 if args.quick else 64)
    workers = args.workers if args.workers is not None else (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 8)
    machine = machine_info("cpu", PACKAGES)
    rows: list[dict] = []
    for name in args.datasets:
        spec = DATASETS[name]
        samples, shard_size = spec["samples"][args.quick], spec["shard_size"][args.quick]
        urls = image_text_shards(samples, shard_size, spec["image_px"], Path(args.work_dir), spec["fmt"])
        rows.append({"kind": "setup", "dataset": name, "format": spec["fmt"], "samples": samples, "shards": len(urls),
                     "image_px": spec["image_px"], "crop": spec["crop"], "batch_size": batch_size, "workers": workers,
                     "rounds": rounds})
        passes = run(name, urls, batch_size, workers, rounds)
        rows += [*summarise(passes), *passes]
    machine["loadavg_end"] = os.getloadavg()[0]
    rows = [machine, *rows]
    publish("data_cpu", rows, markdown(rows, args.quick), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
