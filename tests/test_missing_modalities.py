"""Samples with any subset of modalities: presence masks and placeholders in batches, the learned missing
embedding, masked objectives, and an end-to-end three-modality run (train + N-way evaluation from the CLI)."""
import io
import json
import random

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from mmalign.demo_data.common import write_samples
from mmalign.config import ModelConfig, from_dict, load_config
from mmalign.data import expand_urls, iterate_batches
from mmalign.errors import ConfigError
from mmalign.build import build_model
from mmalign.losses import (
    AlignmentOutput, alignment_loss, build_loss, clip_loss, cwcl_loss, cwcl_weights, dcl_loss, hard_negative_clip_loss,
    label_smoothed_clip_loss, symile_loss, uniformity_loss,
)
from mmalign.model import AlignmentModel
from tests.conftest import COLOURS, SHAPES, draw_shape, last_json, metrics_rows, run_in_process

N = 24
NO_SKETCH = {3, 7, 8, 15, 20}  # samples lacking the optional modality
NO_IMAGE = 11  # lacks a required modality: skipped and counted


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def three_modal(tmp_path_factory) -> dict:
    """Shapes as a photo-like image, the same shape as a small outline 'sketch', and a caption naming it."""
    root = tmp_path_factory.mktemp("three")
    rng = random.Random(0)
    samples = []
    for i in range(N):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[i % len(COLOURS)]
        sample = {"__key__": f"s{i:03d}", "text.json": json.dumps([f"a {colour} {shape}"]).encode(),
                  "label.txt": shape.encode()}
        if i != NO_IMAGE:
            sample["image.png"] = _png(draw_shape(shape, COLOURS[colour], rng.randint(8, 14), (rng.randint(0, 9),) * 2))
        if i not in NO_SKETCH:
            sample["sketch.png"] = _png(draw_shape(shape, (0, 0, 0), 10, (rng.randint(0, 12), rng.randint(0, 12))))
        samples.append(sample)
    shards = write_samples(samples, root, "train", 12)
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    (root / "templates.txt").write_text("a {}\n")
    return {"root": root, "shards": shards, "classes": root / "classes.txt", "templates": root / "templates.txt"}


def _recipe(path, run_dir, data, text_model, loss="symile", kwargs="{missing: learned}", steps=4):
    image = "{tower: small_cnn, tower_kwargs: {width: 4, depth: 2}, image_size: 8, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]"
    path.write_text(f"""run_dir: {run_dir}
model:
  embed_dim: 8
  modalities:
    image: {image}}}
    sketch: {image}, kind: image, optional: true}}
    text: {{tower: hf, model: '{text_model}', max_length: 12}}
loss: {{name: {loss}, kwargs: {kwargs}}}
data: {{train: '{data["shards"]}', batch_size: 8, shuffle_buffer: 1, num_workers: 0}}
train: {{steps: {steps}, lr: 0.01, warmup_steps: 1, checkpoint_every: 100, log_every: 1}}
eval:
  batch_size: 8
  zeroshot: {{data: '{data["shards"]}', classes: '{data["classes"]}', templates: '{data["templates"]}', query: 'image,sketch'}}
  retrieval: {{data: '{data["shards"]}', query: 'image,sketch', gallery: text}}
""")
    return path


