"""CLIP loss at large batch: open_clip ``ClipLoss`` vs mmalign ``clip_loss`` vs ``chunked_clip_loss``.

For each batch size B (D = 512, float32) it measures forward + backward time (median of several repetitions after a
warm-up) and the peak memory of the step. On CPU every measurement runs in its own subprocess and the peak is the
growth of the resident set over the process's baseline (``ru_maxrss`` high-water mark, cross-checked by polling),
so the numbers are real allocations, not estimates. Sizes where a method is predicted (quadratic growth from its
largest measured size) to exceed ``--mem-cap-gb`` are not run and are reported as "OOM at cap". The largest batch
that fits in 16 GB is extrapolated from fitted memory models of the measured points (nothing that large is
allocated). With CUDA available the same comparison runs on the GPU. Results go to ``results.json`` / ``results.md``
(sections ``losses_cpu`` and ``losses_gpu``).

    python -m benchmarks.bench_losses            # full run (about 10 minutes on 2 CPU cores)
    python -m benchmarks.bench_losses --quick    # smoke test on tiny sizes, in-process, into benchmarks/_work/
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks._results import GIB, describe_machine, machine_info, publish

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
METHODS = ["open_clip", "clip_loss", "chunked_clip_loss"]
FULL_SIZES = [2048, 8192, 16384, 32768, 65536]
QUICK_SIZES = [256, 512]


# ---------------------------------------------------------------- one measurement (runs in a worker process)


def _loss_fn(method: str, chunk: int):
    if method == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda a, b, s: loss(a, b, s)
    if method == "clip_loss":
        from mmalign.losses import clip_loss

        return clip_loss
    if method == "chunked_clip_loss":
        from mmalign.losses import chunked_clip_loss

        return lambda a, b, s: chunked_clip_loss(a, b, s, chunk_size=chunk)
    raise ValueError(f"unknown method {method!r}")


def _inputs(B: int, D: int, device: str):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device).requires_grad_(True)
    b = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device).requires_grad_(True)
    s = torch.tensor(1 / 0.07, device=device).requires_grad_(True)  # CLIP's initial scale
    return a, b, s


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class _RssPoller:
    """Highest resident set size seen by a background thread polling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _current_rss())


