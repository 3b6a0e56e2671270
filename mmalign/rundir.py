"""What a run directory holds, and how it is read and written.

```
RUN_DIR/
  config.json            # the resolved recipe the run trains (written at every start)
  train.lock             # the process training here (pid, host): one run per folder (``mmalign.runlock``)
  metrics.jsonl          # one JSON object per logged step (``metrics_logger``), + tensorboard/
  checkpoints/step_N/    # model/ (weights without frozen towers), optimizer.pt, scheduler.pt, trainer_state.json,
                         #   recipe.json, manifest.json (size and SHA-256 of every file, written last)
  checkpoints/frozen/    # each fully locked tower's weights, once per run (NAME-SHA.safetensors)
  model/                 # the final model, self-contained (``AlignmentModel.save_pretrained``)
  results.json           # the headline numbers; report.md, report.html and PNG plots next to it
```

Every file and folder is written atomically (``mmalign.io``): an interrupted write leaves only hidden temporaries,
removed by :func:`remove_stale_writes`. A checkpoint holds, per process, its ``TrainState`` and RNG states as JSON, so
a resumed run on CPU ends with the weights an uninterrupted run would have. Resuming takes the newest checkpoint that
matches its manifest, fits the recipe and loads safely; each other one is skipped with a warning saying why.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open

from .config import TrainConfig, recipe_changes
from .data import merge_skips
from .distributed import on_main, rank, world_size
from .errors import ConfigError, MMAlignError
from .io import (
    MANIFEST, atomic_dir, crash_point, file_digest, manifest_outside, remove_dir, remove_stale_temps, verify_manifest,
    write_json, write_manifest, writing,
)
from .model import CONFIG_NAME, WEIGHTS_NAME, AlignmentModel
from .runlock import RunLock

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
FROZEN = "frozen"  # in CHECKPOINTS
MODEL = "model"
TRAINER_STATE = "trainer_state.json"
RECIPE = "recipe.json"
# What loading a damaged or foreign checkpoint raises: safetensors and the model (ConfigError), weights_only
# unpickling, JSON, and state dicts that do not fit.
LOAD_ERRORS = (MMAlignError, OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError)
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


def claim_run_dir(run_dir: Path, held: ExitStack, new_run: bool = False) -> None:
    """Make sure ``run_dir`` is writable and that no other run trains in it (its lock, held until ``held`` closes),
    then delete what interrupted writes left. With ``new_run``, a folder that already holds a run is refused. Done by
    the main process; its error stops every process."""

    def claim() -> None:
        held.enter_context(RunLock(run_dir))
        if new_run and (checkpoint_dirs(run_dir) or (run_dir / RUN_CONFIG).is_file() or (run_dir / MODEL).exists()):
            raise ConfigError(f"--no-resume (train.resume: false) starts a new run, but {run_dir} already holds one: "
                              f"set another run_dir (nothing in {run_dir} was changed)")
        remove_stale_writes(run_dir)

    on_main(claim)


def remove_stale_writes(run_dir: Path) -> None:
    """Delete what interrupted writes left in the run directory and its checkpoints (main process only)."""
    for folder in (run_dir, run_dir / CHECKPOINTS, run_dir / CHECKPOINTS / FROZEN):
        for stale in remove_stale_temps(folder):
            log.info("removed %s, left by an interrupted write", stale)


# ----------------------------------------------------------------------------------------------- models


def resolve_model_dir(path: str | Path) -> Path:
    """A saved model folder: ``path`` itself, a run directory's final ``model/``, a checkpoint's ``model/`` (``path``
    a checkpoint or its model folder), or for a run without a final model its newest checkpoint that verifies."""
    p = Path(path)
    if p.name == MODEL and (p.parent / MANIFEST).is_file():
        p = p.parent
    if (p / MANIFEST).is_file():
        if problem := verify_manifest(p):
            raise ConfigError(f"checkpoint {p}: {problem}")
        return p / MODEL
    for candidate in (p, p / MODEL):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    checkpoints = checkpoint_dirs(p)
    if not checkpoints:
        raise ConfigError(f"no model found at {path} (expected a saved model, a run directory or its checkpoints)")
    problems: list[str] = []
    for newest in verified(checkpoints, problems):
        log.info("%s has no final model yet: using its checkpoint %s", p, newest.name)
        return newest / MODEL
    raise ConfigError(f"no model found at {path}: no final model, and no checkpoint verifies ({'; '.join(problems)})")


def load_model(path: str | Path) -> AlignmentModel:
    """The model of a saved model folder, a run directory or a checkpoint (see :func:`resolve_model_dir`)."""
    return load_model_dir(resolve_model_dir(path))


def load_model_dir(model_dir: Path) -> AlignmentModel:
    """The model saved in ``model_dir``; a checkpoint's model gets its frozen towers from the run's shared files."""
    checkpoint = model_dir.parent
    towers = frozen_tower_files(checkpoint) if (checkpoint / MANIFEST).is_file() else None
    return AlignmentModel.from_pretrained(model_dir, towers=towers)


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
    model = load_model_dir(model_dir)  # first: a damaged weights file is one error line
    step = model_step(model_dir)
    if model_dir.parent.parent.name == CHECKPOINTS:
        log.warning("%s has no final model (interrupted or still training): scoring its newest checkpoint, step %s",
                    path, step)
    else:
        log.info("scoring %s%s", model_dir, f" (step {step})" if step is not None else "")
    return model, {"model": str(model_dir), "model_step": step}


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
    """The run's checkpoint folders, oldest first (a write in progress is a hidden temp folder, never listed; a
    listed one may still be damaged: see :func:`verified`)."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.is_dir() else []


