"""Image modality: PIL decoding, open_clip's train/eval transforms, and towers (small CNN, open_clip, timm)."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import ModalityConfig
from ..errors import ConfigError, DataError
from .base import Modality, register_modality, register_tower

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig(ModalityConfig):
    image_size: int = 224
    mean: Optional[tuple] = OPENAI_MEAN
    std: Optional[tuple] = OPENAI_STD
    resize_mode: str = "shortest"  # open_clip: "shortest" | "longest" | "squash"
    augment: dict = field(default_factory=dict)  # open_clip AugmentationCfg keys, e.g. {scale: [0.8, 1.0]}


@register_modality
class ImageModality(Modality):
    kind = "image"
    extensions = ("jpg", "jpeg", "png", "webp", "bmp")
    config_class = ImageConfig
    towers = {}
    default_tower = "small_cnn"

    def __init__(self, name: str, cfg: ImageConfig):
        super().__init__(name, cfg)
        self._transforms: dict[bool, object] = {}

    def decode(self, data: bytes, ext: str):
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot decode image ({ext}): {e}") from None
        if image.width == 0 or image.height == 0:
            raise DataError("image has zero size")
        return image.convert("RGB")

    def transform(self, item, train: bool) -> torch.Tensor:
        if train not in self._transforms:
            import open_clip

            cfg = self.cfg
            aug = {"scale": (0.8, 1.0), **cfg.augment}
            self._transforms[train] = open_clip.image_transform(
                cfg.image_size, is_train=train, mean=cfg.mean, std=cfg.std, resize_mode=cfg.resize_mode,
                aug_cfg=aug if train else None,
            )
        return self._transforms[train](item)

    def placeholder(self, train: bool) -> torch.Tensor:
        """A black image of the transformed size (3 x image_size x image_size)."""
        return torch.zeros(3, self.cfg.image_size, self.cfg.image_size)

    def __getstate__(self):
        return {**self.__dict__, "_transforms": {}}


class SmallCNN(nn.Module):
    """A small conv net for tiny images (digits, glyphs): conv-BN-ReLU stages, then global average pooling."""

    def __init__(self, width: int = 32, depth: int = 3, in_channels: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for i in range(depth):
            out = width * 2**i
            layers.append(nn.Sequential(
                nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if i < depth - 1 else nn.Identity(),
            ))
            c = out
        self.blocks = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))


@register_tower(ImageModality, "small_cnn")
def small_cnn(cfg: ImageConfig) -> nn.Module:
    return SmallCNN(**cfg.tower_kwargs)


class OpenClipVisual(nn.Module):
    """The image tower of any open_clip architecture (ViT, ConvNeXt, ModifiedResNet, ...)."""

    def __init__(self, model_name: str, pretrained: str | None, **kwargs):
        super().__init__()
        import open_clip

        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            raise ConfigError(f"open_clip model {model_name!r} (pretrained={pretrained!r}): {e}") from None
        self.visual = model.visual
        self.out_dim = model.visual.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


@register_tower(ImageModality, "open_clip")
def open_clip_visual(cfg: ImageConfig) -> nn.Module:
    if not cfg.model:
        raise ConfigError("image tower open_clip needs 'model' (an open_clip architecture name, e.g. ViT-B-32)")
    pretrained = cfg.pretrained if cfg.init == "pretrained" else None
    return OpenClipVisual(cfg.model, pretrained, **cfg.tower_kwargs)


class TimmTower(nn.Module):
    """Any timm architecture as a feature extractor (``num_classes=0``)."""

    def __init__(self, model_name: str, pretrained: str | None, **kwargs):
        super().__init__()
        import timm

        overlay = {"file": pretrained} if pretrained and pretrained not in ("true", "hub") else None
        try:
            self.model = timm.create_model(
                model_name, pretrained=bool(pretrained), num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
            )
        except (RuntimeError, FileNotFoundError) as e:
            raise ConfigError(f"timm model {model_name!r} (pretrained={pretrained!r}): {e}") from None
        self.out_dim = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@register_tower(ImageModality, "timm")
def timm_tower(cfg: ImageConfig) -> nn.Module:
    if not cfg.model:
        raise ConfigError("image tower timm needs 'model' (a timm architecture name, e.g. resnet18)")
    pretrained = cfg.pretrained if cfg.init == "pretrained" else None
    return TimmTower(cfg.model, pretrained, **cfg.tower_kwargs)
