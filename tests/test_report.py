"""`mmalign report RUN`: report.html with curves, confusion matrix, recall@k and retrieval examples, checked in
headless Chromium (no console errors, plots drawn); CLIP_benchmark keys in the results; per-kind renderers."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from mmalign.config import load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run_dir(shapes_dataset, tiny_text_model, tmp_path_factory):
    from mmalign.data.shards import write_shards
    from mmalign.train import train

    root = tmp_path_factory.mktemp("report")
    shards = write_shards(shapes_dataset["csv"], root / "shards", shard_size=24)["shards"]
    recipe = tiny_recipe(root / "recipe.yaml", root / "run", shards, tiny_text_model, shapes_dataset["classes"],
                         shapes_dataset["templates"])
    result = train(load_config(recipe, ["train.steps=3"]))
    return root / "run", result


def screenshot(page, png, tmp_path) -> list[str]:
    """Render ``page`` in headless Chromium to ``png``; returns the page's console messages."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2400", f"--screenshot={png}", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert png.is_file(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_results_carry_clip_benchmark_keys(run_dir):
    _, result = run_dir
    cb = result["clip_benchmark"]
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(cb)
    assert {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)} <= set(cb)
    assert cb["acc1"] == result["zeroshot_top1"]
    assert cb["text_retrieval_recall@5"] == result["retrieval_i2t_R@5"]  # image -> its captions
    assert cb["image_retrieval_recall@1"] == result["retrieval_t2i_R@1"]  # caption -> its image
    assert json.loads((run_dir[0] / "results.json").read_text())["clip_benchmark"] == cb


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it: apt-get install -y "
                                              "chromium); the report page cannot be checked in a browser")
def test_report_page_renders_in_headless_chromium(run_dir, tmp_path, capsys):
    from PIL import Image

    from mmalign.cli import main

    run, _ = run_dir
    assert main(["report", str(run), "--examples", "3"]) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    page = run / "report.html"
    assert headline["report"] == str(page) and "zeroshot_top1" in headline
    text = page.read_text()
    for stem in ("loss_curve", "confusion_matrix", "retrieval_recall", "similarity_matrix"):
        assert f'alt="{stem}"' in text, stem
    assert text.count('class="thumb"') >= 3 * 5 and "a picture of a" in text  # image thumbnails and captions
    assert "image \N{RIGHTWARDS ARROW} text" in text and "text \N{RIGHTWARDS ARROW} image" in text

    png = tmp_path / "report.png"
    console = screenshot(page, png, tmp_path)
    assert console == [], console
    shot = np.asarray(Image.open(png).convert("RGB"))
    assert shot.shape[:2] == (2400, 1280)
    non_white = (shot < 235).any(axis=2).mean()
    colours = len(np.unique(shot.reshape(-1, 3)[::7], axis=0))
    assert non_white > 0.05 and colours > 200, (non_white, colours)  # plots and thumbnails drawn, not a blank page

    # The console check sees real failures: the same page with one corrupted image reports it.
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert any("image failed to load" in line for line in screenshot(broken, tmp_path / "broken.png", tmp_path))


def test_example_renderers_dispatch_per_kind():
    from PIL import Image

    from mmalign.report import render_item

    assert 'class="thumb"' in render_item("image", Image.new("RGB", (8, 8)))
    assert "a &lt;b&gt; caption" in render_item("text", ["a <b> caption"])
    # kinds without a renderer: a numeric signal (audio waveform, ECG leads) becomes a trace plot ...
    assert 'class="trace"' in render_item("audio", {"waveform": np.sin(np.linspace(0, 20, 400)), "sr": 16000})
    assert 'class="trace"' in render_item("ecg", torch.randn(12, 500))
    from mmalign.modalities.signals import Signal

    assert 'class="trace"' in render_item("timeseries", Signal(np.random.randn(3, 250), 250.0))
    # ... anything else a short description
    assert render_item("other", {"x": "y"}).startswith("<code>")
