"""Bad data is skipped and counted per reason, never silently; too much of it stops the run; passes are reproducible."""
import copy
import json
import logging
import os
import re
import tarfile
from pathlib import Path

import pytest

from conftest import metrics_rows, shape_png, shape_sample, tiny_recipe, write_shard
from mmalign.config import load_config
from mmalign.data import SKIP_REASONS, counted_batches, expand_urls, iterate_batches, pass_items
from mmalign.errors import DataError
from mmalign.modalities import build_modality
from mmalign.modalities.image import ImageConfig
from mmalign.modalities.text import TextConfig
from mmalign.train import train

BAD_SAMPLES = [
    {"__key__": "corrupt-image", "image.png": os.urandom(300), "text.txt": "noise"},
    {"__key__": "cut-image", "image.png": shape_png(3)[:60], "text.txt": "half a png"},
    {"__key__": "no-text", "image.png": shape_png(4)},
    {"__key__": "no-image", "text.txt": "a caption without its image"},
    {"__key__": "wrong-extension", "image.xyz": shape_png(5), "text.txt": "an image named .xyz"},
    {"__key__": "not-utf8", "image.png": shape_png(6), "text.txt": b"\xff\xfe\xfa"},
    {"__key__": "blank-caption", "image.png": shape_png(7), "text.txt": "  \n \n"},
    {"__key__": "broken-json", "image.png": shape_png(8), "text.json": '["unterminated'},
    {"__key__": "bad-label", "image.png": shape_png(9), "text.txt": "fine", "label.txt": b"\xc3\x28"},
]
PER_PASS = {"bad image": 2, "missing text": 1, "missing image": 1, "unsupported image type": 1, "bad text": 3,
            "bad label": 1, "corrupt shard": 2, "empty shard": 1}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> dict:
    """32 good samples between every kind of bad sample and shard (one truncated inside a member, one empty tar,
    one zero-byte file)."""
    root = tmp_path_factory.mktemp("bad-shards")
    good = [shape_sample(i) for i in range(32)]
    write_shard(root / "a-samples.tar", good[:8] + BAD_SAMPLES + good[8:16])
    cut = Path(write_shard(root / "b-cut.tar", good[16:] + [{"__key__": "lost", "image.png": shape_png(1)}]))
    with tarfile.open(cut) as tar:
        lost = next(m for m in tar.getmembers() if m.name.startswith("lost."))
    cut.write_bytes(cut.read_bytes()[: lost.offset_data + 20])  # cut inside the last member's data
    with tarfile.open(root / "c-empty.tar", "w"):
        pass
    (root / "d-zero.tar").write_bytes(b"")
    return {"spec": str(root / "*.tar"), "good": sorted(s["__key__"] for s in good), "root": root}


@pytest.fixture(scope="module")
def modalities(tiny_text_model) -> dict:
    return {"image": build_modality("image", ImageConfig(kind="image", image_size=16)),
            "text": build_modality("text", TextConfig(kind="text", model=tiny_text_model, max_length=16))}


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_counts_every_fault_exactly(bad_shards, modalities, workers, caplog):
    urls = expand_urls(bad_shards["spec"]) + [str(bad_shards["root"] / "deleted-after-listing.tar")]
    skips: dict = {}
    with caplog.at_level(logging.WARNING, logger="mmalign.data.pipeline"):
        keys = [k for b in iterate_batches(urls, modalities, 8, train=False, num_workers=workers, skips=skips)
                for k in b["__key__"]]
    assert sorted(keys) == bad_shards["good"]  # every good sample once, including those before the cut
    assert skips["counts"] == {**PER_PASS, "unreadable shard": 1}
    # every reason is documented (the one that needs optional modalities is in test_missing_modalities.py)
    assert {re.sub("image|text", "{name}", reason) for reason in skips["counts"]} == set(SKIP_REASONS) - {
        "missing every modality"}
    corrupt = skips["examples"]["corrupt shard"]
    assert any("d-zero.tar: ReadError: empty file" in e for e in corrupt)
    assert any("b-cut.tar: ReadError" in e and "after 16 sample(s)" in e for e in corrupt), corrupt
    assert "wrong-extension: image.xyz" in skips["examples"]["unsupported image type"][0]
    assert "deleted-after-listing.tar: FileNotFoundError: No such file" in skips["examples"]["unreadable shard"][0]
    logged = caplog.text
    for reason in PER_PASS:
        assert f"skipping data: {reason}, e.g." in logged  # the first of each reason reaches the log at once


def _config(tmp_path, shards, text_model, *overrides):
    recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", shards, text_model)
    return load_config(recipe, ["model.modalities.image.tower_kwargs={width: 4, depth: 2}", *overrides])


@pytest.mark.slow
def test_training_on_bad_shards_completes_with_exact_skip_counts(tmp_path, bad_shards, tiny_text_model):
    # 32 good samples = 4 batches of 8 per epoch; 8 steps = 2 whole epochs, each counting every fault once
    results = train(_config(tmp_path, bad_shards["spec"], tiny_text_model, "train.steps=8",
                            "data.max_bad_fraction=0.5"))
    assert results["steps"] == 8 and results["nonfinite_steps"] == 0
    assert results["skipped"] == {reason: 2 * n for reason, n in PER_PASS.items()}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["skipped"] == results["skipped"]
    rows = metrics_rows(tmp_path / "run")
    assert rows[-1]["skipped"] == 2 * sum(PER_PASS.values()) and rows[-1]["epoch"] == 1