def verified(checkpoints: list[Path], problems: list[str]) -> Iterator[Path]:
    """The ``checkpoints`` that match their manifests, newest first; each other one is logged as skipped and its
    problem added to ``problems``."""
    for path in reversed(checkpoints):
        problem = verify_manifest(path)
        if problem is None:
            yield path
        else:
            skip(path, problem, problems)


def skip(path: Path, problem: str, problems: list[str]) -> None:
    log.warning("skipping checkpoint %s: %s", path, problem)
    problems.append(f"{path.name}: {problem}")


def save_checkpoint(run_dir: Path, model: AlignmentModel, optimizer, scheduler, ranks: list[dict], keep: int,
                    recipe: dict, frozen: dict[str, tuple[Path, dict]]) -> Path:
    """Write ``checkpoints/step_N`` atomically, its manifest last, then delete all but the newest ``keep`` checkpoints.

    Weights in safetensors: each fully locked tower once per run in ``checkpoints/frozen`` (``frozen`` holds those
    this process stored: name -> (file, digest)), the rest in ``model/``; optimiser and schedule as tensors and numbers
    (``torch.load(weights_only=True)``); per process its ``TrainState`` and RNG states as JSON (``ranks``, one
    ``process_record`` per process); the resolved ``recipe``. A write the disk refuses raises ``MMAlignError`` saying
    how much space the checkpoint needs, and leaves every earlier checkpoint as it was.
    """
    step = ranks[0]["state"]["step"]
    path = run_dir / CHECKPOINTS / f"step_{step:08d}"
    towers = model.frozen_towers()
    needed = tensor_bytes(model.weights(towers)) + tensor_bytes(optimizer.state_dict()) + sum(
        tensor_bytes(model.adapters[name].tower.state_dict()) for name in towers if name not in frozen)
    with writing(path, needed):
        for name in towers:
            if name not in frozen:
                frozen[name] = store_frozen_tower(run_dir / CHECKPOINTS / FROZEN, model, name)
        shared = {name: os.path.relpath(frozen[name][0], path) for name in towers}
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp / MODEL, skip_towers=towers)
            for name, state in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict())):
                with open(tmp / name, "wb") as f:  # an open file: a failed write keeps its OSError in the chain
                    torch.save(state, f)
            crash_point(f"checkpoint:{step}")
            write_json(tmp / TRAINER_STATE, {"world_size": len(ranks), "ranks": ranks, "frozen_towers": shared})
            write_json(tmp / RECIPE, recipe)
            write_manifest(tmp, {shared[name]: frozen[name][1] for name in towers})
    prune_checkpoints(run_dir, keep)
    return path


def store_frozen_tower(folder: Path, model: AlignmentModel, name: str) -> tuple[Path, dict]:
    """Write modality ``name``'s frozen tower to ``folder/NAME-SHA.safetensors``, unless the run holds it already
    (named by the SHA-256 of its content, a file never changes once written); returns the file and its digest."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=folder)
    os.close(fd)
    try:
        model.save_tower(name, tmp)
        digest = file_digest(Path(tmp))
        file = folder / f"{name}-{digest['sha256'][:16]}.safetensors"
        if file.is_file() and file_digest(file) == digest:
            os.unlink(tmp)
        else:
            os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file, digest


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, then the frozen-tower files no remaining checkpoint refers to
    (none while a remaining manifest cannot be read)."""
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_dir(old)
    referenced = [manifest_outside(path) for path in checkpoint_dirs(run_dir)]
    if any(files is None for files in referenced):
        return
    used = {file.resolve() for files in referenced for file in files}
    for file in (run_dir / CHECKPOINTS / FROZEN).glob("*.safetensors"):
        if file.resolve() not in used:
            file.unlink()


