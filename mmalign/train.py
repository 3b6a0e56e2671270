"""The training loop: Accelerate, AdamW, cosine schedule with warmup, accumulation, clipping, checkpoint/resume.

Read top to bottom: build -> resume -> loop (micro-batches, step, log, checkpoint) -> save -> evaluate -> report.
Re-running the same recipe resumes from the newest complete checkpoint in ``run_dir/checkpoints``; on CPU the
resumed run ends with the weights an uninterrupted run would have (data position, RNG states and skip counts are
checkpointed per process).
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import Config, to_dict
from .data import counted_batches, expand_urls, merge_skips, pass_items
from .distributed import rank, sum_over_ranks, world_size
from .errors import ConfigError, DataError, MMAlignError
from .gradcache import gradcache_step
from .io import atomic_dir, atomic_write_text, crash_point, remove_dir, remove_stale_temps, write_json
from .losses import LOSSES, TemperatureSchedule, build_loss
from .model import AlignmentModel
from .modalities import NORM_TYPES, inputs_to

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------------------------- building


def build_model(cfg: Config) -> AlignmentModel:
    """The model a recipe describes; adds the SigLIP bias when the loss needs one and records the loss's N-way
    score. Optional modalities need a loss that takes presence masks."""
    loss_cls = LOSSES.get(cfg.loss.name)
    if loss_cls is not None and getattr(loss_cls, "needs_bias", False):
        cfg.model.logit_bias = True
    if loss_cls is not None and getattr(loss_cls, "needs_captions", False) != (cfg.model.caption is not None):
        raise ConfigError(f"loss {cfg.loss.name!r} needs model.caption (a caption decoder)"
                          if cfg.model.caption is None else
                          f"model.caption trains a caption decoder: use a loss with a caption term (coca), "
                          f"not {cfg.loss.name!r}")
    if loss_cls is not None and cfg.model.nway_score is None:
        cfg.model.nway_score = getattr(loss_cls, "nway_score", "cosine")
    optional = [name for name, m in cfg.model.modalities.items() if m.optional]
    if optional and loss_cls is not None and not getattr(loss_cls, "handles_missing", False):
        handles = sorted(n for n, c in LOSSES.items() if getattr(c, "handles_missing", False))
        raise ConfigError(f"loss {cfg.loss.name!r} takes no presence masks, so optional modalities "
                          f"({', '.join(optional)}) need another loss: {', '.join(handles)}")
    return AlignmentModel(cfg.model)


def temperature_schedule(cfg: Config, model: AlignmentModel) -> TemperatureSchedule:
    """Where the loss's logit scale comes from: ``model.logit_scale.schedule`` when set, else the model's scale
    (learned, or fixed at its init with ``learnable: false``)."""
    ls = cfg.model.logit_scale
    if ls.schedule is not None:
        sch = ls.schedule
        steps = sch.steps if sch.steps is not None else cfg.train.steps
        return TemperatureSchedule("scheduled", sch.tau_start, sch.tau_end, steps, sch.kind)
    if ls.learnable:
        return TemperatureSchedule("learnable")
    return TemperatureSchedule("fixed", tau_start=1.0 / model.logit_scale().item())


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


def save_checkpoint(run_dir: Path, model: AlignmentModel, optimizer, scheduler, ranks: list[dict], keep: int) -> Path:
    """Write ``checkpoints/step_N`` atomically, then delete all but the newest ``keep`` checkpoints.

    Weights in safetensors, optimiser and schedule as tensors and numbers (``torch.load(weights_only=True)``), and
    per process its ``TrainState`` and RNG states as JSON (``ranks``, one ``process_record`` per process).
    """
    step = ranks[0]["state"]["step"]
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        crash_point(f"checkpoint:{step}")
        write_json(tmp / "trainer_state.json", {"world_size": len(ranks), "ranks": ranks})
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_dir(old)
    return path


def process_record(state: TrainState) -> dict:
    return {"state": asdict(state), "rng": rng_state()}


def load_checkpoint(path: Path, model: AlignmentModel, optimizer, scheduler) -> TrainState:
    """Restore weights, optimiser, schedule, and this process's RNG states and data position from ``path``."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model" / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    record = resume_record(json.loads((path / "trainer_state.json").read_text())["ranks"], rank(), world_size())
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


# ----------------------------------------------------------------------------------------------- data


