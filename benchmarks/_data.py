"""Synthetic image + caption shards for the benchmarks, built offline and cached under ``benchmarks/_work/``."""
from __future__ import annotations

import io
import random
from pathlib import Path

from mmalign.demo_data.common import cached_build, write_samples

WORK_DIR = Path(__file__).resolve().parent / "_work"

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink"]
THINGS = ["square", "circle", "cat", "dog", "car", "tree", "house", "boat", "bird", "flower", "cup", "chair"]
PLACES = ["on a table", "in a field", "at night", "by the sea", "in the snow", "on a street", "in a room"]


def caption(rng: random.Random) -> str:
    """A short caption of a few words (8-16 CLIP tokens), different per sample."""
    words = ["a", rng.choice(COLOURS), rng.choice(THINGS)]
    if rng.random() < 0.7:
        words += rng.choice(PLACES).split()
    if rng.random() < 0.5:
        words += ["with", "a", rng.choice(COLOURS), rng.choice(THINGS)]
    return " ".join(words)


def photo(rng: random.Random, width: int, height: int, fmt: str = "png") -> bytes:
    """``fmt`` ("png" or "jpg", quality 90) bytes of a ``width`` x ``height`` RGB picture: a smooth random colour
    field plus noise (compresses like a photo rather than like a flat test pattern, so decoding costs what it would
    on real data)."""
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.getrandbits(32))
    coarse = Image.fromarray(gen.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.int16) + gen.integers(-6, 7, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="PNG" if fmt == "png" else "JPEG",
                                                                **({} if fmt == "png" else {"quality": 90}))
    return buf.getvalue()


def image_text_shards(n_samples: int, shard_size: int, image_px: int | tuple[int, int], work_dir: Path = WORK_DIR,
                      fmt: str = "png", labelled: bool = False) -> list[str]:
    """``n_samples`` image (``image.png`` or ``image.jpg``) + caption (``text.txt``) samples in shards of
    ``shard_size`` under ``work_dir``; an image's sides are ``image_px``, or each drawn from the range ``(low,
    high)``; ``labelled``: each sample also names one of ``THINGS`` in ``label.txt`` (zero-shot classes). Built
    once per setting (seeded, so every run reads the same bytes) and reused. Returns their paths."""
    low, high = (image_px, image_px) if isinstance(image_px, int) else image_px
    size = f"{low}px" if low == high else f"{low}-{high}px"
    out = work_dir / (f"shards-{n_samples}x{size}-{shard_size}{'' if fmt == 'png' else '-' + fmt}"
                      f"{'-labelled' if labelled else ''}")

    def side(rng: random.Random) -> int:
        return low if low == high else rng.randint(low, high)

    def build(path: Path) -> dict:
        rng = random.Random(0)
        samples = ({"__key__": f"s{i:06d}", f"image.{fmt}": photo(rng, side(rng), side(rng), fmt),
                    "text.txt": caption(rng).encode(),
                    **({"label.txt": rng.choice(THINGS).encode()} if labelled else {})} for i in range(n_samples))
        write_samples(samples, path, "train", shard_size)
        return {"shards": sorted(str(p) for p in path.glob("train-*.tar"))}

    return cached_build(out, "1", build)["shards"]


def as_csv(urls: list[str], n_samples: int, out_dir: Path) -> str:
    """The first ``n_samples`` samples of ``urls`` as image files plus a tab-separated ``filepath``/``title`` list
    (open_clip_train's ``--dataset-type csv``); built once per size. Returns the CSV's path."""
    import webdataset as wds

    def build(path: Path) -> dict:
        path.mkdir(parents=True, exist_ok=True)
        lines = ["filepath\ttitle"]
        for sample in wds.WebDataset(urls, shardshuffle=False).slice(n_samples):
            image = path / f"{sample['__key__']}.png"
            image.write_bytes(sample["image.png"])
            lines.append(f"{image}\t{sample['text.txt'].decode()}")
        (path / "train.csv").write_text("\n".join(lines) + "\n")
        return {"csv": str(path / "train.csv")}

    return cached_build(out_dir, f"{n_samples}:{','.join(urls)}", build)["csv"]
