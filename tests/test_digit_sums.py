"""The Symile demo data: three modalities per sample, captions that name only (a + b) mod 10."""
import io
import json

import webdataset as wds
from PIL import Image

from data_tools.digit_sums import build
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


def test_comparison_report_puts_the_objectives_side_by_side(tmp_path):
    from mmalign.demos import comparison_report

    (tmp_path / "classes.txt").write_text("zero\none\n")
    runs = {"symile": {"zeroshot_top1": 0.9, "zeroshot_score": "mip", "steps": 5, "run_dir": "x"},
            "clip": {"zeroshot_top1": 0.5, "zeroshot_score": "cosine", "steps": 5, "run_dir": "y"}}
    result = comparison_report(tmp_path / "cmp", runs, str(tmp_path / "classes.txt"))
    assert result["symile_zeroshot_top1"] == 0.9 and result["clip_zeroshot_top1"] == 0.5
    assert result["chance_top1"] == 0.5 and "symile_zeroshot_score" not in result
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| symile | 5 | mip | 0.900 |" in report and "| clip | 5 | cosine | 0.500 |" in report
    assert json.loads((tmp_path / "cmp" / "results.json").read_text()) == result
