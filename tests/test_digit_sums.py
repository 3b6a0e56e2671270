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
    configs = {v: symile.load(v, "symile.yaml", []) for v in symile.variants}
    assert {v: cfg.loss.name for v, cfg in configs.items()} == {"symile": "symile", "gram": "gram", "clip": "clip"}
    # GRAM as gram.yaml (as in its code: text anchor, label smoothing 0.1, DAM, learned temperature)
    assert configs["gram"] == recipes.load("gram")
    # pairwise CLIP on Symile's data and towers, with CLIP's unit-length embeddings and capped scale
    clip = configs["clip"].model
    assert {m.output_norm for m in clip.modalities.values()} == {"l2"} and clip.logit_scale.max == 100.0
    assert configs["clip"].data == configs["symile"].data
    full = summarise({v: [{m: 0.5 for m in symile.metrics}] for v in symile.variants}, symile.metrics)
    recipes.text(symile.findings).format_map({**full, "seeds": 1, "run_dir": "x", "report": "x"})
