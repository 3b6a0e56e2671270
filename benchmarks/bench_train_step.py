"""Training step time: mmalign's training loop vs open_clip's own training step, same tiny model, float32, CPU.

The model is one tiny open_clip CLIP architecture (ViT image tower, text transformer, registered from
``TINY_CLIP``) built from scratch on both sides: open_clip's ``CLIP`` as ``open_clip_train.main`` builds it, and an
mmalign ``AlignmentModel`` whose image and text towers are that architecture's (``tower: open_clip``) with
``proj: none``, so both compute the same network. Same batch size, CLIP loss, AdamW settings (lr, betas, eps,
weight decay off for gains and biases), warm-up + cosine schedule, gradient clipping at norm 1, logging interval, one process, float32. Each loop
keeps its own defaults otherwise (mmalign: torch's fused AdamW kernel; open_clip: torch's default AdamW).

Settings (``SETTINGS``):

* ``clip``: both towers trained, each loop as it is and compiled (mmalign ``train.compile: true``, open_clip_train
  ``--torchcompile``; the compiling steps are among the untimed first ones).
* ``lit_locked_text``: LiT as users fine-tune most, a trained image tower against a locked text tower: mmalign with
  ``lock: true, cache_frozen: true`` on the text tower, open_clip_train with ``--lock-text``.
* ``lit_locked_image``: a trained text tower against a locked image tower: mmalign with ``lock`` and
  ``cache_frozen`` on the image tower (which then reads images with the evaluation transform), open_clip_train with
  ``--lock-image``.
* ``clip_resnet``: both towers trained, with a convolutional image tower: a tiny open_clip ModifiedResNet
  (``TINY_RESNET``, BatchNorm) in place of the ViT.
* ``clip_resnet_channels_last``: the same, mmalign with ``train.channels_last: true`` (open_clip_train has no such
  switch); its mmalign time over ``clip_resnet``'s is what channels-last buys.

The LiT settings run several passes (epochs) over a smaller set and time the steps after the first pass, once
mmalign's cache holds every frozen feature (steady state; the first pass encodes as open_clip does every pass).

* ``open_clip``: ``open_clip_train.train.train_one_epoch`` with the model, optimizer, scheduler, loss and data
  (``open_clip_train.data.get_data``) set up the way ``open_clip_train.main`` sets them up.
* ``mmalign``: ``mmalign.train.train`` on a recipe with the same settings (the whole loop: Accelerate, skip
  counting, non-finite checks, metrics; checkpoints only at the end, outside the timed steps).

Both read the same synthetic image + caption samples (built offline once), each through its own data pipeline with
no workers: mmalign from webdataset shards, open_clip from the same image files listed in a CSV (its
``--dataset-type csv``), because open_clip_train's webdataset reader fails on webdataset 1.0, which mmalign uses (its
``group_by_keys_nothrow`` raises ``KeyError: 'fname'`` on the end-of-shard marker that webdataset 1.0 yields; the
``open_clip_torch[training]`` extra pins webdataset <= 0.2.86). A step's time is the time between the ends of two
consecutive optimiser steps minus the time spent waiting for the batch (the pipelines differ; the data benchmark
compares mmalign's with a bare webdataset loop), so it counts everything a loop does per step besides loading data:
forward, loss, backward, clipping, optimiser, schedule, bookkeeping and logging. The first ``--warmup`` steps of
each run are left out. The two alternate (one run of each per round and variant, order alternating) and the medians
over all timed steps are compared. Results go to ``results.json`` / ``results.md`` (section ``train_step_cpu``).

    python -m benchmarks.bench_train_step            # full run (about five minutes on 2 busy CPU cores)
    python -m benchmarks.bench_train_step --quick    # smoke test: a few steps, into benchmarks/_work/
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from unittest import mock

from benchmarks._data import WORK_DIR, as_csv, image_text_shards
from benchmarks._results import bench_parser, describe_machine, machine_info, publish

log = logging.getLogger(__name__)

METHODS = ["mmalign", "open_clip"]
MODEL = "mmalign-bench-tiny-vit"
TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}}
RESNET_MODEL = "mmalign-bench-tiny-resnet"
TINY_RESNET = {**TINY_CLIP, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32}}
MODEL_CONFIGS = {MODEL: TINY_CLIP, RESNET_MODEL: TINY_RESNET}
# the optimisation settings both loops get
LR, WD, BETAS, EPS, WARMUP_STEPS, GRAD_CLIP, LOG_EVERY = 5e-4, 0.2, (0.9, 0.98), 1e-6, 2, 1.0, 5
TARGET_RATIO = 0.90  # mmalign / open_clip s/step, both towers trained, neither loop compiled


def register_model(work_dir: Path) -> None:
    """Make ``MODEL`` and ``RESNET_MODEL`` open_clip architecture names (as a user with a custom model config
    would)."""
    import open_clip

    folder = work_dir / "open_clip_configs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in MODEL_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")


class StepClock:
    """Ends of optimiser steps (a global optimizer hook) and the intervals spent waiting for batches."""

    def __init__(self):
        self.step_ends: list[float] = []
        self.waits: list[tuple[float, float]] = []

    @contextmanager
    def recording(self) -> Iterator["StepClock"]:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(lambda *_: self.step_ends.append(time.perf_counter()))
        try:
            yield self
        finally:
            handle.remove()

    def timed(self, batches) -> Iterator:
        """``batches``, recording how long each ``next`` takes."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append((t0, time.perf_counter()))
            yield batch

    def step_times(self, warmup: int) -> list[float]:
        """Per step after the first ``warmup``: time between consecutive step ends minus the batch waits inside."""
        out = []
        for i in range(max(1, warmup), len(self.step_ends)):
            start, end = self.step_ends[i - 1], self.step_ends[i]
            wait = sum(b - a for a, b in self.waits if start <= a < end)
            out.append(end - start - wait)
        return out


