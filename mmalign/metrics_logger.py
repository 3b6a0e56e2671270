"""The training log of a run: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars."""
from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write_text, writing

METRICS = "metrics.jsonl"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written by a run that died after its last checkpoint), and a line cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Appends to ``run_dir/metrics.jsonl`` and TensorBoard events; only the main process writes (``enabled``).

    Opened for a run resuming at ``step``, it first drops the lines a killed run logged after its last checkpoint.
    """

    def __init__(self, run_dir: Path, step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / METRICS
        with writing(self.path):
            truncate_metrics(self.path, step)
            self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path):  # a full disk: one error line; a line cut short is dropped on resume
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
