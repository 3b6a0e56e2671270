"""The training loop: Accelerate, AdamW, cosine schedule with warmup, accumulation, clipping, checkpoint/resume.

Read top to bottom: ``train`` is ``setup`` (claim the run directory, build, resume) -> ``step`` until the last one
(micro-batches, update), logging and checkpointing as it goes -> ``finish`` (save, evaluate, report). Re-running the
same recipe resumes from the newest checkpoint in the run directory that verifies (:mod:`mmalign.rundir`); on CPU the
resumed run ends with the weights an uninterrupted run would have (data position, RNG states and skip counts are
checkpointed per process). A stop signal (:mod:`mmalign.preemption`) ends the loop after the step, with a checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from .build import build, build_accelerator, build_optimizer, temperature_schedule
from .config import Config, to_dict
from .data import merge_skips
from .distributed import on_main, sum_over_ranks, world_size
from .errors import MMAlignError, RunStopped
from .gradcache import gradcache_step
from .io import crash_point, write_json, writing
from .losses import AlignmentOutput, Objective, TemperatureSchedule
from .metrics_logger import MetricsLogger
from .model import AlignmentModel, check_gradients
from .preemption import StopRequests
from .report import evaluate_run
from .rundir import (
    MODEL, RESULTS, STEP_KEY, TrainState, checkpoint_dirs, claim_run_dir, process_record, resume, save_checkpoint,
)
from .threads import ComputeThreads
from .training_data import batch_stream, check_bad_fraction, check_inputs, n_skipped, to_device

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What the loop carries from step to step."""

    cfg: Config  # as trained: the model section resolved for the objective (``build.resolve_model_config``)
    accelerator: Accelerator
    model: AlignmentModel
    ddp_model: torch.nn.Module  # the model as Accelerate prepared it (DDP-wrapped with several processes)
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    temperature: TemperatureSchedule
    state: TrainState
    stream: Iterator[dict]
    logger: MetricsLogger
    bar: tqdm
    trainable: list[torch.nn.Parameter]
    threads: ComputeThreads  # on CPU: as many as the cores left after the data workers' measured load
    started: float = field(default_factory=time.time)
    last: dict = field(default_factory=dict)  # the last logged row of metrics.jsonl
    last_losses: tuple[str, ...] = ()  # the objective's outputs in that row (loss and its components)
    stop: StopRequests = field(default_factory=StopRequests)  # stop signals received by this process
    stopping: bool = False  # some process received one: all stop after this step, with a checkpoint
    frozen: dict = field(default_factory=dict)  # frozen towers stored for the checkpoints (``save_checkpoint``)
    gradients_checked: bool = False  # whether every trainable parameter got a gradient (checked at the first step)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def train(cfg: Config) -> dict[str, Any]:
    """Train a recipe's model; returns the headline results (also written to ``run_dir/results.json``).

    SIGTERM, SIGUSR1 or Ctrl-C while it trains: every process finishes its step, they write a checkpoint together
    and ``RunStopped`` is raised (exit code 75); the same recipe resumes from that checkpoint."""
    with ExitStack() as held:  # the run directory's lock
        run = setup(cfg, held)
        t = run.cfg.train
        with run.stop:
            while run.state.step < t.steps:
                losses, grad_norm, scale = step(run)  # tensors, read only when logged
                run.threads.observe(run.state.step)
                done = run.state.step == t.steps
                if run.state.step % t.log_every == 0 or done:
                    log_step(run, losses, grad_norm, scale)
                if run.state.step % t.checkpoint_every == 0 or done or run.stopping:
                    saved = checkpoint(run)
                if run.stopping:
                    raise RunStopped(f"{run.stop.signal or 'a stop signal (to another process)'}: stopped after "
                                     f"step {run.state.step} of {t.steps}, checkpoint {saved} written; run the same "
                                     f"command to resume")
        return finish(run)


# ----------------------------------------------------------------------------------------------- setup


def setup(cfg: Config, held: ExitStack) -> Run:
    """Check the inputs, build model and objective, claim the run directory (its lock stays in ``held``), resume
    from a checkpoint, start the data stream."""
    urls = check_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    accelerator = build_accelerator(cfg)
    threads = ComputeThreads(cfg.data.num_workers if accelerator.device.type == "cpu" else 0,
                             int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    set_seed(cfg.seed)
    cfg, model, objective = build(cfg)  # first: a recipe the towers refuse leaves no run directory behind
    claim_run_dir(run_dir, held, new_run=not cfg.train.resume)
    temperature = temperature_schedule(cfg, model)
    warn_about_setup(cfg, model, objective)
    layout = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    model.to(accelerator.device, memory_format=layout)
    optimizer, scheduler = build_optimizer(cfg, model)  # on the device: its kernel depends on it

    state = resume(cfg.train, run_dir, to_dict(cfg), model, optimizer, scheduler)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:  # here, not through Accelerator(dynamo_backend=): its state is one per process
        ddp_model = torch.compile(ddp_model)
    logger = MetricsLogger(run_dir, state.step, enabled=accelerator.is_main_process)
    stream = batch_stream(cfg, urls, model.modalities, state, pin_memory=accelerator.device.type == "cuda")
    # ended with the run, its DataLoader workers with it: they ignore SIGTERM, so a loader still held at interpreter
    # exit (in a reference cycle) left multiprocessing's exit handler waiting on them forever
    held.callback(stream.close)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("training %d of %d parameters on %s x %d process(es); logit scale: %s",
             sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()), accelerator.device,
             accelerator.num_processes, temperature)
    bar = held.enter_context(tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
                                  disable=not accelerator.is_main_process, dynamic_ncols=True))  # closed on errors too
    return Run(cfg, accelerator, model, ddp_model, objective, optimizer, scheduler, temperature, state, stream,
               logger, bar, trainable, threads)


