"""GRAM as in its code: the data-anchor matching (DAM) term with volume-sampled hard negatives, the learned
temperature, and a run that trains both and re-ranks with the matching head from the CLI."""
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.build import build
from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.heads import MatchingHead
from mmalign.losses import AlignmentOutput, build_loss, gram_loss, gram_volume
from mmalign.losses.multimodal import dam_rows_loss, volume_hard_negatives
from mmalign.model import AlignmentModel
from tests.conftest import last_json, run_in_process, write_shard


def _feats(m, B=6, D=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_(grad)
            for _ in range(m)]


def test_hard_negatives_are_never_the_own_sample_and_follow_the_volume():
    # own volume smallest, one hard negative per row/column, the rest far: at s = 20 the hard one carries ~all mass
    hard = [2, 0, 3, 1]
    volumes = torch.ones(4, 4)
    volumes.fill_diagonal_(0.1)
    volumes[torch.arange(4), torch.tensor(hard)] = 0.2
    g = torch.Generator().manual_seed(0)
    tuple_of, anchor_of = volume_hard_negatives(volumes, 20.0, g)
    assert tuple_of.tolist() == hard  # anchor i's hardest other tuple
    assert anchor_of.tolist() == [1, 3, 0, 2]  # tuple j's hardest other anchor (column j)
    # at s = 0 every other sample is as likely: over many draws each appears, the own one never
    draws = torch.stack([volume_hard_negatives(volumes, 0.0, g)[0] for _ in range(200)])
    for i in range(4):
        assert set(draws[:, i].tolist()) == set(range(4)) - {i}


def test_dam_loss_is_cross_entropy_over_the_positive_and_two_negatives():
    torch.manual_seed(0)
    head = MatchingHead(5, 3, hidden=7).double()
    t, v, a = _feats(3)
    neg_tuple, neg_anchor = torch.tensor([1, 2, 0, 4, 5, 3]), torch.tensor([2, 0, 1, 5, 3, 4])
    loss = dam_rows_loss(head, [t, v, a], [t, v, a], neg_tuple, neg_anchor)
    terms = []
    for i in range(6):
        for (x, y, z), label in (((t[i], v[i], a[i]), 1), ((t[i], v[neg_tuple[i]], a[neg_tuple[i]]), 0),
                                 ((t[neg_anchor[i]], v[i], a[i]), 0)):
            logits = head([x[None], y[None], z[None]])[0]
            terms.append(-torch.log_softmax(logits, 0)[label])
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)
    total = dam_rows_loss(head, [t, v, a], [t, v, a], neg_tuple, neg_anchor, reduction="sum")
    torch.testing.assert_close(total / 6, loss, rtol=1e-12, atol=1e-12)  # sum / B = mean over 3B pairs


