"""Real-size step time under torchrun: open_clip ViT-B-32 from scratch at 224 px on 2 processes, mmalign's launch
(``torchrun -m mmalign train RECIPE``) side by side with open_clip_train's own (``torchrun -m open_clip_train.main``).

Both train the same architecture (open_clip's ViT-B-32: mmalign's image and text towers ``tower: open_clip`` with
``proj: none``) from scratch, float32, on CPU processes (gloo), one torch thread each, at the same batch per process,
with the same AdamW settings, warm-up + cosine schedule and gradient clipping as ``bench_train_step``. Each reads the
same synthetic 224 px image + caption samples through its own pipeline with no workers: mmalign from webdataset
shards (one per process), open_clip_train from the same images listed in a CSV (``--dataset-type csv``; its
webdataset reader fails on webdataset 1.0, see ``bench_train_step``). open_clip_train passes ``device_ids=[cpu]`` to
DDP, which torch rejects on CPU: it runs through ``_open_clip_ddp_cpu``, which drops them, and nothing else. A step's time is measured as each loop reports
it, including the wait for its batch: the interval between consecutive rows of mmalign's ``metrics.jsonl``
(``time_s``, ``log_every: 1``) and open_clip_train's ``Batch (t)`` (logged every step). The first ``--warmup`` steps
of each run are left out; launches alternate (order alternating per round); the medians over all timed steps are
compared. Results go to ``results.json`` / ``results.md`` (section ``torchrun_vit_b32_cpu``).

    python -m benchmarks.bench_torchrun            # 2 rounds of 8 steps, batch 16 per process (about 15 minutes)
    python -m benchmarks.bench_torchrun --quick    # smoke test: 3 steps, batch 2 per process, into benchmarks/_work/
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._data import WORK_DIR, as_csv, image_text_shards
from benchmarks._results import bench_parser, describe_machine, machine_info, publish
from benchmarks.bench_train_step import BETAS, EPS, GRAD_CLIP, LR, WARMUP_STEPS, WD

log = logging.getLogger(__name__)

METHODS = ["mmalign", "open_clip"]
MODEL, IMAGE_PX, PROCESSES = "ViT-B-32", 224, 2
REPO = Path(__file__).resolve().parents[1]


def torchrun(module_args: list[str], log_path: Path, cwd: Path = REPO) -> str:
    """``torchrun --nproc_per_node PROCESSES -m ...`` on CPU, one thread per process, in ``cwd``; returns its
    output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", *module_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(module_args[:2])} failed ({proc.returncode}); its output: {log_path}")
    return proc.stdout + proc.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mmalign(data: dict, batch_size: int, steps: int, run_dir: Path) -> list[float]:
    """``torchrun -m mmalign train`` on the recipe; seconds per step from its metrics rows."""
    recipe = {
        "run_dir": str(run_dir), "seed": 0,
        "model": {"embed_dim": 512, "modalities": {
            "image": {"tower": "open_clip", "model": MODEL, "proj": "none"},
            "text": {"tower": "open_clip", "model": MODEL, "proj": "none"}}},
        "loss": {"name": "clip"},
        "data": {"train": "::".join(data["shards"]), "batch_size": batch_size, "num_workers": 0},
        "train": {"steps": steps, "lr": LR, "weight_decay": WD, "betas": list(BETAS), "eps": EPS,
                  "warmup_steps": WARMUP_STEPS, "grad_clip": GRAD_CLIP, "precision": "no", "device": "cpu",
                  "checkpoint_every": steps, "keep_last": 1, "log_every": 1},
        "eval": {"diagnostics": {"max_samples": batch_size}},
    }
    run_dir.mkdir(parents=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    torchrun(["mmalign", "train", str(path)], run_dir.parent / f"{run_dir.name}.log")
    times = [json.loads(line)["time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times, times[1:])]  # step 1's time includes start-up: not comparable


def run_open_clip(data: dict, batch_size: int, steps: int, run_dir: Path) -> list[float]:
    """``torchrun -m open_clip_train.main`` (``_open_clip_ddp_cpu``: its DDP wrap made valid on CPU) for one epoch
    of ``steps`` batches per process; its ``Batch (t)``.
    It runs in ``run_dir`` and writes its logs to ``./logs`` there: torchrun's own parser takes ``--logs`` for an
    abbreviation of its ``--logs-specs``."""
    run_dir.mkdir(parents=True)
    out = torchrun([
        "benchmarks._open_clip_ddp_cpu", "--model", MODEL, "--train-data", data["csv"], "--dataset-type", "csv",
        "--batch-size", str(batch_size), "--epochs", "1", "--lr", str(LR), "--wd", str(WD), "--beta1", str(BETAS[0]),
        "--beta2", str(BETAS[1]), "--eps", str(EPS), "--warmup", str(WARMUP_STEPS), "--grad-clip-norm",
        str(GRAD_CLIP), "--precision", "fp32", "--workers", "0", "--device", "cpu", "--seed", "0",
        "--log-every-n-steps", "1", "--save-frequency", "0", "--name", "run",
    ], run_dir.parent / f"{run_dir.name}.log", cwd=run_dir)
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", out)]
    return times[1:]  # as for mmalign: from step 2 on


RUNNERS = {"mmalign": run_mmalign, "open_clip": run_open_clip}


def run(data: dict, batch_size: int, steps: int, warmup: int, rounds: int, work: Path) -> list[dict]:
    """``rounds`` launches of each, order alternating; one row per launch with its timed steps."""
    rows = []
    for r in range(rounds):
        for method in METHODS if r % 2 == 0 else METHODS[::-1]:
            run_dir = work / f"{method}-{r}"
            for old in (run_dir, run_dir.with_suffix(".yaml"), run_dir.with_suffix(".log")):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            t0 = time.perf_counter()
            step_s = RUNNERS[method](data, batch_size, steps, run_dir)[max(0, warmup - 1):]
            shutil.rmtree(run_dir)  # ViT-B-32 checkpoints: 1.8 GB a run
            rows.append({"kind": "run", "method": method, "round": r, "timed_steps": len(step_s), "step_s": step_s,
                         "median_step_s": statistics.median(step_s), "wall_s": time.perf_counter() - t0})
            log.info("round %d %s: median step %.3f s over %d steps (%.0f s in all)", r, method,
                     rows[-1]["median_step_s"], len(step_s), rows[-1]["wall_s"])
    return rows


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for method in METHODS:
        steps = [t for r in runs if r["method"] == method for t in r["step_s"]]
        out.append({"kind": "summary", "method": method, "timed_steps": len(steps),
                    "median_step_s": statistics.median(steps), "min_step_s": min(steps), "max_step_s": max(steps)})
    out.append({"kind": "ratio", "of": "mmalign / open_clip s/step",
                "ratio": out[0]["median_step_s"] / out[1]["median_step_s"]})
    return out


def markdown(rows: list[dict], quick: bool) -> str:
    machine = next(r for r in rows if r["kind"] == "machine")
    setup = next(r for r in rows if r["kind"] == "setup")
    summary = {r["method"]: r for r in rows if r["kind"] == "summary"}
    ratio = next(r for r in rows if r["kind"] == "ratio")
    out = [f"Step time under `torchrun --nproc_per_node {PROCESSES}` (CPU processes, gloo, one torch thread each): "
           f"open_clip {MODEL} from scratch, {IMAGE_PX} px, float32, batch {setup['batch_size']} per process "
           f"({PROCESSES * setup['batch_size']} in all), {setup['rounds']} launch(es) of each with {setup['steps']} "
           f"steps, the first {setup['warmup']} not timed"
           f"{' (QUICK smoke run: a few steps, not representative)' if quick else ''}.", "",
           f"Machine: {describe_machine(machine)}", "",
           "`torchrun -m mmalign train RECIPE` against `torchrun -m open_clip_train.main` with the same "
           "architecture, batch, CLIP loss, AdamW settings, warm-up + cosine schedule and gradient clipping; each "
           "step timed as its loop reports it, data wait included (mmalign: `metrics.jsonl` rows; open_clip_train: "
           "`Batch (t)`). See the module docstring.", "",
           "| launch | median s/step | min | max | timed steps | mmalign / open_clip |", "|---|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        s = summary[method]
        rel = f"{ratio['ratio']:.2f}" if method == "mmalign" else "1.00"
        out.append(f"| {method} | {s['median_step_s']:.3f} | {s['min_step_s']:.3f} | {s['max_step_s']:.3f} | "
                   f"{s['timed_steps']} | {rel} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench_torchrun", __doc__, "a few steps", WORK_DIR)
    p.add_argument("--batch-size", type=int, help="per process (default 16, quick 2)")
    p.add_argument("--steps", type=int, help="optimiser steps per launch (default 8, quick 3)")
    p.add_argument("--warmup", type=int, help="steps per launch left out of the timing, at least 1 (default 2)")
    p.add_argument("--rounds", type=int, help="launches of each (default 2, quick 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    batch_size = args.batch_size or (2 if args.quick else 16)
    steps = args.steps or (3 if args.quick else 8)
    warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    rounds = args.rounds or (1 if args.quick else 2)
    work = Path(args.work_dir)
    # mmalign reads a batch ahead: each process's shard holds steps + 1 batches
    per_process = (steps + 1) * batch_size
    urls = image_text_shards(PROCESSES * per_process, per_process, IMAGE_PX, work)
    work = work / "torchrun"
    data = {"shards": urls,
            "csv": as_csv(urls, PROCESSES * steps * batch_size, work / f"csv-{PROCESSES * steps * batch_size}")}
    machine = {**machine_info("cpu"), "threads": 1}  # per launched process (OMP_NUM_THREADS=1), not this one's
    setup = {"kind": "setup", "model": MODEL, "image_px": IMAGE_PX, "processes": PROCESSES,
             "batch_size": batch_size, "steps": steps, "warmup": warmup, "rounds": rounds}
    runs = run(data, batch_size, steps, warmup, rounds, work)
    machine["loadavg_end"] = os.getloadavg()[0]
    rows = [machine, setup, *summarise(runs), *runs]
    publish("torchrun_vit_b32_cpu", rows, markdown(rows, args.quick), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