@pytest.fixture(scope="module")
def model(three_modal, tiny_text_model, tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("m")
    return build_model(load_config(_recipe(tmp / "r.yaml", tmp / "run", three_modal, tiny_text_model)))


def test_batches_keep_samples_lacking_an_optional_modality(model, three_modal):
    skips: dict = {}
    batches = list(iterate_batches(expand_urls(three_modal["shards"]), model.modalities, 8, train=False, skips=skips))
    keys = [k for b in batches for k in b["__key__"]]
    assert len(keys) == N - 1 and f"s{NO_IMAGE:03d}" not in keys
    assert skips["counts"] == {"missing image": 1}
    for b in batches:
        want = torch.tensor([int(k[1:]) not in NO_SKETCH for k in b["__key__"]])
        assert torch.equal(b["sketch__present"], want)
        assert b["image__present"].all() and b["text__present"].all()
        assert b["sketch"].shape == b["image"].shape  # placeholders collate with real items
        assert (b["sketch"][~want] == 0).all() and (b["sketch"][want] != 0).any(dim=(1, 2, 3)).all()


def test_missing_embedding_fills_absent_rows_and_trains_with_learned(model, three_modal):
    batch = next(iterate_batches(expand_urls(three_modal["shards"]), model.modalities, 16, train=True,
                                 shuffle_buffer=1))
    present = batch["sketch__present"]
    assert 0 < present.sum() < len(present)
    model.eval()  # batch norm in eval mode: a subset of rows embeds as it does inside the full batch
    output = model(batch)
    emb = output.embeddings
    adapter = model.adapters["sketch"]
    missing = F.normalize(adapter.missing, dim=0)
    torch.testing.assert_close(emb["sketch"][~present], missing.expand(int((~present).sum()), -1))
    torch.testing.assert_close(emb["sketch"][present], adapter(batch["sketch"][present]), rtol=1e-5, atol=1e-6)
    assert model.presence(batch).keys() == {"sketch"} and output.present.keys() == {"sketch"}

    scale = torch.tensor(5.0)
    names = ["image", "sketch", "text"]
    learned = build_loss("symile", names, missing="learned")(output, logit_scale=scale)
    torch.testing.assert_close(learned["loss"], symile_loss([emb[m] for m in names], scale))
    learned["loss"].backward()
    assert adapter.missing.grad is not None and adapter.missing.grad.abs().sum() > 0

    model.zero_grad()
    output = model(batch)
    emb = output.embeddings
    dropped = build_loss("symile", names, missing="drop")(output, logit_scale=scale)
    torch.testing.assert_close(dropped["loss"], symile_loss([emb[m][present] for m in names], scale))
    dropped["loss"].backward()
    assert (adapter.missing.grad == 0).all()  # in the graph (DDP needs that), but dropped rows give no gradient
    assert adapter.tower.blocks[0][0].weight.grad.abs().sum() > 0


def _real_item(kind: str, modality):
    """One decoded item of each kind, from real encoded bytes."""
    if kind == "image":
        return modality.decode(_png(draw_shape("circle", (200, 0, 0), 10, (3, 3))), "png")
    if kind == "text":
        return ["a red circle", "a circle"]
    if kind == "audio":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, 0.3 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440).astype(np.float32), 16000, format="WAV")
        return modality.decode(buf.getvalue(), "wav")
    from mmalign.modalities.signals import Signal

    return Signal(np.random.default_rng(0).normal(size=(2, 200)), 50.0)


@pytest.mark.parametrize("kind,section", [
    ("image", {"tower": "small_cnn", "tower_kwargs": {"width": 4, "depth": 1}, "image_size": 8}),
    ("text", None),
    ("audio", {"tower": "mel_cnn", "clip_seconds": 0.5, "n_mels": 16, "tower_kwargs": {"width": 8, "depth": 1}}),
    ("timeseries", {"tower": "resnet1d", "sample_rate": 50, "window_s": 2.0, "channels": 2,
                    "tower_kwargs": {"widths": [8], "depths": [1]}}),
])
@pytest.mark.parametrize("train", [True, False])
def test_every_kind_has_a_placeholder_that_collates_and_embeds(kind, section, train, tiny_text_model):
    section = section or {"tower": "hf", "model": tiny_text_model, "max_length": 12}
    model = AlignmentModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": {
        "x": {"kind": kind, "optional": True, **section}}}))
    model.eval()
    modality = model.modalities["x"]
    real = modality.transform(_real_item(kind, modality), train)
    items = [real, modality.placeholder(train), real]
    present = torch.tensor([True, False, True])
    if isinstance(real, list):  # several captions per sample in evaluation: flattened with owners, as batches are
        owners = torch.tensor([i for i, item in enumerate(items) for _ in item])
        items, present = [x for item in items for x in item], present[owners]
    with torch.no_grad():
        emb = model.encode("x", modality.collate(items), present)
    first, second = emb[present].chunk(2)
    torch.testing.assert_close(first, second)  # the real item embeds the same whatever sits in the other rows
    missing = F.normalize(model.adapters["x"].missing, dim=0)
    torch.testing.assert_close(emb[~present], missing.expand(int((~present).sum()), -1))


def test_clip_objective_uses_rows_where_both_members_of_a_pair_are_present():
    g = torch.Generator().manual_seed(1)
    x, y, z = (F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    present = {"y": torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)}
    garbage = {"x": x, "y": torch.where(present["y"][:, None], y, torch.nan), "z": z}  # absent rows must not matter
    s = torch.tensor(7.0, dtype=torch.float64)
    out = build_loss("clip", ["x", "y", "z"])(AlignmentOutput(garbage, present), logit_scale=s)
    keep = present["y"]
    torch.testing.assert_close(out["loss_x_y"], clip_loss(x[keep], y[keep], s))
    torch.testing.assert_close(out["loss_x_z"], clip_loss(x, z, s))
    torch.testing.assert_close(out["loss_y_z"], clip_loss(y[keep], z[keep], s))
    torch.testing.assert_close(out["loss"], (out["loss_x_y"] + out["loss_x_z"] + out["loss_y_z"]) / 3)
    all_present = build_loss("clip", ["x", "y", "z"])(
        AlignmentOutput({"x": x, "y": y, "z": z}, {"y": torch.ones(8, dtype=torch.bool)}), logit_scale=s)
    plain = build_loss("clip", ["x", "y", "z"])(AlignmentOutput({"x": x, "y": y, "z": z}), logit_scale=s)
    torch.testing.assert_close(all_present["loss"], plain["loss"], rtol=1e-14, atol=0)


