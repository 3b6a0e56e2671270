"""Zero-shot evaluation throughput: ``mmalign eval zeroshot`` vs a plain loop that embeds the same images.

Both classify the same labelled image shards (synthetic photo-like PNGs, a label from 12 classes each, built offline
once) with the same tiny open_clip CLIP architecture (``benchmarks.bench_train_step.TINY_CLIP``, from scratch, so
accuracy is at chance: only the speed matters), one prompt template per class, the same batch size and the same
number of DataLoader workers:

* ``mmalign``: :func:`mmalign.eval.runner.evaluate_zeroshot` as ``mmalign eval zeroshot`` runs it (its default
  workers: one per shard, at most 4 and the CPUs), on an ``AlignmentModel`` whose towers are that architecture's
  (``tower: open_clip``, ``proj: none``). It also checks every label against the classes, counts skipped samples,
  builds presence masks and computes top-k, per-class recall and the confusion matrix.
* ``mmalign, 0 workers``: the same with ``--workers 0`` (the default before), to show what the workers buy.
* ``plain loop``: open_clip's model and evaluation transform, ``wds.WebDataset(...).decode("pilrgb")
  .to_tuple("image.png", "label.txt").map_tuple(transform, ...).batched(...)`` in a ``wds.WebLoader`` with the same
  workers, ``encode_image``, normalise, multiply by the class embeddings (``encode_text`` of the prompts), top-1.

Throughput = images / wall time of the whole evaluation (classifier, worker start-up and metrics included). The
loops alternate for several rounds after an untimed warm-up each; ratios are mmalign / plain loop per round
(median reported). Results go to ``results.json`` / ``results.md`` (section ``eval_zeroshot_cpu``).

    python -m benchmarks.bench_eval            # full run: 2,000 images (about two minutes on 2 busy CPU cores)
    python -m benchmarks.bench_eval --quick    # smoke test on 64 images, into benchmarks/_work/
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks._data import THINGS, WORK_DIR, image_text_shards
from benchmarks._results import bench_parser, describe_machine, machine_info, publish
from benchmarks.bench_data import cpu_seconds
from benchmarks.bench_train_step import MODEL, TINY_CLIP, register_model

log = logging.getLogger(__name__)

METHODS = ["mmalign", "mmalign, 0 workers", "plain loop"]
PACKAGES = ("open_clip", "webdataset")
TEMPLATE = "a photo of a {}."
IMAGE_PX = 64


def mmalign_eval(urls: list[str], classes: Path, templates: Path, batch_size: int, workers: int | None
                 ) -> Callable[[], tuple[int, float]]:
    """An evaluation ``() -> (images, top-1)`` through ``evaluate_zeroshot`` (``workers`` None: its default)."""
    from mmalign.build import build_model
    from mmalign.config import load_config
    from mmalign.eval.runner import evaluate_zeroshot

    towers = {name: {"tower": "open_clip", "model": MODEL, "proj": "none"} for name in ("image", "text")}
    model = build_model(load_config(base={"run_dir": "unused", "data": {"train": urls[0]},
                                          "model": {"embed_dim": TINY_CLIP["embed_dim"], "modalities": towers}}))

    def evaluate() -> tuple[int, float]:
        out = evaluate_zeroshot(model, "::".join(urls), str(classes), str(templates), batch_size=batch_size,
                                num_workers=workers)
        return out["zeroshot_n"], out["zeroshot_top1"]

    return evaluate


def _keep(x):
    return x


def plain_loop(urls: list[str], batch_size: int, workers: int) -> Callable[[], tuple[int, float]]:
    """The same evaluation as a user would write it with open_clip and webdataset."""
    import open_clip
    import torch
    import torch.nn.functional as F
    import webdataset as wds

    model, _, transform = open_clip.create_model_and_transforms(MODEL)
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    index = {c: i for i, c in enumerate(THINGS)}

    @torch.no_grad()
    def evaluate() -> tuple[int, float]:
        classifier = F.normalize(model.encode_text(tokenizer([TEMPLATE.format(c) for c in THINGS])), dim=-1)
        dataset = (wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("image.png", "label.txt")
                   .map_tuple(transform, _keep).batched(batch_size))
        n = correct = 0
        for images, labels in wds.WebLoader(dataset, batch_size=None, num_workers=workers):
            logits = F.normalize(model.encode_image(images), dim=-1) @ classifier.T
            target = torch.tensor([index[label] for label in labels])
            correct += int((logits.argmax(dim=-1) == target).sum())
            n += len(labels)
        return n, correct / n

    return evaluate


def run(evals: dict[str, Callable[[], tuple[int, float]]], rounds: int) -> list[dict]:
    """One untimed evaluation per method, then ``rounds`` timed ones each, order rotating; returns the rows."""
    for method in METHODS:
        evals[method]()
    rows = []
    for r in range(rounds):
        for method in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            c0, t0 = cpu_seconds(), time.perf_counter()
            n, top1 = evals[method]()
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            rows.append({"kind": "pass", "method": method, "round": r, "images": n, "top1": top1, "time_s": dt,
                         "cpu_s": cpu, "samples_per_s": n / dt, "samples_per_cpu_s": n / cpu})
            log.info("round %d %s: %d images in %.2f s = %.0f images/s", r, method, n, dt, n / dt)
    return rows


def summarise(passes: list[dict]) -> list[dict]:
    """Per method: median (min, max) images/s and images per CPU second; mmalign / plain loop, median over rounds."""
    out = []
    for method in METHODS:
        rates = [p["samples_per_s"] for p in passes if p["method"] == method]
        out.append({"kind": "summary", "method": method, "samples_per_s": statistics.median(rates),
                    "min": min(rates), "max": max(rates), "samples_per_cpu_s": statistics.median(
                        p["samples_per_cpu_s"] for p in passes if p["method"] == method)})
    rounds: dict[int, dict] = {}
    for p in passes:
        rounds.setdefault(p["round"], {})[p["method"]] = p["samples_per_s"]
    for method in METHODS[:2]:
        per_round = [r[method] / r["plain loop"] for r in rounds.values()]
        out.append({"kind": "ratio", "method": method, "of": f"{method} / plain loop samples/s",
                    "ratio": statistics.median(per_round), "per_round": per_round})
    return out


def markdown(rows: list[dict], quick: bool) -> str:
    machine, setup = rows[0], rows[1]
    v = TINY_CLIP["vision_cfg"]
    out = [f"Zero-shot evaluation throughput: {setup['images']:,} PNG images of {IMAGE_PX} px in {setup['shards']} "
           f"shards, {len(THINGS)} classes, one template, tiny open_clip ViT ({v['layers']} x {v['width']}, "
           f"{v['image_size']} px), batch {setup['batch_size']}, {setup['workers']} DataLoader worker(s) (mmalign's "
           f"default here) except where 0, {setup['rounds']} rounds (order rotating)"
           f"{' (QUICK smoke run: tiny data, not representative)' if quick else ''}.", "",
           f"Machine: {describe_machine(machine, PACKAGES)}", "",
           "mmalign: `evaluate_zeroshot`, what `mmalign eval zeroshot` runs (label check, skip counts, masks, top-k, "
           "per-class recall, confusion matrix); plain loop: open_clip's model and evaluation transform in a bare "
           "webdataset loop, top-1 only (see the module docstring). Images/s: wall time of the whole evaluation, "
           "classifier and worker start-up included.", "",
           "| loop | images/s (median) | min | max | images per CPU s | / plain loop |", "|---|---:|---:|---:|---:|---:|"]
    ratios = {r["method"]: r for r in rows if r["kind"] == "ratio"}
    for s in (r for r in rows if r["kind"] == "summary"):
        rel = f"**{ratios[s['method']]['ratio']:.2f}**" if s["method"] in ratios else "1.00"
        out.append(f"| {s['method']} | {s['samples_per_s']:,.0f} | {s['min']:,.0f} | {s['max']:,.0f} | "
                   f"{s['samples_per_cpu_s']:,.0f} | {rel} |")
    out.append("")
    out += [f"{m} / plain loop images/s = {r['ratio']:.2f}; per round "
            f"{', '.join(f'{x:.2f}' for x in r['per_round'])}." for m, r in ratios.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench_eval", __doc__, "64 images", WORK_DIR)
    p.add_argument("--images", type=int, help="default 2,000, quick 64")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, help="timed evaluations per loop (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (all loops)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from mmalign.eval.embed import eval_workers

    images = args.images or (64 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    work = Path(args.work_dir)
    register_model(work)
    urls = image_text_shards(images, max(1, images // 8), IMAGE_PX, work, labelled=True)
    classes, templates = work / "eval-classes.txt", work / "eval-templates.txt"
    classes.write_text("\n".join(THINGS) + "\n")
    templates.write_text(TEMPLATE + "\n")
    workers = eval_workers(len(urls))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        machine = machine_info("cpu", PACKAGES)
        evals = {"mmalign": mmalign_eval(urls, classes, templates, args.batch_size, None),
                 "mmalign, 0 workers": mmalign_eval(urls, classes, templates, args.batch_size, 0),
                 "plain loop": plain_loop(urls, args.batch_size, workers)}
        passes = run(evals, rounds)
        machine["loadavg_end"] = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads)
    setup = {"kind": "setup", "images": images, "shards": len(urls), "batch_size": args.batch_size,
             "workers": workers, "rounds": rounds}
    rows = [machine, setup, *summarise(passes), *passes]
    publish("eval_zeroshot_cpu", rows, markdown(rows, args.quick), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
