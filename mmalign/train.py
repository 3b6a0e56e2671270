"""The training loop: Accelerate, AdamW, cosine schedule with warmup, accumulation, clipping, checkpoint/resume.

Read top to bottom: build -> resume -> loop (micro-batches, step, log, checkpoint) -> save -> evaluate -> report.
Re-running the same recipe resumes from the newest complete checkpoint in ``run_dir/checkpoints``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import Config, to_dict
from .data import expand_urls, iterate_batches
from .errors import ConfigError, DataError, MMAlignError
from .io import atomic_dir, write_json
from .losses import LOSSES, build_loss
from .model import AlignmentModel
from .modalities.base import NORM_TYPES

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint needs besides weights: where the loop and the data stream are."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples: int = 0
    skipped: dict = field(default_factory=dict)
    nonfinite_steps: int = 0


# ----------------------------------------------------------------------------------------------- building


def build_model(cfg: Config) -> AlignmentModel:
    """The model a recipe describes; adds the SigLIP bias when the loss needs one and records the loss's N-way
    score. Optional modalities need a loss that takes presence masks."""
    loss_cls = LOSSES.get(cfg.loss.name)
    if loss_cls is not None and getattr(loss_cls, "needs_bias", False):
        cfg.model.logit_bias = True
    if loss_cls is not None and cfg.model.nway_score is None:
        cfg.model.nway_score = getattr(loss_cls, "nway_score", "cosine")
    optional = [name for name, m in cfg.model.modalities.items() if m.optional]
    if optional and loss_cls is not None and not getattr(loss_cls, "handles_missing", False):
        handles = sorted(n for n, c in LOSSES.items() if getattr(c, "handles_missing", False))
        raise ConfigError(f"loss {cfg.loss.name!r} takes no presence masks, so optional modalities "
                          f"({', '.join(optional)}) need another loss: {', '.join(handles)}")
    return AlignmentModel(cfg.model)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, normalisation weights, embeddings' scalars and the logit scale."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in no_decay_ids or "logit_" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones are hidden temp folders and never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(run_dir: Path, model: AlignmentModel, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    path = run_dir / "checkpoints" / f"step_{state.step:08d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / "trainer_state.json", state.__dict__)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: AlignmentModel, optimizer, scheduler) -> TrainState:
    from safetensors.torch import load_model

    load_model(model, str(path / "model" / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- data


def batch_stream(cfg: Config, model: AlignmentModel, state: TrainState, pin_memory: bool) -> Iterator[dict]:
    """Endless training batches; epochs restart with a new shuffle seed; resumes mid-epoch by skipping."""
    urls = expand_urls(cfg.data.train)
    while True:
        produced = 0
        batches = iterate_batches(
            urls, model.modalities, cfg.data.batch_size, train=True, seed=cfg.seed, epoch=state.epoch,
            shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, num_workers=cfg.data.num_workers,
            skips=state.skipped, pin_memory=pin_memory,
        )
        for batch in batches:
            produced += 1
            if produced <= state.batches_in_epoch:
                continue  # fast-forward to where the checkpoint left off
            state.batches_in_epoch = produced
            yield batch
        if produced == 0:
            raise DataError(
                f"no complete batch of {cfg.data.batch_size} in {cfg.data.train} (skipped: "
                f"{state.skipped.get('counts', {})}); check the shards or lower data.batch_size"
            )
        state.epoch += 1
        state.batches_in_epoch = 0


def to_device(batch: dict, names: list[str], device: torch.device) -> dict:
    """The inputs of ``names`` and their presence masks, on ``device``."""
    out = {}
    for name in names + [f"{n}__present" for n in names if f"{n}__present" in batch]:
        x = batch[name]
        out[name] = x.to(device, non_blocking=True) if torch.is_tensor(x) else {
            k: v.to(device, non_blocking=True) for k, v in x.items()}
    return out


def check_bad_fraction(state: TrainState, limit: float) -> None:
    bad = sum(state.skipped.get("counts", {}).values())
    total = bad + state.samples
    if total >= 100 and bad / total > limit:
        examples = "; ".join(f"{r}: {ex[0]}" for r, ex in state.skipped.get("examples", {}).items())
        raise DataError(
            f"{bad} of {total} samples were unusable (> data.max_bad_fraction={limit}): "
            f"{state.skipped['counts']}. Examples: {examples}"
        )


# ----------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=cfg.train.device == "cpu", mixed_precision=cfg.train.precision)
    set_seed(cfg.seed)
    model = build_model(cfg)
    loss_fn = build_loss(cfg.loss.name, model.names, **cfg.loss.kwargs)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.steps)
    model.to(accelerator.device)

    state = TrainState()
    checkpoints = checkpoint_dirs(run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        log.info("resuming from %s (step %d)", checkpoints[-1], state.step)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", to_dict(cfg))
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process)
    stream = batch_stream(cfg, model, state, pin_memory=accelerator.device.type == "cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("training %d of %d parameters on %s x %d process(es)", sum(p.numel() for p in trainable),
             sum(p.numel() for p in model.parameters()), accelerator.device, accelerator.num_processes)

    bar = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    t0, last = time.time(), {}
    while state.step < cfg.train.steps:
        ddp_model.train()
        totals: dict[str, float] = {}
        for micro in range(cfg.train.grad_accum):
            batch = next(stream)
            inputs = to_device(batch, model.names, accelerator.device)
            sync = micro == cfg.train.grad_accum - 1
            with accelerator.no_sync(ddp_model) if not sync else nullcontext():
                with accelerator.autocast():
                    embeddings = ddp_model(inputs)
                    out = loss_fn({k: v.float() for k, v in embeddings.items()}, logit_scale=model.logit_scale(),
                                  logit_bias=model.logit_bias, present=model.presence(inputs))
                accelerator.backward(out["loss"] / cfg.train.grad_accum)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.item() / cfg.train.grad_accum
            state.samples += len(batch["__key__"])
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.grad_clip) if cfg.train.grad_clip else None
        if not all(math.isfinite(v) for v in totals.values()) or (grad_norm is not None and not torch.isfinite(grad_norm)):
            state.nonfinite_steps += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", state.step, state.nonfinite_steps)
            optimizer.zero_grad(set_to_none=True)
            if state.nonfinite_steps >= 20:
                raise MMAlignError("20 non-finite steps: stopping; lower train.lr or check the data")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale_()
        scheduler.step()
        state.step += 1
        bar.update(1)
        check_bad_fraction(state, cfg.data.max_bad_fraction)

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            elapsed = time.time() - t0
            last = {"step": state.step, **totals, "logit_scale": model.logit_scale().item(),
                    "lr": scheduler.get_last_lr()[0], "epoch": state.epoch, "samples": state.samples,
                    "skipped": sum(state.skipped.get("counts", {}).values()),
                    "grad_norm": grad_norm.item() if grad_norm is not None else None,
                    "time_s": round(elapsed, 2)}
            if model.logit_bias is not None:
                last["logit_bias"] = model.logit_bias.item()
            logger.log(last)
            bar.set_postfix(loss=f"{totals['loss']:.3f}", scale=f"{last['logit_scale']:.1f}")
            if state.step == cfg.train.log_every and last["logit_scale"] >= cfg.model.logit_scale.max * 0.999:
                log.warning("logit scale hit its clamp (%.0f) early: the learning rate may be too high",
                            cfg.model.logit_scale.max)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(run_dir, model, optimizer, scheduler, state, cfg.train.keep_last)
    bar.close()
    logger.close()
    accelerator.wait_for_everyone()

    results: dict[str, Any] = {"run_dir": str(run_dir), "steps": state.step}
    if last:
        results["final_loss"] = last["loss"]
    if accelerator.is_main_process:
        model.save_pretrained(run_dir / "model")
        results.update(evaluate_run(cfg, model, run_dir))
        results["skipped"] = state.skipped.get("counts", {})
        write_json(run_dir / "results.json", results)
    return results


def evaluate_run(cfg: Config, model: AlignmentModel, run_dir: Path) -> dict:
    """The recipe's evaluations at the end of training, plus plots in the run directory."""
    from .eval.runner import evaluate_retrieval, evaluate_zeroshot
    from .plots import plot_run

    results: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    zs, rt = cfg.eval.zeroshot, cfg.eval.retrieval
    if zs.data and zs.classes:
        out = evaluate_zeroshot(model, zs.data, zs.classes, zs.templates, zs.query, zs.text, cfg.eval.batch_size)
        extras.update({k: v for k, v in out.items() if k.startswith("_")})
        results.update({k: v for k, v in out.items() if not k.startswith("_")})
    if rt.data:
        out = evaluate_retrieval(model, rt.data, rt.query, rt.gallery, cfg.eval.batch_size)
        extras["_similarity"] = out.pop("_similarity")
        out.pop("_skipped", None)
        results.update(out)
    plot_run(run_dir, results, extras)
    return results


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


class MetricsLogger:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