PAIRWISE = {
    "dcl": ({"weight_sigma": 0.5}, lambda a, b, s, q: dcl_loss(a, b, s, weight_sigma=0.5)),
    "clip_hard_negatives": ({"beta": 0.3, "tau_plus": 0.05},
                            lambda a, b, s, q: hard_negative_clip_loss(a, b, s, 0.3, tau_plus=0.05)),
    "clip_plus": ({"label_smoothing": 0.1}, lambda a, b, s, q: label_smoothed_clip_loss(a, b, s, 0.1)),
    "cwcl": ({"weights_from": "x"}, lambda a, b, s, q: cwcl_loss(a, b, s, cwcl_weights(q))),
}


@pytest.mark.parametrize("name", sorted(PAIRWISE))
def test_every_pairwise_variant_uses_the_rows_where_both_members_of_a_pair_are_present(name):
    kwargs, loss = PAIRWISE[name]
    g = torch.Generator().manual_seed(2)
    x, y, z = (F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    q = torch.randn(8, 4, generator=g, dtype=torch.float64)  # frozen features of x, for CWCL's soft targets
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    garbage = {"x": x, "y": torch.where(keep[:, None], y, torch.nan), "z": z}  # absent rows must not matter
    s = torch.tensor(7.0, dtype=torch.float64)
    objective = build_loss(name, ["x", "y", "z"], **kwargs, align_weight=0.5, uniform_weight=0.2)
    out = objective(AlignmentOutput(garbage, {"y": keep}, {"x": q}), logit_scale=s)
    torch.testing.assert_close(out["loss_x_y"], loss(x[keep], y[keep], s, q[keep]))
    torch.testing.assert_close(out["loss_x_z"], loss(x, z, s, q))
    torch.testing.assert_close(out["loss_y_z"], loss(y[keep], z[keep], s, q[keep]))
    align = (alignment_loss(x[keep], y[keep]) + alignment_loss(x, z) + alignment_loss(y[keep], z[keep])) / 3
    uniform = (uniformity_loss(x) + uniformity_loss(y[keep]) + uniformity_loss(z)) / 3
    torch.testing.assert_close(out["align"], align)
    torch.testing.assert_close(out["uniform"], uniform)
    pairs = (out["loss_x_y"] + out["loss_x_z"] + out["loss_y_z"]) / 3
    torch.testing.assert_close(out["loss"], pairs + 0.5 * align + 0.2 * uniform)


def test_saved_model_keeps_the_missing_embedding(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    loaded = AlignmentModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.modalities["sketch"].optional and loaded.config.nway_score == "mip"
    assert torch.equal(loaded.adapters["sketch"].missing, model.adapters["sketch"].missing)
    assert loaded.adapters["image"].missing is None


def test_optional_modality_needs_a_loss_that_takes_masks(three_modal, tiny_text_model, tmp_path):
    cfg = load_config(_recipe(tmp_path / "r.yaml", tmp_path / "run", three_modal, tiny_text_model, "siglip", "{}"))
    with pytest.raises(ConfigError, match="takes no presence masks.*clip"):
        build_model(cfg)


@pytest.mark.slow
def test_cli_three_modalities_with_missing_train_and_nway_eval(three_modal, tiny_text_model, tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "run", three_modal, tiny_text_model)
    trained = last_json(run_in_process("train", str(recipe)))
    assert trained["steps"] == 4 and set(trained["skipped"]) == {"missing image"}  # counted in every pass
    assert trained["zeroshot_score"] == "mip" and trained["zeroshot_n"] == N - 1 - len(NO_SKETCH)
    assert 0 <= trained["retrieval_is2t_R@1"] <= 1
    metrics = metrics_rows(tmp_path / "run")
    assert len(metrics) == 4 and all(m["loss"] > 0 for m in metrics)

    out = last_json(run_in_process("eval", "retrieval", "--model", str(tmp_path / "run"), "--data",
                                   three_modal["shards"], "--query", "image,sketch", "--gallery", "text", "--score",
                                   "cosine"))
    assert out["retrieval_score"] == "cosine" and out["retrieval_n"] == N - 1 - len(NO_SKETCH)
    bad = run_in_process("eval", "zeroshot", "--model", str(tmp_path / "run"), "--data", three_modal["shards"],
                         "--classes", str(three_modal["classes"]), "--query", "image,audio", check=False)
    assert bad.returncode == 2 and "no modality 'audio'" in bad.stderr