class TimedLoader:
    """A data loader whose iteration goes through ``StepClock.timed`` (what ``train_one_epoch`` reads of it)."""

    def __init__(self, loader, clock: StepClock):
        self.loader, self.clock = loader, clock
        self.num_batches, self.num_samples = loader.num_batches, loader.num_samples

    def __iter__(self) -> Iterator:
        return self.clock.timed(self.loader)


@dataclass(frozen=True)
class Setting:
    title: str
    locked: str | None = None  # the locked tower: "text" | "image" | None
    passes: int = 1  # epochs per run; with more than one, only the steps after the first are timed
    compile: tuple[bool, ...] = (False,)  # the runs of each loop: as it is (False) and compiled (True)
    model: str = MODEL  # the open_clip architecture both loops train
    channels_last: bool = False  # mmalign's train.channels_last


SETTINGS = {
    "clip": Setting("both towers trained", compile=(False, True)),
    "lit_locked_text": Setting("LiT: image tower trained, text tower locked", locked="text", passes=3),
    "lit_locked_image": Setting("image tower locked, text tower trained", locked="image", passes=3),
    "clip_resnet": Setting("both towers trained, ResNet image tower", model=RESNET_MODEL),
    "clip_resnet_channels_last": Setting("the same, mmalign with channels-last convolutions", model=RESNET_MODEL,
                                         channels_last=True),
}
# open_clip_train's locking flags; its CLIP.lock_text_tower asserts --lock-text-freeze-layer-norm (it freezes the
# LayerNorms with the other weights either way, as mmalign's lock does)
OPEN_CLIP_LOCK = {"text": ["--lock-text", "--lock-text-freeze-layer-norm"], "image": ["--lock-image"]}


def run_mmalign(data: dict, setting: Setting, compiled: bool, batch_size: int, steps: int, run_dir: Path,
                clock: StepClock) -> dict:
    """``mmalign.train.train`` on the tiny open_clip towers (its batch stream timed); returns parameter counts."""
    import mmalign.train
    from mmalign.build import build_model
    from mmalign.config import load_config

    towers = {name: {"tower": "open_clip", "model": setting.model, "proj": "none"} for name in ("image", "text")}
    if setting.locked:
        towers[setting.locked].update(lock=True, cache_frozen=True)
    cfg = load_config(base={
        "run_dir": str(run_dir), "seed": 0,
        "model": {"embed_dim": TINY_CLIP["embed_dim"], "modalities": towers},
        "loss": {"name": "clip"},
        "data": {"train": "::".join(data["shards"]), "batch_size": batch_size, "num_workers": 0},
        "train": {"steps": steps, "lr": LR, "weight_decay": WD, "betas": list(BETAS), "eps": EPS,
                  "warmup_steps": WARMUP_STEPS, "grad_clip": GRAD_CLIP, "precision": "no", "device": "cpu",
                  "checkpoint_every": steps, "keep_last": 1, "log_every": LOG_EVERY, "compile": compiled,
                  "channels_last": setting.channels_last},
        "eval": {"diagnostics": {"max_samples": batch_size}},
    })
    original = mmalign.train.batch_stream
    with mock.patch.object(mmalign.train, "batch_stream", lambda *a, **kw: clock.timed(original(*a, **kw))), \
            clock.recording():
        mmalign.train.train(cfg)
    return param_counts(build_model(cfg))