def warn_about_setup(cfg: Config, model: AlignmentModel, objective: Objective) -> None:
    """Settings that train, but not as a user would expect."""
    for name in objective.requirements.features:  # e.g. CWCL: the frozen tower giving the weights
        if not model.adapters[name].fully_locked:
            log.warning("loss %r uses the %r tower's features, but that tower is not fully locked: they drift as it "
                        "trains", cfg.loss.name, name)
    if cfg.train.gradcache_chunk and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                                         for m in model.modules()):
        log.warning("GradCache with BatchNorm: batch statistics are per chunk, so gradients differ from the plain "
                    "loss; use GroupNorm/LayerNorm towers (e.g. small_cnn norm: group)")


# ----------------------------------------------------------------------------------------------- one step


def step(run: Run) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | float]:
    """One optimiser step over ``train.grad_accum`` micro-batches; returns the objective's outputs (mean over
    micro-batches), the gradient norm and the logit scale the loss used, as tensors on the device.

    The host reads one value from the device per step: whether every output and the gradient norm are finite
    (``update``); the outputs themselves are read only when they are logged."""
    cfg, model, state = run.cfg, run.model, run.state
    accum = cfg.train.grad_accum
    run.ddp_model.train()
    totals: dict[str, torch.Tensor] = {}
    buffers = snapshot_buffers(model)  # a skipped step must not leave e.g. non-finite BatchNorm statistics behind
    for micro in range(accum):
        batch = next(run.stream)
        inputs = to_device(batch, model.names, run.accelerator.device)
        scale = run.temperature.logit_scale(state.step, learned=model.logit_scale())
        out = forward_backward(run, inputs, scale, sync=micro == accum - 1)
        for k, v in out.items():
            totals[k] = totals[k] + v.detach() / accum if k in totals else v.detach() / accum
        state.samples += len(batch["__key__"])
    if not run.gradients_checked:
        check_gradients(model, run.accelerator.device)
        run.gradients_checked = True
    if cfg.train.gradcache_chunk:
        average_gradients(run.trainable)  # GradCache encodes outside DDP's hooks
    grad_norm = run.accelerator.clip_grad_norm_(run.trainable, cfg.train.grad_clip or math.inf)  # inf: norm only
    update(run, all_finite([*totals.values(), grad_norm]), buffers)
    return totals, grad_norm, scale


def all_finite(values: list[torch.Tensor]) -> torch.Tensor:
    """Whether every one of ``values`` (0-d tensors) is finite, as a 0-d bool tensor (not read here)."""
    return torch.stack([v.float() for v in values]).isfinite().all()


def forward_backward(run: Run, inputs: dict, scale: torch.Tensor | float, sync: bool) -> dict[str, torch.Tensor]:
    """The objective's outputs on one micro-batch, its gradients accumulated into ``.grad`` (divided by the number
    of micro-batches). With ``train.gradcache_chunk`` the model's forward runs chunk by chunk (GradCache)."""
    accelerator, model, objective = run.accelerator, run.model, run.objective
    accum, features = run.cfg.train.grad_accum, objective.requirements.features

    def loss(output: AlignmentOutput) -> dict[str, torch.Tensor]:
        return objective(output.float(), logit_scale=scale, logit_bias=model.logit_bias)

    if not run.cfg.train.gradcache_chunk:
        with accelerator.no_sync(run.ddp_model) if not sync else nullcontext():
            with accelerator.autocast():
                out = loss(run.ddp_model(inputs, features=features))
            accelerator.backward(out["loss"] / accum)
        return out

    def forward(chunk: dict) -> AlignmentOutput:
        with accelerator.autocast():
            return model(chunk, features=features)

    out = {}

    def loss_of_batch(output: AlignmentOutput) -> torch.Tensor:
        out.update(loss(output))
        return out["loss"] / accum

    gradcache_step(forward, inputs, loss_of_batch, run.cfg.train.gradcache_chunk, scaler=accelerator.scaler)
    return {k: v.detach() for k, v in out.items()}


