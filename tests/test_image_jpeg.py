"""JPEGs much larger than the model's input are decoded at reduced size: the same pixels up to resampling, and no
crop the training transform can take is ever enlarged."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mmalign.modalities import build_modality
from mmalign.modalities.image import OPENAI_STD, ImageConfig


def photo_jpeg(w: int, h: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A photo-like JPEG: smooth colour regions plus sensor-like noise, quality 90."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_modality(**kw):
    return build_modality("image", ImageConfig(kind="image", image_size=224, **kw))


def full_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("w,h,expected", [(1200, 900, (600, 450)), (2400, 1300, (600, 325)), (640, 480, (640, 480)),
                                          (512, 400, (512, 400))])
def test_large_jpegs_decode_at_reduced_size_with_the_same_pixels_up_to_resampling(w, h, expected):
    modality = image_modality()
    data = photo_jpeg(w, h)
    image = modality.decode(data, "jpg")
    assert image.mode == "RGB" and image.size == expected
    assert min(image.size) >= modality.jpeg_draft_side() == 290  # 224 / sqrt(0.8 x 3/4)
    # the evaluation transform (resize + centre crop) of the reduced and of the full decode: grey levels 0-255
    ours, full = modality.transform(image, train=False), modality.transform(full_decode(data), train=False)
    levels = ((ours - full) * torch.tensor(OPENAI_STD)[:, None, None] * 255).abs()
    assert levels.mean() < 1.0 and levels.max() < 8.0


def test_no_training_crop_of_a_reduced_jpeg_is_enlarged():
    """Every crop RandomResizedCrop can draw from the reduced image is still at least image_size on each side,
    also with a recipe's wider scale and ratio (which make the decoder keep more pixels)."""
    torch.manual_seed(0)
    for augment in ({}, {"scale": [0.5, 1.0], "ratio": [0.5, 2.0]}):
        modality = image_modality(augment=augment)
        aug = modality.train_augment
        for w, h in [(1200, 900), (900, 1600), (3000, 2000)]:
            image = modality.decode(photo_jpeg(w, h), "jpg")
            assert image.size[0] < w  # reduced
            for _ in range(2000):
                _, _, ch, cw = RandomResizedCrop.get_params(image, aug["scale"], aug.get("ratio", (3 / 4, 4 / 3)))
                assert min(ch, cw) >= 224, (augment, w, h, ch, cw)


def test_grey_and_cmyk_jpegs_decode_to_rgb_at_reduced_size():
    modality = image_modality()
    for mode in ("L", "CMYK"):
        image = modality.decode(photo_jpeg(1200, 900, mode=mode), "jpg")
        assert image.mode == "RGB" and image.size == (600, 450)
