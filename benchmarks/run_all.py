"""Run every benchmark's ``main`` in turn (``make bench``); extra arguments (e.g. ``--quick``) are passed to each."""
from __future__ import annotations

import importlib
import logging
import sys

# one entry per benchmark module, each with ``main(argv: list[str] | None) -> int``; append new benchmarks here
MODULES = [
    "benchmarks.bench_losses",
    "benchmarks.bench_train_step",
    "benchmarks.bench_data",
    "benchmarks.bench_eval",
    "benchmarks.bench_torchrun",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    failed = []
    for name in MODULES:
        logging.getLogger(__name__).info("running %s %s", name, " ".join(argv))
        if importlib.import_module(name).main(list(argv)):
            failed.append(name)
    if failed:
        logging.getLogger(__name__).error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