def check_inputs(cfg: Config) -> list[str]:
    """Fail before building anything if a data path does not exist; returns the training shard urls."""
    urls = expand_urls(cfg.data.train)
    zs, rt = cfg.eval.zeroshot, cfg.eval.retrieval
    for key, spec in (("eval.zeroshot.data", zs.data), ("eval.retrieval.data", rt.data)):
        if spec:
            try:
                expand_urls(spec)
            except DataError as e:
                raise DataError(f"{key}: {e}") from None
    for key, file in (("eval.zeroshot.classes", zs.classes), ("eval.zeroshot.templates", zs.templates)):
        if file and not Path(file).is_file():
            raise ConfigError(f"{key}: file not found: {file}")
    return urls


def batch_stream(cfg: Config, urls: list[str], model: AlignmentModel, state: TrainState,
                 pin_memory: bool) -> Iterator[dict]:
    """This process's training batches, endless: passes (epochs) over the shards, reshuffled per epoch.

    Each process runs its own epochs (processes may read different amounts of data; training counts steps, so none
    waits for another at an epoch's end). A resumed run replays the epoch up to ``state.batches_in_epoch``.
    """
    while True:
        items = pass_items(urls, model.modalities, cfg.data.batch_size, train=True, seed=cfg.seed, epoch=state.epoch,
                           shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                           num_workers=cfg.data.num_workers, pin_memory=pin_memory)
        for number, batch in counted_batches(items, state.skipped, replay=state.batches_in_epoch):
            state.batches_in_epoch = number
            yield batch
        if state.batches_in_epoch == 0:
            raise DataError(
                f"no complete batch of {cfg.data.batch_size} in {cfg.data.train} for process {rank()} (skipped: "
                f"{state.skipped.get('counts', {})}); check the shards or lower data.batch_size"
            )
        state.epoch += 1
        state.batches_in_epoch = 0


def to_device(batch: dict, names: list[str], device: torch.device) -> dict:
    """The inputs of ``names`` and their presence masks, on ``device``."""
    out = {}
    for name in names + [f"{n}__present" for n in names if f"{n}__present" in batch]:
        out[name] = inputs_to(batch[name], device, non_blocking=True)
    return out