def test_too_much_bad_data_stops_the_run_naming_examples(tmp_path, tiny_text_model):
    samples = [shape_sample(i) for i in range(24)]
    samples += [{"__key__": f"junk{i:03d}", "image.png": os.urandom(64), "text.txt": "x"} for i in range(80)]
    shard = write_shard(tmp_path / "mostly-junk.tar", samples)
    with pytest.raises(DataError, match=r"80 of 1\d\d samples were unusable \(more than data.max_bad_fraction=0.1\)"
                                        r".*bad image: .*mostly-junk.tar:junk\d+: image.png: cannot decode image"):
        train(_config(tmp_path, shard, tiny_text_model, "train.steps=50"))


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("good-shards")
    return [write_shard(root / f"g{k}.tar", [shape_sample(i) for i in range(12 * k, 12 * k + 12)]) for k in range(3)]


def _keys(urls, modalities, **kw) -> list[str]:
    return [k for b in pass_items(urls, modalities, 4, train=True, shuffle_buffer=8, **kw) if "__key__" in b
            for k in b["__key__"]]


def test_shuffling_is_reproducible_per_seed_and_epoch_with_workers(good_shards, modalities):
    first = _keys(good_shards, modalities, seed=0, epoch=0, num_workers=2)
    assert len(first) == len(set(first)) == 36  # every sample once (2 workers: 2 shards + 1 shard)
    assert _keys(good_shards, modalities, seed=0, epoch=0, num_workers=2) == first
    assert _keys(good_shards, modalities, seed=1, epoch=0, num_workers=2) != first
    assert _keys(good_shards, modalities, seed=0, epoch=1, num_workers=2) != first
    resampled = _keys(good_shards, modalities, seed=0, epoch=0, num_workers=0, resampled=True)
    assert resampled == _keys(good_shards, modalities, seed=0, epoch=0, num_workers=0, resampled=True)
    assert resampled != _keys(good_shards, modalities, seed=0, epoch=1, num_workers=0, resampled=True)


def test_augmentations_are_the_same_in_workers_and_leave_the_main_rng_alone(good_shards, modalities):
    """A sample's random crop and caption choice depend on its key only: the same with 0 or 2 workers (workers seed
    without restoring), and a pass in the main process leaves the caller's RNG streams where they were."""
    import random

    import torch

    def images(workers: int) -> dict:
        return {k: img for b in pass_items(good_shards, modalities, 4, train=True, shuffle_buffer=0,
                                           num_workers=workers) if "__key__" in b
                for k, img in zip(b["__key__"], b["image"])}

    random.seed(7)
    torch.manual_seed(7)
    in_main = images(0)
    after = (random.random(), torch.rand(1).item())
    random.seed(7)
    torch.manual_seed(7)
    assert after == (random.random(), torch.rand(1).item())
    in_workers = images(2)
    assert in_main.keys() == in_workers.keys() and len(in_main) == 36
    for key, img in in_main.items():
        assert torch.equal(img, in_workers[key]), key


def test_fewer_shards_than_workers_warns_and_reads_each_sample_once(good_shards, modalities, caplog):
    with caplog.at_level(logging.WARNING, logger="mmalign.data.pipeline"):
        keys = _keys(good_shards[:1], modalities, num_workers=4)
    assert sorted(keys) == sorted(f"s{i:05d}" for i in range(12))
    assert "1 shard(s) for this process: using 1 DataLoader worker(s) instead of 4" in caplog.text


def test_resuming_a_pass_counts_each_skip_once_at_any_position():
    """A checkpoint after batch r, then a resumed pass with replay=r: skip totals equal an uninterrupted pass's."""
    def item(n, reason=None, batch=True):
        return {"_skipped": {"counts": {reason: n}, "examples": {reason: [reason]}} if reason else {},
                **({"__key__": [n]} if batch else {"_empty": True})}

    items = [item(1, "a", False), item(1), item(2, "b"), item(1, "c", False), item(3), item(4, "d"),
             item(2, "e", False), item(5, "a", False)]
    whole: dict = {}
    assert [n for n, _ in counted_batches(items, whole)] == [1, 2, 3, 4]
    for replay in range(5):
        skips: dict = {}
        for n, _ in counted_batches(items, skips):
            if n == replay:
                break
        at_checkpoint = copy.deepcopy(skips) if replay else {}
        resumed = [n for n, _ in counted_batches(items, at_checkpoint, replay=replay)]
        assert resumed == list(range(replay + 1, 5))
        assert at_checkpoint.get("counts", {}) == whole["counts"], replay


def test_evaluation_reports_what_it_skipped(tmp_path, bad_shards, tiny_text_model):
    from mmalign.eval.runner import evaluate_retrieval
    from mmalign.model import AlignmentModel

    model = AlignmentModel(_config(tmp_path, bad_shards["spec"], tiny_text_model).model)
    out = evaluate_retrieval(model, bad_shards["spec"], "image", "text", batch_size=16)
    assert out["retrieval_n"] == 32 and out["skipped"] == PER_PASS


def test_workers_inherit_the_tokenizer_the_pass_loads_once(good_shards, tiny_text_model):
    text = build_modality("text", TextConfig(kind="text", model=tiny_text_model, max_length=16))
    items = pass_items(good_shards, {"image": build_modality("image", ImageConfig(kind="image", image_size=16)),
                                     "text": text}, 4, train=True, num_workers=2)
    assert text._tokenizer is not None  # loaded before the workers started, so they fork with it
    assert sum(len(b["__key__"]) for b in items if "__key__" in b) == 36
