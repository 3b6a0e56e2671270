"""The loop with CWCL (frozen-tower features passed to the loss), fixed/scheduled temperature, run diagnostics."""
import json

import pytest
import torch

from conftest import tiny_recipe
from mmalign.config import load_config
from mmalign.data.shards import write_shards
from mmalign.losses import scheduled_logit_scale
from mmalign.model import AlignmentModel
from mmalign.train import train

DIAGNOSTICS = ("modality_gap_image_text", "alignment_image_text", "uniformity_image", "uniformity_text")


@pytest.fixture(scope="module")
def shards(shapes_dataset, tmp_path_factory) -> str:
    return write_shards(shapes_dataset["csv"], tmp_path_factory.mktemp("shards"), shard_size=24)["shards"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _locked_text_model(text_model: str) -> AlignmentModel:
    cfg = load_config(None, ["run_dir=unused", "data.train=unused", "model.embed_dim=8",
                             "model.modalities.image={tower: small_cnn, tower_kwargs: {width: 4, depth: 1}}",
                             f"model.modalities.text={{model: '{text_model}', lock: true, cache_frozen: true}}"])
    return AlignmentModel(cfg.model)


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_forward_returns_tower_features_from_the_same_pass(tiny_text_model):
    torch.manual_seed(0)
    model = _locked_text_model(tiny_text_model)
    calls = _count_calls(model.adapters["text"].tower)
    captions = ["a caption only this test uses", "another one", "a caption only this test uses"]
    batch = {"image": torch.randn(3, 3, 16, 16), "text": model.modalities["text"].tokenize(captions)}
    out = model(batch, features=["text"])
    embeddings, features = out.embeddings, out.frozen_features
    assert set(features) == {"text"} and features["text"].shape == (3, 32)
    assert not features["text"].requires_grad  # locked tower: computed without gradient
    assert len(calls) == 1  # one tower pass for both outputs (and the repeated caption came from the cache)
    expected = torch.nn.functional.normalize(model.adapters["text"].proj(features["text"]), dim=-1)
    torch.testing.assert_close(embeddings["text"], expected)
    torch.testing.assert_close(model(batch).embeddings["image"], embeddings["image"])


def test_frozen_cache_is_shared_by_identical_towers_only(tiny_text_model):
    first, same, changed = (_locked_text_model(tiny_text_model) for _ in range(3))
    with torch.no_grad():
        changed.adapters["text"].tower.model.embeddings.word_embeddings.weight.mul_(2.0)
    tokens = first.modalities["text"].tokenize(["shared between runs", "of the same frozen tower"])
    expected = first.adapters["text"].tower_features(tokens)
    calls = {name: _count_calls(m.adapters["text"].tower) for name, m in (("same", same), ("changed", changed))}
    torch.testing.assert_close(same.adapters["text"].tower_features(tokens), expected)
    assert not torch.allclose(changed.adapters["text"].tower_features(tokens), expected)
    assert calls == {"same": [], "changed": [1]}


@pytest.mark.slow
def test_cwcl_training_with_fixed_temperature_writes_diagnostics(tmp_path, shards, shapes_dataset, tiny_text_model):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", run_dir, shards, tiny_text_model, shapes_dataset["classes"],
                         shapes_dataset["templates"], extra="loss: {name: cwcl, kwargs: {weights_from: text}}\n")
    cfg = load_config(recipe, ["model.modalities.text.lock=true", "model.modalities.text.cache_frozen=true",
                               "model.logit_scale.learnable=false", "model.logit_scale.init=20"])
    results = train(cfg)

    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["logit_scale"] == pytest.approx(20.0) for r in rows)  # fixed: the init, never learned
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = json.loads((run_dir / "results.json").read_text())
    for key in DIAGNOSTICS:
        assert key in saved and key in results
    assert 0.0 <= saved["modality_gap_image_text"] <= 2.0
    assert 0.0 <= saved["alignment_image_text"] <= 4.0
    assert saved["uniformity_image"] <= 0.0 and saved["uniformity_text"] <= 0.0
    assert saved["diagnostics_n"] == 48  # the eval shards: every sample, one row each
    png = run_dir / "embedding_pca.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "embedding_pca.png" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_scheduled_temperature_is_what_the_loss_used(tmp_path, shards, tiny_text_model):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", run_dir, shards, tiny_text_model)
    cfg = load_config(recipe, ["model.logit_scale.schedule={tau_start: 0.1, tau_end: 0.02, kind: linear}",
                               "eval.diagnostics.max_samples=20"])
    results = train(cfg)

    rows = _metrics(run_dir)
    # Logged at the end of step k (1-based): the scale of step index k - 1, 1 / tau linear from 0.1 to 0.02.
    expected = [scheduled_logit_scale(k - 1, 6, 0.1, 0.02, "linear") for k in range(1, 7)]
    assert [r["logit_scale"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(10.0) and expected[-1] == pytest.approx(30.0)  # tau(5/6) = 1/30
    model = AlignmentModel.from_pretrained(run_dir / "model")
    assert not model.log_logit_scale.requires_grad  # the saved config keeps the schedule: not a learned scale
    # No eval data: the diagnostics come from the first training samples.
    assert results["diagnostics_n"] == 20 and all(k in results for k in DIAGNOSTICS)
    assert (run_dir / "embedding_pca.png").is_file()


@pytest.mark.slow
def test_cwcl_with_gradcache_gets_frozen_features_and_the_schedule(tmp_path, shards, tiny_text_model):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", run_dir, shards, tiny_text_model,
                         extra="loss: {name: cwcl, kwargs: {weights_from: text}}\n")
    cfg = load_config(recipe, ["model.modalities.text.lock=true", "train.gradcache_chunk=4", "train.steps=2",
                               "model.logit_scale.schedule={tau_start: 0.05, tau_end: 0.05, kind: constant}",
                               "eval.diagnostics.max_samples=8"])
    results = train(cfg)
    rows = _metrics(run_dir)
    assert [r["logit_scale"] for r in rows] == pytest.approx([20.0, 20.0])
    assert all(0 < r["cwcl_positive_mass"] <= 1 for r in rows)
    assert results["final_cwcl_positive_mass"] == rows[-1]["cwcl_positive_mass"]
