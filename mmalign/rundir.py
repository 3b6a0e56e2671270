"""What a run directory holds, and how it is read and written.

```
RUN_DIR/
  config.json            # the resolved recipe the run trains (written at every start)
  metrics.jsonl          # one JSON object per logged step (``metrics_logger``), + tensorboard/
  checkpoints/step_N/    # model/ (a saved model), optimizer.pt, scheduler.pt, trainer_state.json
  model/                 # the final model (``AlignmentModel.save_pretrained``)
  results.json           # the headline numbers; report.md, report.html and PNG plots next to it
```

Every file and folder is written atomically (``mmalign.io``): an interrupted write leaves only hidden temporaries,
removed by :func:`remove_stale_writes`. A checkpoint holds, per process, its ``TrainState`` and RNG states as JSON, so
a resumed run on CPU ends with the weights an uninterrupted run would have.
"""
from __future__ import annotations

import base64
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model as load_weights

from .data import merge_skips
from .distributed import rank, world_size
from .errors import ConfigError
from .io import atomic_dir, crash_point, remove_dir, remove_stale_temps, write_json
from .model import CONFIG_NAME, WEIGHTS_NAME, AlignmentModel

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
TRAINER_STATE = "trainer_state.json"
STEP_KEY = "step"  # safetensors header entry of a run's final model: the step its weights are from


@dataclass
class TrainState:
    """What a checkpoint needs besides weights, per process: where the loop and this process's data stream are."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples: int = 0
    skipped: dict = field(default_factory=dict)
    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0


def remove_stale_writes(run_dir: Path) -> None:
    """Delete what interrupted writes left in the run directory and its checkpoints (main process only)."""
    for stale in remove_stale_temps(run_dir) + remove_stale_temps(run_dir / CHECKPOINTS):
        log.info("removed %s, left by an interrupted write", stale)


# ----------------------------------------------------------------------------------------------- models


def resolve_model_dir(path: str | Path) -> Path:
    """A saved model folder, a run directory (its ``model/``), or a run's newest checkpoint."""
    p = Path(path)
    for candidate in (p, p / MODEL):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    checkpoints = checkpoint_dirs(p)
    if checkpoints:
        return checkpoints[-1] / MODEL
    raise ConfigError(f"no model found at {path} (expected a saved model, a run directory or its checkpoints)")


def load_model(path: str | Path) -> AlignmentModel:
    """The model of a saved model folder, a run directory or a run's newest checkpoint."""
    return AlignmentModel.from_pretrained(resolve_model_dir(path))


def model_step(model_dir: str | Path) -> int | None:
    """The training step a saved model's weights are from: a checkpoint's step, or the step recorded in the weights'
    header when a run saves its final model; None for a model saved otherwise."""
    model_dir = Path(model_dir)
    if model_dir.parent.parent.name == CHECKPOINTS and model_dir.parent.name.startswith("step_"):
        return int(model_dir.parent.name.split("_")[1])
    with safe_open(str(model_dir / WEIGHTS_NAME), "pt") as f:
        step = (f.metadata() or {}).get(STEP_KEY)
    return int(step) if step is not None else None


def load_scored_model(path: str | Path) -> tuple[AlignmentModel, dict]:
    """The model to evaluate at ``path`` (see :func:`resolve_model_dir`) and what every evaluation output says
    about it: ``model`` (the folder scored) and ``model_step`` (its training step, see :func:`model_step`). A run
    without its final model (interrupted, or still training) is scored at its newest checkpoint, with a warning."""
    model_dir = resolve_model_dir(path)
    step = model_step(model_dir)
    if model_dir.parent.parent.name == CHECKPOINTS:
        log.warning("%s has no final model (interrupted or still training): scoring its newest checkpoint, step %s",
                    path, step)
    else:
        log.info("scoring %s%s", model_dir, f" (step {step})" if step is not None else "")
    return AlignmentModel.from_pretrained(model_dir), {"model": str(model_dir), "model_step": step}


def source_run(model_dir: str | Path) -> dict | None:
    """The run a saved model folder comes from (``RUN/model`` or ``RUN/checkpoints/step_N/model``): its ``name``, its
    resolved ``recipe`` and its ``results`` ({} when not written yet); None for a model folder on its own."""
    parents = Path(model_dir).resolve().parents
    candidates = [parents[0], *([parents[2]] if len(parents) > 2 and parents[1].name == CHECKPOINTS else [])]
    run = next((run for run in candidates if (run / RESULTS).is_file() or (run / CHECKPOINTS).is_dir()), None)
    if run is None:
        return None
    recipe, results = (json.loads((run / name).read_text()) if (run / name).is_file() else {}
                       for name in (RUN_CONFIG, RESULTS))
    return {"name": run.name, "recipe": recipe, "results": results}


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones are hidden temp folders and never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(run_dir: Path, model: AlignmentModel, optimizer, scheduler, ranks: list[dict], keep: int) -> Path:
    """Write ``checkpoints/step_N`` atomically, then delete all but the newest ``keep`` checkpoints.

    Weights in safetensors, optimiser and schedule as tensors and numbers (``torch.load(weights_only=True)``), and
    per process its ``TrainState`` and RNG states as JSON (``ranks``, one ``process_record`` per process).
    """
    step = ranks[0]["state"]["step"]
    path = run_dir / CHECKPOINTS / f"step_{step:08d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp / MODEL)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        crash_point(f"checkpoint:{step}")
        write_json(tmp / TRAINER_STATE, {"world_size": len(ranks), "ranks": ranks})
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_dir(old)
    return path


def process_record(state: TrainState) -> dict:
    """This process's part of a checkpoint: its loop and data position and its RNG states."""
    return {"state": asdict(state), "rng": rng_state()}


def load_checkpoint(path: Path, model: AlignmentModel, optimizer, scheduler) -> TrainState:
    """Restore weights, optimiser, schedule, and this process's RNG states and data position from ``path``."""
    load_weights(model, str(path / MODEL / WEIGHTS_NAME), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    record = resume_record(json.loads((path / TRAINER_STATE).read_text())["ranks"], rank(), world_size())
    set_rng_state(record["rng"])
    return TrainState(**record["state"])


def resume_record(ranks: list[dict], this_rank: int, world: int) -> dict:
    """This process's record from a checkpoint's per-process records.

    With another number of processes than the checkpoint's, data positions do not carry over: every process starts
    the epoch after the furthest one, and the first process takes over the sample and skip totals.
    """
    if len(ranks) == world:
        return ranks[this_rank]
    log.warning("checkpoint written by %d process(es), resuming with %d: each process starts a new data epoch",
                len(ranks), world)
    state = dict(ranks[0]["state"])
    state.update(epoch=max(r["state"]["epoch"] for r in ranks) + 1, batches_in_epoch=0, samples=0, skipped={})
    if this_rank == 0:
        for r in ranks:
            state["samples"] += r["state"]["samples"]
            merge_skips(state["skipped"], r["state"]["skipped"])
    return {"state": state, "rng": ranks[0]["rng"]}


# ----------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Every RNG the loop draws from, as JSON (numbers and base64 arrays: a checkpoint never needs unpickling)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, _b64(np.array(mt, dtype=np.uint32)), gauss],
        "numpy": [name, _b64(keys), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state().numpy()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in _unb64(mt, np.uint32)), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _unb64(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(_unb64(s, np.uint8)) for s in state["cuda"]])


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _unb64(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()
