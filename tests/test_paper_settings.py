"""The papers' settings as options: per-modality output normalisation (Symile's LayerNorm), an uncapped logit scale,
GRAM's learned temperature, Symile's defaults (missing: learned, draws seeded by the run), and the presets."""
import math

import pytest
import torch

from mmalign import recipes
from mmalign.build import build, build_objective
from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.export import export_model
from mmalign.losses import AlignmentOutput, build_loss, symile_loss
from mmalign.model import MIN_TEMPERATURE

FEATURES = {"kind": "timeseries", "tower": "flatten", "channels": 4, "sample_rate": 1, "window_s": 1,
            "standardize": False}


def _cfg(tmp_path, modalities: dict | None = None, overrides=(), loss=None):
    base = {"run_dir": str(tmp_path / "run"), "data": {"train": "x.tar"}, "loss": loss or {"name": "symile"},
            "model": {"embed_dim": 6, "modalities": modalities or {m: dict(FEATURES) for m in ("a", "b", "c")}}}
    return load_config(base=base, overrides=list(overrides))


def _signals(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"signal": torch.randn(n, 4, 1, generator=g), "mask": torch.ones(n, 4, dtype=torch.bool)}


def test_output_norm_l2_layernorm_or_none(tmp_path):
    modalities = {"a": dict(FEATURES), "b": {**FEATURES, "output_norm": "layernorm", "optional": True},
                  "c": {**FEATURES, "output_norm": "none"}}
    _, model, _ = build(_cfg(tmp_path, modalities))
    x = _signals(5)
    a, b, c = (model.encode(m, x) for m in "abc")
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    # LayerNorm (at init: zero mean, unit variance per row), as Symile's real-data encoders end
    torch.testing.assert_close(b.mean(dim=-1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.var(dim=-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert not torch.allclose(b.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(c, model.adapters["c"].proj(x["signal"].flatten(1)))  # as projected
    # an absent item's learned missing embedding goes through the same LayerNorm
    absent = model.encode("b", x, torch.tensor([True, False, True, True, False]))
    adapter = model.adapters["b"]
    torch.testing.assert_close(absent[1], adapter.layer_norm(adapter.missing[None])[0])
    with pytest.raises(ConfigError, match="output_norm must be one of l2, layernorm, none"):
        _cfg(tmp_path, overrides=["model.modalities.a.output_norm=batchnorm"])
    with pytest.raises(ConfigError, match="unit-length embeddings; modality 'b' has output_norm 'layernorm'"):
        export_model(model, tmp_path / "export")


def test_logit_scale_uncapped_or_capped_and_learned_as_temperature(tmp_path):
    _, capped, _ = build(_cfg(tmp_path))
    _, uncapped, _ = build(_cfg(tmp_path, overrides=["model.logit_scale.max=null"]))
    for model in (capped, uncapped):
        with torch.no_grad():
            model.log_logit_scale.fill_(math.log(500.0))
        model.clamp_logit_scale_()
    assert capped.logit_scale().item() == pytest.approx(100.0) and uncapped.logit_scale().item() == pytest.approx(500.0)

    _, tau, _ = build(_cfg(tmp_path, overrides=["model.logit_scale={learn: temperature, init: 20.0}"]))
    assert tau.temperature.item() == pytest.approx(0.05) and tau.temperature.requires_grad
    (tau.logit_scale() * 2).backward()
    assert tau.temperature.grad.item() == pytest.approx(-2 / 0.05**2)  # d(2 / tau) / d tau
    with torch.no_grad():
        tau.temperature.fill_(-1.0)
    tau.clamp_logit_scale_()
    assert tau.temperature.item() == pytest.approx(0.01)  # 1 / max
    _, free, _ = build(_cfg(tmp_path, overrides=["model.logit_scale={learn: temperature, max: null}"]))
    with torch.no_grad():
        free.temperature.fill_(0.0)
    free.clamp_logit_scale_()
    assert free.temperature.item() == pytest.approx(MIN_TEMPERATURE)
    with pytest.raises(ConfigError, match="learn must be one of log_scale, temperature"):
        _cfg(tmp_path, overrides=["model.logit_scale.learn=tau"])


def test_symile_defaults_to_learned_missing_embeddings_and_the_runs_seed(tmp_path):
    objective = build_loss("symile", ["a", "b", "c"])
    assert objective.missing == "learned"
    g = torch.Generator().manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1) for _ in range(3)]
    present = {"b": torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)}
    # every row takes part (absent rows hold the missing embedding), not only the complete ones
    out = objective(AlignmentOutput(dict(zip("abc", feats)), present), logit_scale=5.0)
    torch.testing.assert_close(out["loss"], symile_loss(feats, 5.0))
    assert build_objective(load_config(recipes.resource("symile.yaml"))).missing == "learned"

    n = build_objective(_cfg(tmp_path, overrides=["seed=7"], loss={"name": "symile", "kwargs": {"negatives": "n"}}))
    torch.testing.assert_close(n.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    explicit = build_objective(_cfg(tmp_path, overrides=["seed=7"],
                                    loss={"name": "symile", "kwargs": {"negatives": "n", "seed": 2}}))
    torch.testing.assert_close(explicit.generator.get_state(), torch.Generator().manual_seed(2).get_state())


def test_presets_carry_the_papers_settings():
    gram = recipes.load("gram")
    assert gram.loss.kwargs == {"anchor": "text", "label_smoothing": 0.1, "itm_ratio": 0.1}
    assert gram.model.logit_scale.learn == "temperature" and gram.model.logit_scale.init is None  # tau = 0.07
    assert gram.train.weight_decay == 0.01 and gram.train.grad_clip == 2.0
    assert gram.eval.retrieval.gallery == "image,glyph" and gram.eval.retrieval.rerank

    symile = recipes.load("symile")
    assert {m.output_norm for m in symile.model.modalities.values()} == {"layernorm"}
    assert symile.model.logit_scale.max is None and symile.model.logit_scale.learn == "log_scale"
    assert symile.train.weight_decay == 0.01 and symile.loss.kwargs.get("missing", "learned") == "learned"
    assert symile.eval.retrieval.match == "label"