def test_gram_with_itm_ratio_adds_the_weighted_dam_term_and_trains_the_head():
    torch.manual_seed(0)
    head = MatchingHead(5, 3).double()
    feats = _feats(3, grad=True)
    s = torch.tensor(8.0, dtype=torch.float64)
    objective = build_loss("gram", ["text", "video", "audio"], label_smoothing=0.1, itm_ratio=0.1, seed=4)
    assert objective.requirements.matching == ("text", "video", "audio")
    out = objective(AlignmentOutput(dict(zip(["text", "video", "audio"], feats)), matching=head), logit_scale=s)
    torch.testing.assert_close(out["loss_volume"], gram_loss(feats, s, 0.1), rtol=1e-12, atol=1e-12)
    neg_tuple, neg_anchor = volume_hard_negatives(gram_volume(feats[0], feats[1:]).detach(), s,
                                                  torch.Generator().manual_seed(4))
    dam = dam_rows_loss(head, feats, feats, neg_tuple, neg_anchor)
    torch.testing.assert_close(out["loss_dam"], 0.1 * dam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["loss"], out["loss_volume"] + out["loss_dam"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    plain = build_loss("gram", ["text", "video", "audio"])
    assert plain.requirements.matching == () and "loss_dam" not in plain(AlignmentOutput(
        dict(zip(["text", "video", "audio"], feats))), logit_scale=s)
    with pytest.raises(ConfigError, match="needs the model's matching head"):
        objective(AlignmentOutput(dict(zip(["text", "video", "audio"], feats))), logit_scale=s)
    with pytest.raises(ConfigError, match="itm_ratio must be >= 0"):
        build_loss("gram", ["text", "video"], itm_ratio=-1)


FEATURES = {"kind": "timeseries", "tower": "flatten", "channels": 4, "sample_rate": 1, "window_s": 1,
            "standardize": False}


def _recipe(tmp_path, shards, loss: dict, logit_scale: dict | None = None, **extra) -> dict:
    return {"run_dir": str(tmp_path / "run"), "seed": 3, "loss": loss,
            "model": {"embed_dim": 8, "logit_scale": logit_scale or {},
                      "modalities": {"text": dict(FEATURES), "video": dict(FEATURES), "audio": dict(FEATURES)}},
            "data": {"train": shards, "batch_size": 8, "shuffle_buffer": 1, "num_workers": 0},
            "train": {"steps": 4, "lr": 0.01, "warmup_steps": 1, "checkpoint_every": 100, "log_every": 1}, **extra}


def test_the_model_gets_a_matching_head_in_the_objectives_order(tmp_path):
    gram = {"name": "gram", "kwargs": {"itm_ratio": 0.1}}
    cfg, model, objective = build(load_config(base=_recipe(tmp_path, "x.tar", gram, {"learn": "temperature"})))
    assert cfg.model.matching.modalities == ["text", "video", "audio"] == objective.modalities
    assert isinstance(model.matching, MatchingHead) and objective.seed == 3  # the run's seed
    # GRAM's temperature: tau itself is the parameter, initialised at 0.07
    assert model.temperature.item() == pytest.approx(0.07) and not hasattr(model, "log_logit_scale")
    assert model.logit_scale().item() == pytest.approx(1 / 0.07)
    model.save_pretrained(tmp_path / "saved")
    loaded = AlignmentModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(loaded.matching.mlp[0].weight, model.matching.mlp[0].weight)
    assert loaded.temperature.item() == pytest.approx(0.07)

    with pytest.raises(ConfigError, match="trained by a loss with a matching term"):
        build(load_config(base=_recipe(tmp_path, "x.tar", {"name": "clip"}), overrides=["model.matching.hidden=4"]))


def _npy(vector) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float32).reshape(-1, 1))
    return buf.getvalue()


@pytest.mark.slow
def test_cli_trains_gram_with_dam_and_a_learned_temperature_then_reranks(tmp_path):
    """Three noisy views of one latent per sample; GRAM with DAM trains (both terms logged, the temperature moves),
    and ``mmalign eval retrieval --rerank`` reports the re-ranked text -> (video, audio) ranking."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(48):
        latent = rng.normal(size=4)
        sample = {"__key__": f"s{i:03d}", "label.txt": str(i % 3)}
        for m in ("text", "video", "audio"):
            sample[f"{m}.npy"] = _npy(latent + 0.3 * rng.normal(size=4))
            sample[f"{m}.json"] = json.dumps({"sampling_rate": 1})
        samples.append(sample)
    shards = write_shard(tmp_path / "data.tar", samples)
    recipe = _recipe(tmp_path, shards, {"name": "gram", "kwargs": {"label_smoothing": 0.1, "itm_ratio": 0.1}},
                     {"learn": "temperature"}, eval={"batch_size": 16, "retrieval": {
                         "data": shards, "query": "text", "gallery": "video,audio", "rerank": 5}})
    path = tmp_path / "gram.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    result = last_json(run_in_process("train", str(path)))
    assert math.isfinite(result["final_loss_dam"]) and result["final_loss_dam"] > 0
    assert result["final_loss"] == pytest.approx(result["final_loss_volume"] + result["final_loss_dam"], rel=1e-5)
    assert result["final_logit_scale"] != pytest.approx(1 / 0.07)  # the temperature is learned
    assert {"retrieval_t2va_R@1", "retrieval_t2va_rerank_R@1"} <= set(result)

    out = last_json(run_in_process("eval", "retrieval", "--model", result["run_dir"], "--data", shards, "--query",
                                   "text", "--gallery", "video,audio", "--rerank", "5"))
    assert out["retrieval_t2va_R@1"] == result["retrieval_t2va_R@1"]
    assert out["retrieval_t2va_rerank_R@1"] == result["retrieval_t2va_rerank_R@1"]
    assert out["retrieval_score"] == "volume" and out["retrieval_rerank_k"] == 5