def param_counts(model) -> dict:
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_open_clip(data: dict, setting: Setting, compiled: bool, batch_size: int, steps: int, run_dir: Path,
                  clock: StepClock) -> dict:
    """``open_clip_train.train.train_one_epoch`` for ``setting.passes`` epochs of ``steps`` batches in all (the CSV
    lists one epoch), set up as ``open_clip_train.main`` does it (model, locking, compiling, AdamW groups, cosine
    schedule, loss, data)."""
    import torch
    from open_clip import create_loss, create_model_and_transforms, get_tokenizer
    from open_clip_train.data import get_data
    from open_clip_train.distributed import init_distributed_device
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    args = parse_args([
        "--model", setting.model, "--train-data", data["csv"], "--dataset-type", "csv", "--batch-size", str(batch_size),
        "--epochs", str(setting.passes),
        "--lr", str(LR), "--wd", str(WD), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
        "--warmup", str(WARMUP_STEPS), "--grad-clip-norm", str(GRAD_CLIP), "--precision", "fp32",
        "--workers", "0", "--device", "cpu", "--seed", "0", "--log-every-n-steps", str(LOG_EVERY),
        "--logs", str(run_dir),
        *(OPEN_CLIP_LOCK[setting.locked] if setting.locked else []), *(["--torchcompile"] if compiled else []),
    ])
    device = init_distributed_device(args)
    args.distill, args.wandb = False, False  # what main() derives from its (unset) distillation and report_to
    torch.manual_seed(args.seed)
    model, preprocess_train, preprocess_val = create_model_and_transforms(
        args.model, args.pretrained, precision=args.precision, device=device, output_dict=True, aug_cfg=args.aug_cfg)
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                              freeze_layer_norm=args.lock_text_freeze_layer_norm)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    counts = param_counts(model)
    if args.torchcompile:
        model = torch.compile(model)
    loaders = get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=get_tokenizer(args.model))
    loaders["train"].dataloader = TimedLoader(loaders["train"].dataloader, clock)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, loaders["train"].dataloader.num_batches * args.epochs)
    with clock.recording():
        for epoch in range(args.epochs):
            train_one_epoch(model, loaders, create_loss(args), epoch, optimizer, None, scheduler, None, args)
    return counts


RUNNERS = {"mmalign": run_mmalign, "open_clip": run_open_clip}


def variants(settings: list[str], compile_runs: bool) -> list[tuple[str, bool]]:
    """(setting, compiled) pairs to run, in order."""
    return [(name, c) for name in settings for c in SETTINGS[name].compile if compile_runs or not c]


def run(data: dict, todo: list[tuple[str, bool]], batch_size: int, steps: int, warmup: int, rounds: int,
        work: Path) -> list[dict]:
    """``rounds`` runs of each loop per variant, order alternating; one row per run with its timed steps. A LiT
    setting's run covers ``setting.passes`` passes over its data and leaves the first pass untimed."""
    import torch

    rows = []
    for r in range(rounds):
        for name, compiled in todo:
            setting = SETTINGS[name]
            run_steps, skip = lit_steps(steps, setting.passes) if setting.passes > 1 else (steps, warmup)
            for method in METHODS if r % 2 == 0 else METHODS[::-1]:
                clock = StepClock()
                run_dir = work / f"{method}-{name}-{int(compiled)}-{r}"
                shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (mmalign would resume a finished one)
                torch._dynamo.reset()  # each compiled run compiles its model as a fresh process would
                t0 = time.perf_counter()
                counts = RUNNERS[method](data[name], setting, compiled, batch_size, run_steps, run_dir, clock)
                times = clock.step_times(skip)
                rows.append({"kind": "run", "setting": name, "compiled": compiled, "method": method, "round": r,
                             "steps": len(clock.step_ends), "timed_steps": len(times), "step_s": times,
                             "median_step_s": statistics.median(times),
                             "data_wait_s": sum(b - a for a, b in clock.waits), "wall_s": time.perf_counter() - t0,
                             **counts})
                log.info("round %d %s%s %s: median step %.4f s over %d steps (%.1f s in all)", r, name,
                         " compiled" if compiled else "", method, rows[-1]["median_step_s"], len(times),
                         rows[-1]["wall_s"])
    return rows


