"""Image-caption shards from emoji glyphs (Debian ``fonts-noto-color-emoji``) named by Unicode's ``emoji-test.txt``
(Debian ``unicode-data``), with emoji classes held out for zero-shot evaluation.

Every fully-qualified emoji except flags, components and skin-tone variants is one class (~1,600): its image is
the glyph rendered by PIL, its captions are paraphrases of its CLDR short name, some with its Unicode subgroup
("dog face, an animal-mammal emoji"). Related classes have overlapping captions ("cat face", "grinning cat",
"dog face"), which is what CWCL's soft targets are about. Within every subgroup a fifth of the classes (at least
one where the subgroup has 3 or more) is held out: the training shards never show them, and the test shards hold
a few renders of each for zero-shot classification among the held-out class names and for retrieval.
"""
from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .common import cached_build, write_samples

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL = "apt-get install -y fonts-noto-color-emoji unicode-data"
SKIP_GROUPS = {"Flags", "Component"}
CAPTION_TEMPLATES = [
    "{name}",
    "the {name} emoji",
    "a small icon showing {name}",
    "an emoji of {name}",
    "{name}, an emoji from the {subgroup} set",
    "a picture of {name}, in the {group} category",
]
ZEROSHOT_TEMPLATES = ["{}", "the {} emoji", "a small icon showing {}"]
GLYPH_PX = 109  # the only bitmap size of the colour font


@dataclass(frozen=True)
class Emoji:
    chars: str
    name: str
    group: str
    subgroup: str


def read_emoji(path: Path = EMOJI_TEST) -> list[Emoji]:
    """Fully-qualified emoji from ``emoji-test.txt`` (``1F436 ; fully-qualified # 🐶 E0.6 dog face``), in file
    order, without flags, components and skin-tone variants."""
    out, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            status, comment = line.split(";", 1)[1].split("#", 1)
            m = re.match(r"\s*(\S+)\s+E\d+\.\d+\s+(.+)", comment)
            if status.strip() != "fully-qualified" or m is None or group in SKIP_GROUPS or "skin tone" in m[2]:
                continue
            out.append(Emoji(m[1], m[2].strip(), group, subgroup))
    return out


def hold_out(emoji: list[Emoji], fraction: float, rng: random.Random) -> set[str]:
    """Names of the held-out classes: ``fraction`` of each subgroup (rounded down; at least 1 from 3 members)."""
    by_subgroup: dict[str, list[str]] = {}
    for e in emoji:
        by_subgroup.setdefault(e.subgroup, []).append(e.name)
    held: set[str] = set()
    for names in by_subgroup.values():
        k = max(int(len(names) * fraction), 1 if len(names) >= 3 else 0)
        held.update(rng.sample(names, k))
    return held


def render(font, chars: str, size: int, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> bytes:
    """PNG of one glyph on white, cropped to its ink, scaled to ``scale`` of a ``size`` square and shifted by
    ``shift`` (fractions of the free margin)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (2 * GLYPH_PX, 2 * GLYPH_PX), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((GLYPH_PX // 2, GLYPH_PX // 2), chars, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"the emoji font has no glyph for {chars!r}")
    glyph = canvas.crop(box)
    inner = max(1, round(size * scale))
    ratio = inner / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * ratio)), max(1, round(glyph.height * ratio))), Image.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    x = (size - glyph.width) / 2 * (1 + shift[0])
    y = (size - glyph.height) / 2 * (1 + shift[1])
    out.paste(glyph, (round(x), round(y)), glyph)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def captions(e: Emoji, k: int, rng: random.Random) -> list[str]:
    fields = {"name": e.name, "subgroup": e.subgroup.replace("-", " "), "group": e.group.replace("&", "and")}
    return [t.format(**fields) for t in rng.sample(CAPTION_TEMPLATES, k)]


def build(out_dir: Path, seed: int = 0, size: int = 24, captions_per_image: int = 3, held_fraction: float = 0.2,
          test_renders: int = 3) -> dict:
    def _build(out_dir: Path) -> dict:
        from PIL import ImageFont

        missing = [str(p) for p in (FONT, EMOJI_TEST) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"emoji demo needs {', '.join(missing)}: {INSTALL}")
        font = ImageFont.truetype(str(FONT), GLYPH_PX)
        emoji = read_emoji()
        rng = random.Random(seed)
        held = hold_out(emoji, held_fraction, rng)

        def samples(test: bool):
            for i, e in enumerate(emoji):
                if (e.name in held) != test:
                    continue
                text = json.dumps(captions(e, captions_per_image, rng)).encode()
                for r in range(test_renders if test else 1):
                    jitter = (1.0, (0.0, 0.0)) if r == 0 else (rng.uniform(0.7, 0.95),
                                                               (rng.uniform(-1, 1), rng.uniform(-1, 1)))
                    yield {"__key__": f"emoji{i:05d}_{r}", "image.png": render(font, e.chars, size, *jitter),
                           "text.json": text, "label.txt": e.name.encode()}

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "classes.txt").write_text("".join(e.name + "\n" for e in emoji if e.name in held))
        (out_dir / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        return {
            "train": write_samples(samples(False), out_dir, "train", 400),
            "test": write_samples(samples(True), out_dir, "test", 1000),
            "classes": str(out_dir / "classes.txt"),
            "templates": str(out_dir / "templates.txt"),
        }

    return cached_build(out_dir, f"emoji-v1-{seed}-{size}-{captions_per_image}-{held_fraction}-{test_renders}",
                        _build)
