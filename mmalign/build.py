"""From a recipe's config to what a run trains: the objective, the model it requires, the optimiser and the
temperature schedule.

The objective is built first: its ``requirements`` decide the model config (:func:`resolve_model_config`, the one
place where the objective and the model are checked against each other), then the model is built from that config.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from transformers import get_cosine_schedule_with_warmup

from .config import Config, FsdpConfig, ModelConfig
from .errors import ConfigError, closest
from .eval.nway import NWAY_SCORES
from .losses import LOSSES, Objective, Requirements, TemperatureSchedule, build_loss
from .losses.multimodal import text_anchor
from .losses.registry import loss_options
from .model import AlignmentModel
from .modalities import NORM_TYPES


def build_accelerator(cfg: Config):
    """The run's ``Accelerator``: its device, mixed precision and, with ``train.fsdp``, FSDP.

    Accelerate keeps one process-wide state: it is reset first (the process group stays), so several runs in one
    process (a notebook, the tests) each get the precision and plugins of their own recipe.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    t = cfg.train
    # Without an accelerator, say so: accelerate would otherwise set up a process group without all-to-all on CPU.
    cpu = t.device == "cpu" or not torch.accelerator.is_available()
    if t.fsdp is not None and cpu:
        raise ConfigError("train.fsdp shards the model over GPUs (or other accelerators), and this run is on CPU, "
                          "where Accelerate would run DistributedDataParallel instead; remove train.fsdp")
    AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=t.precision,
                       fsdp_plugin=fsdp_plugin(t.fsdp) if t.fsdp is not None else None)


def fsdp_plugin(fsdp: FsdpConfig):
    """Accelerate's FSDP2 plugin for ``train.fsdp``: the towers' blocks are the units it shards (the model's
    ``_no_split_modules``, which Accelerate's transformer-based wrap policy reads), full state dicts for saving."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=fsdp.reshard_after_forward, cpu_offload=fsdp.cpu_offload,
        activation_checkpointing=fsdp.activation_checkpointing, auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT")


def build_objective(cfg: Config) -> Objective:
    """The recipe's loss (``loss.name`` with ``loss.kwargs``) over the model's modalities, in config order.

    An objective with an ``anchor`` option the recipe leaves unset anchors on text (GRAM, as in its paper and code):
    the modality named ``text``, else the first of kind text (:func:`~.losses.multimodal.text_anchor`)."""
    kwargs = dict(cfg.loss.kwargs)
    if cfg.loss.name in LOSSES and "anchor" in loss_options(cfg.loss.name) and kwargs.get("anchor") is None:
        kinds = {name: m.kind for name, m in cfg.model.modalities.items()}
        kwargs["anchor"] = text_anchor(list(kinds), kinds)
    return build_loss(cfg.loss.name, list(cfg.model.modalities), **kwargs)


def resolve_model_config(cfg: Config, needs: Requirements) -> ModelConfig:
    """The model config that trains with an objective needing ``needs``: a logit bias where the objective needs one,
    and the objective's N-way score unless the recipe sets ``model.nway_score``. ``cfg`` is left as it is; a
    recipe the objective cannot train raises a ``ConfigError`` saying what to change."""
    model, loss = cfg.model, cfg.loss.name
    if needs.captions and model.caption is None:
        raise ConfigError(f"loss {loss!r} needs model.caption (a caption decoder)")
    if model.caption is not None and not needs.captions:
        raise ConfigError(f"model.caption trains a caption decoder: use a loss with a caption term (coca), "
                          f"not {loss!r}")
    optional = [name for name, m in model.modalities.items() if m.optional]
    if optional and not needs.presence:
        takes_masks = sorted(n for n, c in LOSSES.items() if c.requirements.presence)
        raise ConfigError(f"loss {loss!r} takes no presence masks, so optional modalities "
                          f"({', '.join(optional)}) need another loss: {', '.join(takes_masks)}")
    for name in needs.features:
        if model.modalities[name].optional:
            raise ConfigError(f"loss {loss!r} reads the {name!r} tower's features for every sample, so "
                              f"model.modalities.{name}.optional must be false")
    nway_score = model.nway_score if model.nway_score is not None else needs.nway_score
    if nway_score not in NWAY_SCORES:
        raise ConfigError(f"model.nway_score must be one of {', '.join(sorted(NWAY_SCORES))}"
                          f"{closest(nway_score, NWAY_SCORES)}")
    return replace(model, logit_bias=model.logit_bias or needs.logit_bias, nway_score=nway_score)


def build(cfg: Config) -> tuple[Config, AlignmentModel, Objective]:
    """The config as the run trains it (its model section resolved), the model and the objective."""
    objective = build_objective(cfg)
    cfg = replace(cfg, model=resolve_model_config(cfg, objective.requirements))
    return cfg, AlignmentModel(cfg.model), objective


def build_model(cfg: Config) -> AlignmentModel:
    """The model a recipe trains (see :func:`build`)."""
    return build(cfg)[1]


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


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """AdamW over the trainable parameters and a cosine learning-rate schedule with linear warmup.

    Build it once the model is on its device: the update runs as one fused kernel over all parameters where torch
    has one for their device and dtype (:func:`adamw_implementation`)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                  **adamw_implementation([p for g in groups for p in g["params"]]))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.steps)


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """``fused=True`` when torch has a fused AdamW kernel for every parameter's device and floating dtype (CUDA,
    CPU, MPS, XPU, ...), else ``foreach=True`` (one kernel per operation over all parameters). Torch's default on
    CPU is a loop over the parameters: the fused kernel made the tiny CLIP's step in benchmarks/bench_train_step.py
    ~6x faster in the optimiser."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # what AdamW(fused=True) checks

    fused = _get_fused_kernels_supported_devices()
    if all(p.device.type in fused and torch.is_floating_point(p) for p in params):
        return {"fused": True}
    return {"foreach": True}


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