def lit_steps(steps: int, passes: int) -> tuple[int, int]:
    """(steps per run, untimed steps) of a multi-pass setting: ``passes`` passes of ``steps // passes`` batches (at
    least 2), the first pass untimed."""
    per_pass = max(2, steps // passes)
    return per_pass * passes, per_pass


def summarise(runs: list[dict], todo: list[tuple[str, bool]], batch_size: int) -> list[dict]:
    """Per variant: median s/step per loop over all its timed steps; mmalign / open_clip of those medians, and of
    each round's two runs."""
    out = []
    for name, compiled in todo:
        medians = {}
        for method in METHODS:
            mine = [r for r in runs if (r["setting"], r["compiled"], r["method"]) == (name, compiled, method)]
            steps = [t for r in mine for t in r["step_s"]]
            medians[method] = statistics.median(steps)
            out.append({"kind": "summary", "setting": name, "compiled": compiled, "method": method,
                        "runs": len(mine), "timed_steps": len(steps), "median_step_s": medians[method],
                        "p10_step_s": _quantile(steps, 0.1), "p90_step_s": _quantile(steps, 0.9),
                        "samples_per_s": batch_size / medians[method], "params": mine[0]["params"],
                        "trainable": mine[0]["trainable"]})
        per_round: dict[int, dict] = {}
        for r in runs:
            if (r["setting"], r["compiled"]) == (name, compiled):
                per_round.setdefault(r["round"], {})[r["method"]] = r["median_step_s"]
        out.append({"kind": "ratio", "setting": name, "compiled": compiled, "of": "mmalign / open_clip s/step",
                    "ratio": medians["mmalign"] / medians["open_clip"],
                    "per_round": [v["mmalign"] / v["open_clip"] for v in per_round.values()]})
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def variant_name(name: str, compiled: bool) -> str:
    return f"{name}{', compiled' if compiled else ''}"


def markdown(rows: list[dict], quick: bool) -> str:
    machine = next(r for r in rows if r["kind"] == "machine")
    setup = next(r for r in rows if r["kind"] == "setup")
    summaries = [r for r in rows if r["kind"] == "summary"]
    ratios = {(r["setting"], r["compiled"]): r for r in rows if r["kind"] == "ratio"}
    v, t = TINY_CLIP["vision_cfg"], TINY_CLIP["text_cfg"]
    out = [f"Training step time, tiny open_clip CLIP from scratch (ViT {v['layers']} x {v['width']}, patch "
           f"{v['patch_size']}, {v['image_size']} px; text {t['layers']} x {t['width']}, {t['context_length']} "
           f"tokens, vocabulary {t['vocab_size']:,}; embedding {TINY_CLIP['embed_dim']}), batch "
           f"{setup['batch_size']}, float32, CPU, {machine['threads']} torch thread(s), {setup['rounds']} rounds of "
           f"one run per loop and setting ({setup['steps']} steps per run, the first {setup['warmup']} not timed; "
           f"LiT settings: {setup['lit_passes']} passes of {setup['lit_steps'][1]} steps, the first pass not timed)"
           f"{' (QUICK smoke run: a few steps, not representative)' if quick else ''}.", "",
           f"Machine: {describe_machine(machine)}", "",
           "Same architecture, batch, CLIP loss, AdamW (lr, betas, eps, weight decay groups), warm-up + cosine "
           "schedule, gradient clipping at 1.0 and logging every "
           f"{LOG_EVERY} steps on both sides. Both read the same synthetic samples through their own data pipeline "
           "with no workers: mmalign from webdataset shards, open_clip from the same images as files listed in a "
           "CSV (`--dataset-type csv`), because open_clip_train's webdataset reader fails on webdataset 1.0 "
           "(`KeyError: 'fname'` on its end-of-shard marker; open_clip's training extra pins webdataset <= "
           "0.2.86). Loading is not timed: a step is the time between two optimiser steps minus the wait for the "
           "batch, i.e. forward, loss, backward, clipping, optimiser, schedule and each loop's own bookkeeping "
           "(see the module docstring). Settings: clip = both towers trained (compiled: mmalign `train.compile: "
           "true`, open_clip_train `--torchcompile`); lit_locked_text = image tower trained, text tower locked "
           "(mmalign `lock` + `cache_frozen`, open_clip_train `--lock-text`); lit_locked_image = text tower "
           "trained, image tower locked (mmalign `lock` + `cache_frozen`, open_clip_train `--lock-image`); "
           "clip_resnet = both towers trained with a tiny open_clip ModifiedResNet image tower (BatchNorm; 4 stages "
           f"of 1 block, width {TINY_RESNET['vision_cfg']['width']}, {TINY_RESNET['vision_cfg']['image_size']} px) "
           "instead of the ViT; clip_resnet_channels_last = the same, mmalign with `train.channels_last: true` "
           "(open_clip_train has no such switch).", "",
           "| setting | loop | median s/step | p10 | p90 | samples/s | timed steps | trainable / parameters | "
           "mmalign / open_clip s/step |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        ratio = ratios[(s["setting"], s["compiled"])]
        rel = f"**{ratio['ratio']:.2f}**" if s["method"] == "mmalign" else "1.00"
        out.append(f"| {variant_name(s['setting'], s['compiled'])} | {s['method']} | {s['median_step_s']:.4f} | "
                   f"{s['p10_step_s']:.4f} | {s['p90_step_s']:.4f} | {s['samples_per_s']:.0f} | {s['timed_steps']} "
                   f"| {s['trainable']:,} / {s['params']:,} | {rel} |")
    out.append("")
    for (name, compiled), ratio in ratios.items():
        rounds = ", ".join(f"{x:.2f}" for x in ratio["per_round"])
        line = (f"{variant_name(name, compiled)}: mmalign / open_clip median s/step = {ratio['ratio']:.2f} "
                f"({1 / ratio['ratio']:.2f}x the samples/s); per round {rounds}")
        if (name, compiled) == ("clip", False):
            line += f" (target <= {TARGET_RATIO:.2f}: {'met' if ratio['ratio'] <= TARGET_RATIO else 'NOT met'})"
        out.append(line + ".")
    medians = {(s["setting"], s["method"]): s["median_step_s"] for s in summaries}
    if ("clip_resnet", "mmalign") in medians and ("clip_resnet_channels_last", "mmalign") in medians:
        out.append(f"channels-last: mmalign's ResNet step with / without `train.channels_last` = "
                   f"{medians[('clip_resnet_channels_last', 'mmalign')] / medians[('clip_resnet', 'mmalign')]:.2f}.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench_train_step", __doc__, "a few steps", WORK_DIR)
    p.add_argument("--batch-size", type=int, help="default 64, quick 8")
    p.add_argument("--steps", type=int, help="optimiser steps per run (default 18, quick 3)")
    p.add_argument("--warmup", type=int, help="steps per run left out of the timing (default 3, quick 1)")
    p.add_argument("--rounds", type=int, help="runs per loop and setting (default 4, quick 1)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (both loops)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    batch_size = args.batch_size or (8 if args.quick else 64)
    steps = args.steps or (3 if args.quick else 18)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 4)
    lit_passes = 2 if args.quick else 3
    work = Path(args.work_dir)
    register_model(work)
    data = {}
    for name in args.settings:
        setting = SETTINGS[name]
        if setting.passes > 1:
            setting = SETTINGS[name] = dataclasses.replace(setting, passes=lit_passes)
            samples = lit_steps(steps, setting.passes)[1] * batch_size  # one pass
            listed = samples
        else:
            samples, listed = (steps + 1) * batch_size, steps * batch_size  # mmalign reads a batch ahead
        urls = image_text_shards(samples, 128, 40, work)
        data[name] = {"shards": urls, "csv": as_csv(urls, listed, work / "train_step" / f"csv-{listed}")}
    todo = variants(args.settings, not args.no_compile)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        machine = machine_info("cpu")
        setup = {"kind": "setup", "models": MODEL_CONFIGS, "batch_size": batch_size, "steps": steps,
                 "warmup": warmup, "rounds": rounds, "lit_passes": lit_passes,
                 "lit_steps": lit_steps(steps, lit_passes), "variants": todo}
        runs = run(data, todo, batch_size, steps, warmup, rounds, work / "train_step")
        machine["loadavg_end"] = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads)
    rows = [machine, setup, *summarise(runs, todo, batch_size), *runs]
    publish("train_step_cpu", rows, markdown(rows, args.quick), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
