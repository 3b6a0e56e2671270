"""Image-caption shards from scikit-learn's handwritten digits (1,797 8x8 images, offline).

Each image is upscaled to 32x32 and gets several captions that name the digit and describe what can be seen in
that particular image (ink thickness, slant, size), so retrieval has instance-level positives. A stratified 25%
is held out for zero-shot classification, retrieval and captioning. A word-level tokenizer over the captions and
zero-shot prompts comes along for caption decoders (the CoCa demo).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np

from ..optional import require
from .common import cached_build, word_tokenizer, write_samples

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a handwritten digit {name}",
    "the number {name}, written by hand",
    "a {thick} handwritten {name}",
    "a {slant} {name}",
    "a {size} digit {name} drawn with {thick} strokes",
    "a {thick}, {slant} handwritten number {name}",
]
ZEROSHOT_TEMPLATES = ["a handwritten digit {}", "the number {}, written by hand", "a picture of the digit {}"]


def _attributes(img: np.ndarray, cuts: dict) -> dict:
    """Describe one 8x8 digit: ink amount, slant (second moments), height of the inked area."""
    ink = img.sum()
    ys, xs = np.nonzero(img > 2)
    cov = np.cov(np.stack([xs, -ys])) if len(xs) > 1 else np.eye(2)
    slant = cov[0, 1] / max(cov[1, 1], 1e-6)
    height = ys.max() - ys.min() + 1 if len(ys) else 0
    return {
        "thick": "thick" if ink > cuts["ink_hi"] else "thin" if ink < cuts["ink_lo"] else "medium",
        "slant": "right-slanted" if slant > 0.25 else "left-slanted" if slant < -0.25 else "upright",
        "size": "tall" if height >= 8 else "short",
    }


def _png(img: np.ndarray, size: int = 32) -> bytes:
    from PIL import Image

    arr = (img / 16.0 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def build(out_dir: Path, seed: int = 0, captions_per_image: int = 3) -> dict:
    def _build(out_dir: Path) -> dict:
        digits = require("sklearn.datasets", "demo", "the digits demo data").load_digits()
        images, labels = digits.images, digits.target
        ink = images.sum(axis=(1, 2))
        cuts = {"ink_lo": np.quantile(ink, 0.33), "ink_hi": np.quantile(ink, 0.67)}
        rng = random.Random(seed)
        order = list(range(len(images)))
        rng.shuffle(order)
        held = set()
        for c in range(10):
            of_class = [i for i in order if labels[i] == c]
            held.update(of_class[: len(of_class) // 4])

        texts = [t.format(name) for t in ZEROSHOT_TEMPLATES for name in NAMES]

        def samples(split_held: bool):
            for i in order:
                if (i in held) != split_held:
                    continue
                attrs = _attributes(images[i], cuts)
                name = NAMES[labels[i]]
                captions = [t.format(name=name, **attrs) for t in rng.sample(CAPTION_TEMPLATES, captions_per_image)]
                texts.extend(captions)
                yield {"__key__": f"digit{i:05d}", "image.png": _png(images[i]),
                       "text.json": json.dumps(captions).encode(), "label.txt": name.encode()}

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "classes.txt").write_text("\n".join(NAMES) + "\n")
        (out_dir / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        paths = {
            "train": write_samples(samples(False), out_dir, "train", 340),
            "test": write_samples(samples(True), out_dir, "test", 500),
            "classes": str(out_dir / "classes.txt"),
            "templates": str(out_dir / "templates.txt"),
        }
        paths["tokenizer"] = word_tokenizer(texts, out_dir / "tokenizer")
        return paths

    return cached_build(out_dir, f"digits-v2-{seed}-{captions_per_image}", _build)
