"""Image modality: PIL decoding, open_clip's train/eval transforms, and towers (small CNN, open_clip, timm, HF CLIP)."""
from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..modality_config import ImageConfig
from .hf import dual_tower_spec
from .layers import norm_layer
from .openclip import OpenClipExport, open_clip_image_defaults, open_clip_tower_model
from .registry import Modality, TowerSpec, model_and_weights, register_modality, register_tower

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@register_modality
class ImageModality(Modality):
    kind = "image"
    extensions = ("jpg", "jpeg", "png", "webp", "bmp")
    config_class = ImageConfig
    default_tower = "small_cnn"
    defaults = {"image_size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "resize_mode": "shortest",
                "interpolation": "bicubic"}

    def __init__(self, name: str, cfg: ImageConfig):
        super().__init__(name, cfg)
        self._transforms: dict[bool, object] = {}

    def decode(self, data: bytes, ext: str):
        """Any image PIL reads (the content decides, not the extension), as RGB.

        Images over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), or that would exceed it once resized,
        are refused before decoding. PIL's plugins raise many exception types on malformed files, so every exception
        of decoding becomes a DataError. A JPEG much larger than the model's input is decoded at 1/2, 1/4 or 1/8 of its
        size (libjpeg's DCT scaling, :meth:`PIL.Image.Image.draft`) when that still leaves every crop the transforms
        can take at least ``image_size`` pixels on each side (:meth:`jpeg_draft_side`): the transforms then
        downsample a smaller image to the same output, for a fraction of the decoding and resizing work.
        """
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                w, h = image.size
                if w == 0 or h == 0:
                    raise DataError("image has zero size")
                if self.cfg.image_size ** 2 * max(w, h) / min(w, h) > Image.MAX_IMAGE_PIXELS:
                    raise DataError(f"image of {w}x{h} is too elongated to resize to {self.cfg.image_size}")
                if image.format == "JPEG":
                    image.draft(None, (self.jpeg_draft_side(),) * 2)
                image.load()
                return image if image.mode == "RGB" else image.convert("RGB")
        except DataError:
            raise
        except UnidentifiedImageError:
            raise DataError(f"cannot decode image ({ext}): not an image format PIL reads") from None
        except Exception as e:
            raise DataError(f"cannot decode image ({ext}): {type(e).__name__}: {e}") from None

    @property
    def train_augment(self) -> dict:
        """open_clip AugmentationCfg keys of the training transform: the recipe's over a random crop of 80-100%."""
        return {"scale": (0.8, 1.0), **self.cfg.augment}

    def jpeg_draft_side(self) -> int:
        """The shortest side a decoded image needs so that no transform enlarges any part of it: ``image_size`` over
        the smallest crop side relative to the image's shortest side, sqrt(min scale x min aspect ratio) of the
        training crop (open_clip's RandomResizedCrop; evaluation's resize and centre crop need less)."""
        scale = self.train_augment["scale"][0]
        ratio = self.train_augment.get("ratio", (3 / 4, 4 / 3))  # open_clip's (torchvision's) default
        return math.ceil(self.cfg.image_size / math.sqrt(scale * min(ratio[0], 1 / ratio[1])))

    def transform(self, item, train: bool) -> torch.Tensor:
        """open_clip's training (random crop, ``augment``) or evaluation transform (resize, centre crop). A locked
        tower whose features are cached (``cache_frozen``) gets the evaluation transform in training too, so each
        image is encoded once, as LiT precomputes them: random crops would miss the cache every epoch."""
        train = train and not self.cfg.caches_features
        if train not in self._transforms:
            import open_clip

            cfg = self.cfg
            self._transforms[train] = fuse_to_tensor_normalize(open_clip.image_transform(
                cfg.image_size, is_train=train, mean=cfg.mean, std=cfg.std, resize_mode=cfg.resize_mode,
                interpolation=cfg.interpolation, aug_cfg=self.train_augment if train else None,
            ))
        return self._transforms[train](item)

    def placeholder(self, train: bool) -> torch.Tensor:
        """A black image of the transformed size (3 x image_size x image_size)."""
        return torch.zeros(3, self.cfg.image_size, self.cfg.image_size)

    def __getstate__(self):
        return {**self.__dict__, "_transforms": {}}

    def save_hf_preprocessor(self, directory: Path) -> dict:
        """An HF image processor doing what the evaluation transform does."""
        from transformers import CLIPImageProcessor

        cfg = self.cfg
        size, resample = cfg.image_size, {"nearest": 0, "bilinear": 2, "bicubic": 3}[cfg.interpolation]
        common = {"image_mean": list(cfg.mean), "image_std": list(cfg.std), "resample": resample}
        if cfg.resize_mode == "squash":
            processor = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False, **common)
        else:
            if cfg.resize_mode == "longest":
                log.warning("HF image processors cannot letterbox (resize_mode longest): the exported one centre-crops")
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           **common)
        processor.save_pretrained(directory)
        return {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std, "resize_mode": cfg.resize_mode,
                "interpolation": cfg.interpolation}


class NormalizedTensor:
    """torchvision's ``ToTensor`` then ``Normalize`` as one multiply-add over the 8-bit pixels: ``x * 1 / (255 std) -
    mean / std``, the same values up to float rounding (~5e-7) in half the time or less (tests/test_modalities.py)."""

    def __init__(self, mean, std):
        std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std

    def __call__(self, pic) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        pixels = pil_to_tensor(pic)  # C x H x W, uint8
        return torch.addcmul(self.shift, pixels, self.scale, out=torch.empty(pixels.shape))