def gradcache_backward(model: AlignmentModel, loss_fn, inputs: dict, chunk: int, accelerator: Accelerator,
                       grad_accum: int, logit_scale, features: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One micro-batch with gradient caching: encoder memory of ``chunk`` rows, the loss of the whole batch.

    ``features``: modalities whose tower features the objective reads (``frozen_features``, e.g. CWCL's), computed
    once for the whole batch without gradient (a frozen tower with ``cache_frozen`` then encodes each input once).
    """
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), accelerator.autocast():
        frozen = {name: model.adapters[name].tower_features(inputs[name]).float() for name in features}

    def encode(name: str):
        def fn(chunk):
            x, present = chunk  # a chunk of the inputs and of their presence flags (None: all present)
            with accelerator.autocast():
                return model.encode(name, x, present).float()
        return fn

    def loss_on(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs.update(loss_fn(embeddings, logit_scale=logit_scale, logit_bias=model.logit_bias,
                               frozen_features=frozen, present=model.presence(inputs)))
        return outputs["loss"] / grad_accum

    chunks = {m: (inputs[m], inputs.get(f"{m}__present")) for m in model.names}
    gradcache_step({m: encode(m) for m in model.names}, chunks, loss_on, chunk, scaler=accelerator.scaler)
    return {k: v.detach() for k, v in outputs.items()}


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over processes (what DDP does in its backward hooks)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size()


def mean_over_processes(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each process computes the loss of its own rows: their mean is the loss of the global batch."""
    if accelerator.num_processes == 1:
        return values
    stacked = accelerator.reduce(torch.tensor(list(values.values()), device=accelerator.device), "mean")
    return dict(zip(values, stacked.tolist()))


def snapshot_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        if name in saved:
            b.copy_(saved[name])


def n_skipped(skipped: dict) -> int:
    return sum(skipped.get("counts", {}).values())


def check_bad_fraction(bad: float, used: float, skipped: dict, limit: float) -> None:
    """Stop when more than ``limit`` of what was read (over all processes, from 100 items on) was unusable.

    A shard-level fault (unreadable, corrupt, empty shard) counts as one item.
    """
    total = bad + used
    if total >= 100 and bad / total > limit:
        examples = "; ".join(f"{r}: {ex[0]}" for r, ex in skipped.get("examples", {}).items())
        raise DataError(
            f"{bad:.0f} of {total:.0f} samples were unusable (more than data.max_bad_fraction={limit}): "
            f"{skipped.get('counts', {})}. Examples: {examples}"
        )


# ----------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> dict[str, Any]:
    urls = check_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Without an accelerator, say so: accelerate would otherwise set up a process group without all-to-all on CPU.
    cpu = cfg.train.device == "cpu" or not torch.accelerator.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.train.precision)
    if accelerator.device.type == "cpu" and cfg.data.num_workers:
        # Leave a core to each data worker: oversubscribed cores slowed CPU steps several-fold in our runs.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes - cfg.data.num_workers))
    if accelerator.is_main_process:
        for stale in remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints"):
            log.info("removed %s, left by an interrupted write", stale)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    model = build_model(cfg)
    loss_fn = build_loss(cfg.loss.name, model.names, **cfg.loss.kwargs)
    temperature = temperature_schedule(cfg, model)
    needs_features = tuple(getattr(loss_fn, "needs_features", ()))  # e.g. CWCL: the frozen tower giving the weights
    for name in needs_features:
        if not model.adapters[name].fully_locked:
            log.warning("loss %r uses the %r tower's features, but that tower is not fully locked: they drift as it "
                        "trains", cfg.loss.name, name)
    if cfg.train.gradcache_chunk and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                                         for m in model.modules()):
        log.warning("GradCache with BatchNorm: batch statistics are per chunk, so gradients differ from the plain "
                    "loss; use GroupNorm/LayerNorm towers (e.g. small_cnn norm: group)")
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
    stream = batch_stream(cfg, urls, model, state, pin_memory=accelerator.device.type == "cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("training %d of %d parameters on %s x %d process(es); logit scale: %s",
             sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()), accelerator.device,
             accelerator.num_processes, temperature)

    bar = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    t0, last = time.time(), {}
    while state.step < cfg.train.steps:
        ddp_model.train()
        totals: dict[str, float] = {}
        buffers = snapshot_buffers(model)  # a skipped step must not leave e.g. non-finite BatchNorm statistics behind
        for micro in range(cfg.train.grad_accum):
            batch = next(stream)
            inputs = to_device(batch, model.names, accelerator.device)
            sync = micro == cfg.train.grad_accum - 1
            scale = temperature.logit_scale(state.step, learned=model.logit_scale())
            if cfg.train.gradcache_chunk:
                out = gradcache_backward(model, loss_fn, inputs, cfg.train.gradcache_chunk, accelerator,
                                         cfg.train.grad_accum, scale, needs_features)
            else:
                with accelerator.no_sync(ddp_model) if not sync else nullcontext():
                    with accelerator.autocast():
                        # + caption logits for CoCa, frozen-tower features for CWCL
                        embeddings, loss_inputs = ddp_model(inputs, loss_inputs=True, features=needs_features)
                        out = loss_fn({k: v.float() for k, v in embeddings.items()}, logit_scale=scale,
                                      logit_bias=model.logit_bias, present=model.presence(inputs), **loss_inputs)
                    accelerator.backward(out["loss"] / cfg.train.grad_accum)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.item() / cfg.train.grad_accum
            state.samples += len(batch["__key__"])
        if cfg.train.gradcache_chunk:
            average_gradients(trainable)  # GradCache encodes outside DDP's hooks
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.grad_clip or math.inf)  # inf: norm only
        finite = all(math.isfinite(v) for v in totals.values()) and bool(torch.isfinite(grad_norm))
        # One decision for all processes: the step is skipped everywhere if any process saw a non-finite value.
        bad_processes, bad_items, used = sum_over_ranks(
            [not finite, n_skipped(state.skipped), state.samples], accelerator.device)
        if bad_processes == 0:
            optimizer.step()
            model.clamp_logit_scale_()
            state.nonfinite_in_row = 0
        else:
            if accelerator.scaler is not None:
                optimizer.step()  # fp16 loss scaling: the scaler itself skips the update and lowers its scale
            restore_buffers(model, buffers)
            state.nonfinite_steps += 1
            state.nonfinite_in_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                        state.step + 1, state.nonfinite_in_row, state.nonfinite_steps)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        bar.update(1)
        crash_point(f"step:{state.step}")
        if state.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
            kept = checkpoint_dirs(run_dir)
            raise MMAlignError(
                f"{state.nonfinite_in_row} steps in a row (to step {state.step}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_in_row); stopped, last checkpoint: {kept[-1] if kept else 'none'}. "
                f"Lower train.lr, set train.grad_clip, or check the data"
            )
        check_bad_fraction(bad_items, used, state.skipped, cfg.data.max_bad_fraction)

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            elapsed = time.time() - t0
            totals = mean_over_processes(totals, accelerator)
            last = {"step": state.step, **totals, "logit_scale": float(torch.as_tensor(scale).detach()),
                    "lr": scheduler.get_last_lr()[0], "epoch": state.epoch, "samples": state.samples,
                    "skipped": n_skipped(state.skipped), "nonfinite_steps": state.nonfinite_steps,
                    "grad_norm": grad_norm.item(),
                    "time_s": round(elapsed, 2)}
            if model.logit_bias is not None:
                last["logit_bias"] = model.logit_bias.item()
            logger.log(last)
            bar.set_postfix(loss=f"{totals['loss']:.3f}", scale=f"{last['logit_scale']:.1f}")
            if (temperature.learnable and state.step == cfg.train.log_every
                    and last["logit_scale"] >= cfg.model.logit_scale.max * 0.999):
                log.warning("logit scale hit its clamp (%.0f) early: the learning rate may be too high",
                            cfg.model.logit_scale.max)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
            ranks = gather_object([process_record(state)])
            if accelerator.is_main_process:
                save_checkpoint(run_dir, model, optimizer, scheduler, ranks, cfg.train.keep_last)
    bar.close()
    logger.close()
    skipped: dict = {}
    for other in gather_object([state.skipped]):
        merge_skips(skipped, other)
    accelerator.wait_for_everyone()

    results: dict[str, Any] = {"run_dir": str(run_dir), "steps": state.step}
    if last:  # the last logged loss outputs (loss, its components, e.g. cwcl_positive_mass) and logit scale
        results.update({f"final_{k}": last[k] for k in (*totals, "logit_scale")})
    if accelerator.is_main_process:
        if skipped:
            log.warning("skipped while training: %s; examples: %s", skipped["counts"], skipped["examples"])
        model.save_pretrained(run_dir / "model")
        results.update(evaluate_run(cfg, model, run_dir))
        results["skipped"] = skipped.get("counts", {})
        results["nonfinite_steps"] = state.nonfinite_steps
        write_json(run_dir / "results.json", results)
    return results