def measure(method: str, B: int, D: int, reps: int, warmup: int, chunk: int, device: str = "cpu") -> dict:
    """Time ``reps`` forward+backward steps (after ``warmup``) and the peak memory they add over the baseline."""
    import torch

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if method == "gemm":  # throughput of a B x D by D x B matmul, for the "3-GEMM floor" column
        x, y = torch.randn(B, D, device=device), torch.randn(B, D, device=device)
        out = torch.empty(B, B, device=device)
        times = []
        for _ in range(warmup + reps):
            sync()
            t0 = time.perf_counter()
            torch.mm(x, y.T, out=out)
            sync()
            times.append(time.perf_counter() - t0)
        return {"gemm_flops": 2 * B * B * D / statistics.median(times[warmup:])}

    fn = _loss_fn(method, chunk)
    a, b, s = _inputs(64, D, device)  # warm-up at a tiny size: kernels, BLAS buffers, thread pools
    fn(a, b, s).backward()
    del a, b, s
    gc.collect()
    a, b, s = _inputs(B, D, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss, base_max = _current_rss(), _max_rss()
    poller = _RssPoller()
    times = []
    try:
        for _ in range(warmup + reps):
            a.grad = b.grad = s.grad = None
            sync()
            t0 = time.perf_counter()
            fn(a, b, s).backward()
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        polled = poller.stop()
    result = {"times_s": times[warmup:], "time_s": statistics.median(times[warmup:])}
    if cuda:
        result.update(peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20, mem_source="cuda_max_allocated")
    elif _max_rss() > base_max:  # the step set a new high-water mark: exact peak
        result.update(peak_mb=(_max_rss() - base_rss) / 2**20, mem_source="ru_maxrss")
    else:  # the process had been larger before (imports, warm-up): only polling sees this step
        result.update(peak_mb=(polled - base_rss) / 2**20, mem_source="poll")
    return result


# ---------------------------------------------------------------- orchestration


def _run_case(case: dict, in_process: bool, timeout: float) -> dict:
    if in_process:
        return measure(**case)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.bench_losses", "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reps(B: int, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) repetitions: fewer at the sizes where one step takes a minute."""
    if quick:
        return 1, 2
    if B <= 2048:
        return 1, 5
    if B <= 8192:
        return 1, 3
    if B <= 16384:
        return 1, 2
    if B <= 32768:
        return 0, 2
    return 0, 1


def _predicted_peak_mb(rows: list[dict], method: str, B: int) -> float | None:
    """Peak memory at B assuming quadratic growth from the method's largest measured size (conservative)."""
    done = [r for r in rows if r["method"] == method and r.get("peak_mb") is not None]
    if not done:
        return None
    last = max(done, key=lambda r: r["B"])
    return max(last["peak_mb"], 1.0) * (B / last["B"]) ** 2


def _fit_max_batch(rows: list[dict], method: str, budget_bytes: float) -> dict | None:
    """Largest B with fitted peak(B) <= budget: quadratic model for the plain losses, linear for the chunked one."""
    import numpy as np

    pts = [(r["B"], r["peak_mb"] * 2**20) for r in rows if r["method"] == method and r.get("peak_mb") is not None]
    if len(pts) < 2:
        return None
    Bs = np.array([p[0] for p in pts], dtype=float)
    mem = np.array([p[1] for p in pts])
    linear = method.startswith("chunked")
    if linear:
        design, model = np.stack([Bs, np.ones_like(Bs)], 1), "c1*B + c0"
    elif len(pts) >= 3:
        design, model = np.stack([Bs**2, Bs, np.ones_like(Bs)], 1), "c2*B^2 + c1*B + c0"
    else:
        design, model = np.stack([Bs**2, Bs], 1), "c2*B^2 + c1*B"
    coef = np.linalg.lstsq(design, mem, rcond=None)[0]
    if coef[0] <= 0:  # no measurable growth (tiny sizes): no extrapolation
        return None
    if linear:
        b_max = (budget_bytes - coef[1]) / coef[0]
    else:
        c2, c1 = coef[0], coef[1]
        c0 = coef[2] if len(coef) > 2 else 0.0
        b_max = (-c1 + np.sqrt(c1**2 - 4 * c2 * (c0 - budget_bytes))) / (2 * c2)
    timed = [r for r in rows if r["method"] == method and r.get("time_s") is not None]
    largest = max(timed, key=lambda r: r["B"])
    return {
        "kind": "max_batch", "method": method, "budget_gb": budget_bytes / GIB, "model": model,
        "coef_bytes": [float(c) for c in coef], "fitted_from_B": [int(b) for b in Bs],
        "max_batch": int(b_max), "extrapolated": True,
        "est_time_s": largest["time_s"] * (b_max / largest["B"]) ** 2,  # compute grows with B^2 in all three
    }


def run(device: str, sizes: list[int], quick: bool, in_process: bool, cap_gb: float, chunk: int, D: int,
        timeout: float) -> list[dict]:
    """All measurements on one device; returns the rows (machine, measurements, max-batch estimates)."""
    machine = machine_info(device)
    warm, reps = _reps(0, True) if quick else (2, 5)
    gemm = {"method": "gemm", "B": 1024 if quick else 4096, "D": D, "reps": reps, "warmup": warm, "chunk": chunk,
            "device": device}
    rate = _run_case(gemm, in_process, timeout).get("gemm_flops")
    machine["gemm_gflops"] = rate / 1e9 if rate else None
    rows: list[dict] = []
    for B in sizes:
        warmup, n = _reps(B, quick)
        for method in METHODS:
            row = {"kind": "measurement", "device": device, "method": method, "B": B, "D": D, "dtype": "float32",
                   "chunk_size": chunk if method.startswith("chunked") else None}
            predicted = _predicted_peak_mb(rows, method, B)
            if not device.startswith("cuda") and predicted is not None and predicted > cap_gb * 1024:
                row.update(status="OOM at cap", predicted_peak_mb=predicted, cap_gb=cap_gb)
                log.info("%s B=%d skipped: predicted %.1f GB > cap %.0f GB", method, B, predicted / 1024, cap_gb)
                rows.append(row)
                continue
            log.info("%s B=%d (%d+%d reps) on %s", method, B, warmup, n, device)
            case = {"method": method, "B": B, "D": D, "reps": n, "warmup": warmup, "chunk": chunk, "device": device}
            try:
                result = _run_case(case, in_process, timeout)
            except Exception as e:  # noqa: BLE001  (CUDA OOM in-process, etc.: report, go on)
                result = {"error": f"{type(e).__name__}: {e}"[:500]}
                gc.collect()
                if device.startswith("cuda"):
                    import torch

                    torch.cuda.empty_cache()
            if "error" in result:
                oom = "out of memory" in result["error"].lower() or "exit -9" in result["error"]
                row.update(status="OOM" if oom else "failed", error=result["error"])
            else:
                row.update(status="ok", **result)
                if rate:
                    row["gemm_floor_s"] = 3 * 2 * B * B * D / rate
            rows.append(row)
            log.info("  -> %s", {k: row.get(k) for k in ("status", "time_s", "peak_mb")})
        ref = next((r for r in rows if r["B"] == B and r["method"] == "open_clip" and r["status"] == "ok"), None)
        for r in rows:
            if r["B"] == B and r["status"] == "ok" and ref is not None:
                r["time_vs_open_clip"] = r["time_s"] / ref["time_s"]
                r["mem_vs_open_clip"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
    estimates = [e for m in METHODS if (e := _fit_max_batch(rows, m, 16 * GIB)) is not None]
    machine["loadavg_end"] = os.getloadavg()[0]
    return [machine, *rows, *estimates]


# ---------------------------------------------------------------- report


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def markdown(rows: list[dict], quick: bool) -> str:
    machine = next(r for r in rows if r["kind"] == "machine")
    meas = [r for r in rows if r["kind"] == "measurement"]
    est = [r for r in rows if r["kind"] == "max_batch"]
    dev = machine["device"]
    out = [f"CLIP loss forward + backward, D = {meas[0]['D'] if meas else '?'}, float32, on **{dev}**"
           f"{' (QUICK smoke run: tiny sizes, not representative)' if quick else ''}.", "",
           f"Machine: {describe_machine(machine)}", ""]
    mem_how = ("GPU: `torch.cuda.max_memory_allocated` growth." if dev.startswith("cuda") else
               "CPU: each measurement in its own process; peak = growth of the resident set over the baseline "
               "taken after imports, a tiny warm-up step and the inputs (`ru_maxrss`; polled RSS when the process "
               "had been larger before); it includes the feature gradients.")
    out += [f"Peak memory: {mem_how} 3-GEMM floor: 3 x 2B^2D flops at the measured matmul rate "
            f"({_fmt(machine.get('gemm_gflops'), '.0f')} GFLOP/s).", ""]
    out += ["| B | method | time (s) | time / open_clip | time / 3-GEMM floor | peak memory (MB) "
            "| memory / open_clip |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for r in meas:
        if r["status"] == "ok":
            floor = r["time_s"] / r["gemm_floor_s"] if r.get("gemm_floor_s") else None
            out.append(f"| {r['B']:,} | {r['method']} | {r['time_s']:.3f} | {_fmt(r.get('time_vs_open_clip'))} | "
                       f"{_fmt(floor, '.1f')} | {r['peak_mb']:,.0f} | {_fmt(r.get('mem_vs_open_clip'), '.3f')} |")
        elif r["status"] == "OOM at cap":
            out.append(f"| {r['B']:,} | {r['method']} | OOM at cap | | | (predicted {r['predicted_peak_mb'] / 1024:.1f}"
                       f" GB > cap {r['cap_gb']:.0f} GB) | |")
        else:
            out.append(f"| {r['B']:,} | {r['method']} | {r['status']} | | | | |")
    if est:
        out += ["", f"Largest batch that fits in {est[0]['budget_gb']:.0f} GB (**extrapolated** from the measured "
                "points with the fitted memory model; nothing that large was allocated):", "",
                "| method | memory model | fitted from B | largest B | est. time per step at that B |",
                "|---|---|---|---:|---:|"]
        for e in est:
            t = e["est_time_s"]
            t_s = f"{t:.0f} s" if t < 3600 else f"{t / 3600:.1f} h"
            out.append(f"| {e['method']} | {e['model']} | {', '.join(f'{b:,}' for b in e['fitted_from_B'])} | "
                       f"{e['max_batch']:,} | {t_s} |")
    targets = _targets(meas)
    if targets:
        out += ["", "Targets: " + "; ".join(targets) + "."]
    return "\n".join(out) + "\n"


def _targets(meas: list[dict]) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    lines = []
    row = next((r for r in meas if r["B"] == 8192 and r["method"] == "chunked_clip_loss" and r["status"] == "ok"),
               None)
    if row and row.get("time_vs_open_clip") is not None:
        t, m = row["time_vs_open_clip"], row["mem_vs_open_clip"]
        lines.append(f"B=8192 chunked time / open_clip = {t:.2f} ({'met' if t <= 0.65 else 'NOT met'}, target <= 0.65)")
        lines.append(f"memory / open_clip = {m:.3f} ({'met' if m <= 0.2 else 'NOT met'}, target <= 0.2)")
    row = next((r for r in meas if r["B"] == 65536 and r["method"] == "chunked_clip_loss" and r["status"] == "ok"),
               None)
    if row:
        gb = row["peak_mb"] / 1024
        lines.append(f"B=65536 chunked peak {gb:.2f} GB in {row['time_s']:.0f} s, measured "
                     f"({'met' if gb < 8 else 'NOT met'}, target < 8 GB)")
    return lines


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_losses", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, in-process, results in _work/")
    p.add_argument("--sizes", type=int, nargs="+", help=f"batch sizes (default {FULL_SIZES})")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=None, help="chunked_clip_loss block size (default: its own)")
    p.add_argument("--mem-cap-gb", type=float, default=12.0, help="skip a run predicted to exceed this (CPU)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per measurement (memory by polling)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU section even if CUDA is available")
    p.add_argument("--out-dir", default=None, help="where results.json/.md go (default benchmarks/, quick: _work/)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement subprocess")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # one measurement in this (fresh) process; the last stdout line is the result
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from mmalign.losses.chunked import DEFAULT_CHUNK

    chunk = args.chunk_size or DEFAULT_CHUNK
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    in_process = args.in_process or args.quick
    rows = run("cpu", sizes, args.quick, in_process, args.mem_cap_gb, chunk, args.dim, args.timeout)
    publish("losses_cpu", rows, markdown(rows, args.quick), args.quick, args.out_dir)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_sizes = args.sizes or (QUICK_SIZES if args.quick else [8192, 16384, 32768, 65536])
        rows = run("cuda", gpu_sizes, args.quick, True, args.mem_cap_gb, chunk, args.dim, args.timeout)
        publish("losses_gpu", rows, markdown(rows, args.quick), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