def fuse_to_tensor_normalize(transform):
    """``transform`` (a torchvision ``Compose`` ending in ``ToTensor``, ``Normalize``, as open_clip's do) with those
    two steps as one :class:`NormalizedTensor`; any other transform unchanged."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return transform
    return Compose([*steps[:-2], NormalizedTensor(steps[-1].mean, steps[-1].std)])


class SmallCNN(nn.Module):
    """A small conv net for tiny images (digits, glyphs): conv-norm-ReLU stages, then global average pooling.

    Its tokens are the last stage's spatial positions (B x H'W' x C, row-major).
    """

    def __init__(self, width: int = 32, depth: int = 3, in_channels: int = 3, norm: str = "batch"):
        super().__init__()
        layers, c = [], in_channels
        for i in range(depth):
            out = width * 2**i
            layers.append(nn.Sequential(
                nn.Conv2d(c, out, 3, padding=1, bias=False), norm_layer(norm, out), nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False), norm_layer(norm, out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if i < depth - 1 else nn.Identity(),
            ))
            c = out
        self.blocks = nn.Sequential(*layers)
        self.out_dim = self.token_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.blocks(x).flatten(2).transpose(1, 2), None


register_tower("image", "small_cnn", TowerSpec(build=lambda cfg: SmallCNN(**cfg.tower_kwargs), tower_kwargs=SmallCNN))


class OpenClipVisual(nn.Module):
    """The image tower of any open_clip architecture (ViT, ConvNeXt, ModifiedResNet, ...).

    open_clip ViTs also give tokens: the patch tokens after the final LayerNorm, or, for a CoCa architecture
    (``coca_ViT-*``), the outputs of its attentional pooler (the context open_clip's CoCa decoder reads), in the
    same pass as the pooled output (``forward_pooled_tokens``).
    """

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        model, self.model_cfg = open_clip_tower_model(cfg, image_size=cfg.image_size)
        self.visual = model.visual
        self.model_name = cfg.model
        self.out_dim = getattr(model.visual, "output_dim", self.model_cfg["embed_dim"])  # timm trunks name none
        self.token_dim = None
        if isinstance(self.visual, VisionTransformer):
            self.visual.output_tokens = True
            self.token_dim = self.visual.ln_post.normalized_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_pooled_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pooled, tokens = self.visual(x)  # only called when token_dim is set (ViTs)
        return pooled, tokens, None

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.forward_pooled_tokens(x)[1:]

    def open_clip_export(self) -> OpenClipExport:
        state = {f"visual.{k}": v for k, v in self.visual.state_dict().items()}
        projection = "visual.proj" if "visual.proj" in state else (
            "visual.attnpool.c_proj" if "visual.attnpool.c_proj.weight" in state else "visual.head.proj")
        return OpenClipExport("image", self.model_name, self.model_cfg, state, projection)


register_tower("image", "open_clip", TowerSpec(
    build=OpenClipVisual,
    defaults=open_clip_image_defaults, model="an open_clip architecture name, e.g. ViT-B-32",
    export={"open_clip": OpenClipVisual.open_clip_export}))


class TimmTower(nn.Module):
    """Any timm architecture as a feature extractor (``num_classes=0``); weights from a local file or the hub.

    An architecture with a fixed input size (ViT, Swin, ...) is built for the config's ``image_size`` (timm's
    ``img_size``, which also resamples a checkpoint's position embedding); others take any size.
    """

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        import timm

        model_name, pretrained = model_and_weights(cfg)
        kwargs = dict(cfg.tower_kwargs)
        default = timm_pretrained_cfg(model_name)
        if default.get("fixed_input_size") and cfg.image_size != default["input_size"][-1]:
            kwargs.setdefault("img_size", cfg.image_size)
        overlay = {"file": pretrained} if pretrained and pretrained not in ("true", "hub") else None
        try:
            self.model = timm.create_model(
                model_name, pretrained=bool(pretrained), num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
            )
        except (RuntimeError, FileNotFoundError, TypeError) as e:
            raise ConfigError(f"timm model {model_name!r} (pretrained={pretrained!r}): {e}") from None
        self.out_dim = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def timm_pretrained_cfg(model_name: str) -> dict:
    """timm's pretrained config of an architecture (``name`` or ``name.tag``), read without building it; empty for
    a name timm does not know (building then says so)."""
    import timm

    cfg = timm.get_pretrained_cfg(model_name)
    return cfg.to_dict() if cfg is not None else {}


def timm_image_defaults(cfg: ImageConfig) -> dict:
    """The preprocessing timm's pretrained config gives the architecture: input size, mean/std, interpolation."""
    default = timm_pretrained_cfg(cfg.model)
    if not default:
        return {}
    out = {"image_size": default["input_size"][-1], "mean": tuple(default["mean"]), "std": tuple(default["std"])}
    if default.get("interpolation") in ("bicubic", "bilinear", "nearest"):
        out["interpolation"] = default["interpolation"]
    return out


register_tower("image", "timm", TowerSpec(build=TimmTower, defaults=timm_image_defaults,
                                          model="a timm architecture name, e.g. resnet18"))
register_tower("image", "hf_clip", dual_tower_spec("image"))