def evaluate_run(cfg: Config, model: AlignmentModel, run_dir: Path) -> dict:
    """The recipe's evaluations at the end of training, plus plots, report.md and report.html in the run directory."""
    from .eval.runner import (
        evaluate_captions, evaluate_diagnostics, evaluate_retrieval, evaluate_zeroshot, merge_results,
    )
    from .plots import plot_run
    from .report import write_html_report

    results: dict[str, Any] = {}
    extras: dict[str, Any] = {}

    def absorb(what: str, out: dict) -> None:
        """One evaluation's output: skip counts as ``<what>_skipped``, ``_`` keys for the plots and the report."""
        if skipped := out.pop("skipped", None):
            results[f"{what}_skipped"] = skipped
        extras.update({k: v for k, v in out.items() if k.startswith("_")})
        merge_results(results, {k: v for k, v in out.items() if not k.startswith("_")})

    zs, rt, cap = cfg.eval.zeroshot, cfg.eval.retrieval, cfg.eval.caption
    if zs.data and zs.classes:
        absorb("zeroshot", evaluate_zeroshot(model, zs.data, zs.classes, zs.templates, zs.query, zs.text,
                                             cfg.eval.batch_size))
    if rt.data:
        absorb("retrieval", evaluate_retrieval(model, rt.data, rt.query, rt.gallery, cfg.eval.batch_size))
    if cap.data:
        out = evaluate_captions(model, cap.data, run_dir / cap.out, cap, cfg.eval.batch_size)
        out["_captions"] = out.pop("_examples")
        absorb("caption", out)
    diagnostics_data = cfg.eval.diagnostics.data or rt.data or zs.data
    if diagnostics_data is None:
        log.info("no eval data: embedding diagnostics on the first training samples (seen in training)")
    try:
        absorb("diagnostics", evaluate_diagnostics(model, diagnostics_data or cfg.data.train, cfg.eval.batch_size,
                                                   cfg.eval.diagnostics.max_samples))
    except DataError as e:  # e.g. eval data without every modality of the model: the run itself stands
        log.warning("no embedding diagnostics: %s", e)
    plot_run(run_dir, results, extras)
    write_html_report(run_dir, results, extras, model, cfg.eval.report_examples)
    return results


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
