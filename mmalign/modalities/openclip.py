"""open_clip architectures as towers: building one, reading what its checkpoint says about preprocessing without
building it, and what ``mmalign export --format open_clip`` needs from a tower (``OpenClipExport``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..modality_config import ModalityConfig
from .registry import model_and_weights

# open_clip preprocess config keys -> image config fields
PREPROCESS_FIELDS = {"size": "image_size", "mean": "mean", "std": "std", "resize_mode": "resize_mode",
                     "interpolation": "interpolation"}


def create_open_clip(model_name: str, pretrained: str | None, **kwargs) -> nn.Module:
    """An open_clip model by architecture name; ``pretrained`` is a tag (network) or a local checkpoint file."""
    import open_clip

    try:
        return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"open_clip model {model_name!r} (pretrained={pretrained!r}): {e}") from None


def open_clip_tower_model(cfg: ModalityConfig, image_size: int | None = None) -> tuple[nn.Module, dict]:
    """The open_clip model ``cfg`` names (built with its ``tower_kwargs``) and its config as built.

    With ``image_size`` (image towers: the config's) different from the architecture's, open_clip builds the vision
    tower for that size (``force_image_size``) and resizes a checkpoint's position embedding to it.
    """
    kwargs = dict(cfg.tower_kwargs)
    model_cfg, _ = open_clip_checkpoint(cfg)  # with tower_kwargs' own force_* applied
    size = model_cfg["vision_cfg"].get("image_size", 224)
    if image_size is not None and image_size != (size[0] if isinstance(size, (tuple, list)) else size):
        if kwargs.get("force_image_size") is not None:
            raise ConfigError(f"image_size {image_size} and tower_kwargs.force_image_size "
                              f"{kwargs['force_image_size']} disagree; set only image_size")
        kwargs["force_image_size"] = model_cfg["vision_cfg"]["image_size"] = image_size
    return create_open_clip(*model_and_weights(cfg), **kwargs), model_cfg


def drop_logit_parameters(model: nn.Module) -> None:
    """Remove an open_clip model's own ``logit_scale``/``logit_bias``: a tower never uses them (the logit scale is
    the ``AlignmentModel``'s), and a trainable parameter without a gradient stops DistributedDataParallel."""
    for name, _ in list(model.named_parameters(recurse=False)):
        if name.startswith("logit_"):
            delattr(model, name)


def open_clip_checkpoint(cfg: ModalityConfig) -> tuple[dict, dict]:
    """(model config, preprocess config) that ``open_clip.create_model(cfg.model, pretrained, **cfg.tower_kwargs)``
    builds with, read as open_clip reads them, without building: the architecture from its built-in config, a
    ``local-dir:`` folder or an ``hf-hub:`` repo (its ``open_clip_config.json``), with the ``force_*`` and config
    overrides of ``tower_kwargs``; preprocessing from open_clip's defaults, then that folder's config or the
    pretrained tag's, with the image size of the vision config."""
    import inspect

    import open_clip
    from open_clip.factory import parse_model_name
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    kwargs = cfg.tower_kwargs
    schema, identifier = parse_model_name(cfg.model)
    preprocess: dict[str, Any] = vars(PreprocessCfg()).copy()
    if schema is None:
        model_cfg = open_clip.get_model_config(identifier.replace("/", "-"))
        if model_cfg is None:
            raise ConfigError(f"open_clip has no architecture {cfg.model!r} (see open_clip.list_models())")
        if cfg.init == "pretrained" and cfg.pretrained:
            tag = open_clip.get_pretrained_cfg(identifier.replace("/", "-"), cfg.pretrained)
            preprocess = merge_preprocess_dict(preprocess, tag or {})
    else:
        if schema == "local-dir":
            config_file = Path(identifier) / "open_clip_config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(identifier, "open_clip_config.json"))
        try:
            saved = json.loads(config_file.read_text())
            model_cfg = saved["model_cfg"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"open_clip model {cfg.model!r}: no readable model_cfg in {config_file} ({e})") from None
        preprocess = merge_preprocess_dict(preprocess, saved.get("preprocess_cfg", {}))
    for section, force, key in (("vision_cfg", "force_image_size", "image_size"),
                                ("text_cfg", "force_context_length", "context_length")):
        model_cfg[section] = dict(model_cfg.get(section, {}))
        if kwargs.get(force) is not None:
            model_cfg[section][key] = kwargs[force]
    named = inspect.signature(open_clip.create_model).parameters  # the rest of the kwargs override the model config
    model_cfg.update({k: v for k, v in kwargs.items() if k not in named})
    size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess["size"] = size[0] if isinstance(size, (tuple, list)) else size
    preprocess = merge_preprocess_dict(preprocess, kwargs.get("force_preprocess_cfg") or {})
    return model_cfg, preprocess


def open_clip_image_defaults(cfg: ModalityConfig) -> dict[str, Any]:
    """The image config fields an open_clip architecture's checkpoint implies (``open_clip_checkpoint``)."""
    _, preprocess = open_clip_checkpoint(cfg)
    return {field: tuple(preprocess[key]) if isinstance(preprocess[key], (tuple, list)) else preprocess[key]
            for key, field in PREPROCESS_FIELDS.items() if preprocess.get(key) is not None}


def open_clip_context_length(cfg: ModalityConfig) -> int:
    """Text positions of an open_clip architecture (``text_cfg.context_length``, 77 when it names none)."""
    model_cfg, _ = open_clip_checkpoint(cfg)
    return int(model_cfg["text_cfg"].get("context_length", 77))


@dataclass
class OpenClipExport:
    """What ``mmalign export --format open_clip`` writes for one tower (a tower spec's ``export["open_clip"]``)."""

    part: str  # "image" | "text"
    model_name: str  # the open_clip architecture
    model_cfg: dict  # its config as built (with tower_kwargs' overrides, e.g. force_image_size)
    state: dict[str, torch.Tensor]  # its weights, named as in the open_clip model
    projection: str  # the key of the projection that mmalign's linear head folds into