def update(run: Run, finite: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
    """The optimiser step, skipped on every process when any saw a non-finite loss or gradient (``finite`` here);
    then the schedule and step count advance. Stops the run on too many bad steps in a row or unusable samples."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    # One decision for all processes: the step is skipped everywhere if any process saw a non-finite value; all stop
    # after it if any received a stop signal. The step's one read from the device (with the sums over processes).
    bad_processes, bad_items, used, stops = sum_over_ranks(
        [finite.logical_not(), n_skipped(state.skipped), state.samples, run.stop.requested], accelerator.device)
    if stops and not run.stopping:
        log.warning("stop requested (%s): writing a checkpoint after step %d, then stopping",
                    run.stop.signal or "on another process", state.step + 1)
    run.stopping = stops > 0
    if bad_processes == 0:
        run.optimizer.step()
        run.model.clamp_logit_scale_()
        state.nonfinite_in_row = 0
    else:
        if accelerator.scaler is not None:
            run.optimizer.step()  # fp16 loss scaling: the scaler itself skips the update and lowers its scale
        restore_buffers(run.model, buffers)
        state.nonfinite_steps += 1
        state.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                    state.step + 1, state.nonfinite_in_row, state.nonfinite_steps)
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step advances the schedule too, on purpose: torch warns
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        run.scheduler.step()
    state.step += 1
    run.bar.update(1)
    crash_point(f"step:{state.step}")
    if state.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
        kept = checkpoint_dirs(run.run_dir)
        raise MMAlignError(
            f"{state.nonfinite_in_row} steps in a row (to step {state.step}) had a non-finite loss or gradient "
            f"(train.max_nonfinite_in_row); stopped, last checkpoint: {kept[-1] if kept else 'none'}. "
            f"Lower train.lr, set train.grad_clip, or check the data"
        )
    check_bad_fraction(bad_items, used, state.skipped, cfg.data.max_bad_fraction)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over processes (what DDP does in its backward hooks)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size()


def snapshot_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        if name in saved:
            b.copy_(saved[name])


# ----------------------------------------------------------------------------------------------- log, checkpoint


def log_step(run: Run, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor,
             scale: torch.Tensor | float) -> None:
    """One row of ``metrics.jsonl`` (losses averaged over processes), the progress bar, an early clamp warning."""
    cfg, state, model = run.cfg, run.state, run.model
    losses = mean_over_processes(losses, run.accelerator)
    row = {"step": state.step, **losses, "logit_scale": float(torch.as_tensor(scale).detach()),
           "lr": run.scheduler.get_last_lr()[0], "epoch": state.epoch, "samples": state.samples,
           "skipped": n_skipped(state.skipped), "nonfinite_steps": state.nonfinite_steps,
           "grad_norm": grad_norm.item(), "time_s": round(time.time() - run.started, 2)}
    if model.logit_bias is not None:
        row["logit_bias"] = model.logit_bias.item()
    run.logger.log(row)
    run.last, run.last_losses = row, tuple(losses)
    run.bar.set_postfix(loss=f"{losses['loss']:.3f}", scale=f"{row['logit_scale']:.1f}")
    cap = cfg.model.logit_scale.max
    if run.temperature.learnable and state.step == cfg.train.log_every and cap and row["logit_scale"] >= cap * 0.999:
        log.warning("logit scale hit its clamp (%.0f) early: the learning rate may be too high",
                    cfg.model.logit_scale.max)


def mean_over_processes(values: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, float]:
    """Each process computes the loss of its own rows: their mean is the loss of the global batch."""
    stacked = torch.stack([v.float() for v in values.values()])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "mean")
    return dict(zip(values, stacked.tolist()))


def checkpoint(run: Run) -> Path:
    """Every process's data position and RNG states, gathered; the main process writes the checkpoint (its error,
    e.g. a full disk, stops every process); returns its path."""
    ranks = gather_object([process_record(run.state)])
    return on_main(lambda: save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, ranks,
                                           run.cfg.train.keep_last, to_dict(run.cfg), run.frozen))


# ----------------------------------------------------------------------------------------------- finish


def finish(run: Run) -> dict[str, Any]:
    """Save the model, evaluate it, write the report and ``results.json`` (main process); returns the results."""
    run.bar.close()
    run.logger.close()
    skipped: dict = {}
    for other in gather_object([run.state.skipped]):
        merge_skips(skipped, other)
    run.accelerator.wait_for_everyone()

    results: dict[str, Any] = {"run_dir": str(run.run_dir), "steps": run.state.step}
    if run.last:  # the last logged loss outputs (loss, its components, e.g. cwcl_positive_mass) and logit scale
        results.update({f"final_{k}": run.last[k] for k in (*run.last_losses, "logit_scale")})
    if run.accelerator.is_main_process:
        if skipped:
            log.warning("skipped while training: %s; examples: %s", skipped["counts"], skipped["examples"])
        with writing(run.run_dir):  # a full disk: one error line, the last checkpoint is complete
            run.model.save_pretrained(run.run_dir / MODEL, metadata={STEP_KEY: str(run.state.step)})
            scored = {"model": str(run.run_dir / MODEL), "model_step": run.state.step}
            results.update(evaluate_run(run.cfg, run.model, run.run_dir, scored))
            results["skipped"] = skipped.get("counts", {})
            results["nonfinite_steps"] = run.state.nonfinite_steps
            write_json(run.run_dir / RESULTS, results)
    return results