def tensor_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def process_record(state: TrainState) -> dict:
    """This process's part of a checkpoint: its loop and data position and its RNG states."""
    return {"state": asdict(state), "rng": rng_state()}


def resume(train: TrainConfig, run_dir: Path, recipe: dict, model: AlignmentModel, optimizer,
           scheduler) -> TrainState:
    """Restore what a run continues from and record its ``recipe`` in ``config.json``; returns this process's
    ``TrainState`` (a fresh one for a new run).

    The main process picks the checkpoint (:func:`pick_checkpoint`); every other process then loads the same one."""
    path, state = on_main(lambda: pick_checkpoint(train, run_dir, recipe, model, optimizer, scheduler))
    if path is not None and rank() != 0:
        state = load_checkpoint(path, model, optimizer, scheduler)
    return state


def pick_checkpoint(train: TrainConfig, run_dir: Path, recipe: dict, model: AlignmentModel, optimizer,
                    scheduler) -> tuple[Path | None, TrainState]:
    """Load ``train.resume_from``, else the newest checkpoint of ``run_dir`` that matches its manifest and loads
    safely (each other one is skipped with a warning), and return it with the ``TrainState`` it restored. A recipe
    that changes what the checkpoint was trained as is refused (:func:`check_recipe`); so is a run directory whose
    checkpoints all fail, naming each problem and deleting nothing."""
    candidates = checkpoint_dirs(run_dir) if train.resume else []
    if train.resume_from:
        if not Path(train.resume_from).is_dir():
            raise ConfigError(f"train.resume_from (--resume-from): no checkpoint folder {train.resume_from}")
        candidates = [Path(train.resume_from)]
    chosen, state, problems = None, TrainState(), []
    for path in verified(candidates, problems):
        check_recipe(path, recipe)
        try:
            chosen, state = path, load_checkpoint(path, model, optimizer, scheduler)
            break
        except LOAD_ERRORS as e:
            skip(path, f"cannot be loaded ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                 problems)
    if chosen is None and problems:
        raise MMAlignError(f"no checkpoint to resume from: {'; '.join(problems)}. Nothing was deleted: restore a "
                           f"checkpoint, pick one with --resume-from, or set a new run_dir")
    if chosen is not None:
        log.info("resuming from %s (step %d)", chosen, state.step)
    with writing(run_dir / RUN_CONFIG):
        write_json(run_dir / RUN_CONFIG, recipe)
    return chosen, state


def check_recipe(checkpoint: Path, recipe: dict) -> None:
    """Refuse to continue ``checkpoint`` with a recipe that changes what it was trained as (``ConfigError`` listing
    the keys); log the changes that a resumed run applies (``config.recipe_changes``)."""
    refused, applied = recipe_changes(json.loads((checkpoint / RECIPE).read_text()), recipe)
    if refused:
        raise ConfigError(f"{checkpoint} was trained with another recipe: {'; '.join(refused)}. A resumed run cannot "
                          f"change its model, data, loss or optimiser: undo these, or set a new run_dir")
    if applied:
        log.warning("resuming with changed settings: %s", "; ".join(applied))


def load_checkpoint(path: Path, model: AlignmentModel, optimizer, scheduler) -> TrainState:
    """Restore weights (frozen towers from the run's shared files), optimiser, schedule, and this process's RNG states
    and data position from ``path``. Files that need unpickling are read (``weights_only``) before anything is set."""
    trainer = json.loads((path / TRAINER_STATE).read_text())
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    scheduler_state = torch.load(path / "scheduler.pt", weights_only=True)
    record = resume_record(trainer["ranks"], rank(), world_size())
    model.load_weights(path / MODEL / WEIGHTS_NAME, frozen_tower_files(path),
                       device=str(next(model.parameters()).device))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(record["rng"])
    return TrainState(**record["state"])


def frozen_tower_files(checkpoint: Path) -> dict[str, Path]:
    """Modality name -> the shared file of its frozen tower, for the towers a checkpoint's weights leave out."""
    trainer = json.loads((checkpoint / TRAINER_STATE).read_text())
    return {name: checkpoint / file for name, file in trainer.get("frozen_towers", {}).items()}


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
