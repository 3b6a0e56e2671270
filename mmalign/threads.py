"""How many threads the training loop computes with on CPU, given what its DataLoader workers really use.

The rule: a process keeps the cores it may run on (``os.sched_getaffinity``, shared by the processes of one
machine) minus the cores its workers keep busy, measured over a window of early steps (their CPU time over the
window's wall time), and at least as many threads as that leaves: ``ceil(cores - worker load)``, at least 1. A worker
that mostly waits (cheap decoding) costs little, so on 2 cores with one light worker the loop keeps 2 threads, where
taking a whole core per worker left it 1 (2.03 s/step against 1.42 s/step without the worker, issue 17). Never more
than torch was given at the start; an explicit ``OMP_NUM_THREADS`` is left as it is (a fixed count also keeps CPU
results bit-identical between a run and its resumption).
"""
from __future__ import annotations

import logging
import math
import os
import time

import psutil
import torch

log = logging.getLogger(__name__)

WINDOW = (3, 13)  # steps between which the workers' load is measured (after they have started and warmed up)


def available_cores(processes_per_machine: int = 1) -> int:
    """The cores this process may use: those the OS lets it run on, shared with the other processes of the run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes_per_machine))


def children_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) used so far by each child process (the DataLoader workers), by pid."""
    used = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        used[child.pid] = times.user + times.system
    return used


class ComputeThreads:
    """Sets the loop's thread count at the start and once more after the measuring window (see the module)."""

    def __init__(self, workers: int, processes_per_machine: int = 1):
        self.cores = available_cores(processes_per_machine)
        self.workers = workers
        self.fixed = "OMP_NUM_THREADS" in os.environ
        self.threads = torch.get_num_threads() if self.fixed else min(torch.get_num_threads(), self.cores)
        torch.set_num_threads(self.threads)
        self.start: tuple[float, dict[int, float]] | None = None
        log.info("compute threads: %d (%s; %d data worker(s))", self.threads,
                 "OMP_NUM_THREADS" if self.fixed else f"{self.cores} core(s) for this process", workers)

    @property
    def measuring(self) -> bool:
        return self.workers > 0 and not self.fixed

    def observe(self, step: int) -> None:
        """Call after every step: measures the workers' load over ``WINDOW`` and then sets the thread count."""
        if not self.measuring or step not in WINDOW:
            return
        now, used = time.perf_counter(), children_cpu_seconds()
        if step == WINDOW[0]:
            self.start = (now, used)
            return
        if self.start is None:  # resumed inside the window
            return
        began, before = self.start
        load = sum(t - before.get(pid, 0.0) for pid, t in used.items()) / max(now - began, 1e-9)
        threads = max(1, min(self.threads, math.ceil(self.cores - load - 1e-6)))
        log.info("data workers kept %.2f core(s) busy over steps %d-%d: compute threads %d -> %d", load, *WINDOW,
                 self.threads, threads)
        self.threads = threads
        torch.set_num_threads(threads)
