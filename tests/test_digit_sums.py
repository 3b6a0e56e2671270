"""The Symile demo data: three modalities per sample, captions that name only (a + b) mod 10."""
import io
import json

import webdataset as wds
from PIL import Image

from mmalign.demo_data.digit_sums import build
from mmalign.data import expand_urls


def test_tiny_build_has_three_modalities_and_consistent_captions(tmp_path):
    paths = build(tmp_path, n_train=8, n_test=4)
    assert build(tmp_path, n_train=8, n_test=4) == paths  # cached
    classes = (tmp_path / "classes.txt").read_text().split()
    samples = list(wds.WebDataset(expand_urls(paths["train"]), shardshuffle=False))
    assert len(samples) == 8 and len(list(wds.WebDataset(expand_urls(paths["test"]), shardshuffle=False))) == 4
    for s in samples:
        label = s["label.txt"].decode()
        assert label in classes
        captions = json.loads(s["text.json"])
        assert captions == [f"the two digits add up to a number ending in {label}"]
        assert Image.open(io.BytesIO(s["image.png"])).size == (8, 8)
        glyph = Image.open(io.BytesIO(s["glyph.png"]))
        assert glyph.size == (12, 12) and max(glyph.getextrema()) > 100  # the digit is drawn


def test_symile_comparison_variants_load_and_findings_name_only_summary_fields():
    from mmalign import recipes
    from mmalign.demos import COMPARISONS, summarise

    symile = COMPARISONS["symile"]
    losses = {v: recipes.load("symile", sets).loss for v, sets in symile.variants.items()}
    assert {v: loss.name for v, loss in losses.items()} == {"symile": "symile", "gram": "gram", "clip": "clip"}
    # GRAM as in its code: text anchor, label smoothing 0.1
    assert losses["gram"].kwargs == recipes.load("gram").loss.kwargs == {"anchor": "text", "label_smoothing": 0.1}
    full = summarise({v: [{m: 0.5 for m in symile.metrics}] for v in symile.variants}, symile.metrics)
    recipes.text(symile.findings).format_map({**full, "seeds": 1, "run_dir": "x", "report": "x"})
