"""The CWCL demo's pieces that need no training: the emoji list and held-out split, rendering, the comparison
summary and report (the demo itself runs end to end in ``mmalign demo cwcl``)."""
import random

import pytest

from mmalign import recipes
from mmalign.demo_data.emoji import FONT, INSTALL, hold_out, read_emoji, render
from mmalign.demos import COMPARISONS, summarise, write_comparison_report

EMOJI_TEST = """\
# group: Smileys & Emotion
# subgroup: face-smiling
1F600 ; fully-qualified # 😀 E1.0 grinning face
1F603 ; fully-qualified # 😃 E0.6 grinning face with big eyes
1F604 ; fully-qualified # 😄 E0.6 grinning face with smiling eyes
263A FE0F ; fully-qualified # ☺️ E0.6 smiling face
263A ; unqualified # ☺ E0.6 smiling face
# subgroup: cat-face
1F63A ; fully-qualified # 😺 E0.6 grinning cat
1F638 ; fully-qualified # 😸 E0.6 grinning cat with smiling eyes
# group: People & Body
# subgroup: hand-fingers-open
1F44B ; fully-qualified # 👋 E0.6 waving hand
1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone
# group: Flags
# subgroup: country-flag
1F1E9 1F1EA ; fully-qualified # 🇩🇪 E2.0 flag: Germany
"""


def test_read_emoji_keeps_fully_qualified_without_flags_and_skin_tones(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(EMOJI_TEST, encoding="utf-8")
    emoji = read_emoji(path)
    assert [e.name for e in emoji] == ["grinning face", "grinning face with big eyes", "grinning face with smiling eyes",
                                       "smiling face", "grinning cat", "grinning cat with smiling eyes", "waving hand"]
    assert emoji[3].chars == "☺️" and emoji[4].subgroup == "cat-face" and emoji[6].group == "People & Body"
    # A fifth of each subgroup, at least one from 3 members: 1 of the 4 smiling faces, none of 2 cats or 1 hand.
    held = hold_out(emoji, 0.2, random.Random(0))
    assert len(held) == 1 and held < {e.name for e in emoji if e.subgroup == "face-smiling"}


@pytest.mark.skipif(not FONT.is_file(), reason=f"needs the emoji font: {INSTALL}")
def test_render_is_a_small_png_of_the_glyph():
    from io import BytesIO

    from PIL import Image, ImageFont

    image = Image.open(BytesIO(render(ImageFont.truetype(str(FONT), 109), "🐶", 24)))
    assert image.size == (24, 24) and image.mode == "RGB"
    colours = image.getcolors(24 * 24)
    assert len(colours) > 20  # a colour glyph, not an empty (white) square


def test_comparison_summary_report_and_findings(tmp_path):
    runs = {v: [{"zeroshot_top1": x, "run_dir": str(tmp_path / f"{v}-seed{i}")} for i, x in enumerate(values)]
            for v, values in (("clip", [0.1, 0.2, 0.3]), ("cwcl", [0.0, 0.0, 0.03]))}
    summary = summarise(runs, ("zeroshot_top1", "retrieval_i2t_R@1"))
    assert summary["clip_zeroshot_top1_mean"] == pytest.approx(0.2)
    assert summary["clip_zeroshot_top1_std"] == pytest.approx(0.1)
    assert summary["cwcl_zeroshot_top1_mean"] == pytest.approx(0.01)
    # 95% CI of the mean over 3 seeds: t_{0.975, 2} = 4.3027 times std / sqrt(3)
    assert summary["clip_zeroshot_top1_ci95"] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-6)
    assert "clip_retrieval_i2t_R@1_mean" not in summary  # not reported by the runs
    text = write_comparison_report(tmp_path, runs, ("zeroshot_top1",), summary).read_text()
    assert "| zeroshot_top1 | 0.2000 ± 0.1000 [-0.0484, 0.4484] | 0.0100 ± 0.0173 [-0.0330, 0.0530] |" in text
    assert "[clip-seed0](clip-seed0/report.md)" in text
    # The findings template names only fields the demo's summary has.
    cwcl = COMPARISONS["cwcl"]
    full = summarise({v: [{m: 0.5 for m in cwcl.metrics}] * 3 for v in cwcl.variants}, cwcl.metrics)
    recipes.text(cwcl.findings).format_map({**full, "seeds": 3, "run_dir": "x", "report": "x"})
