"""Retrieval in both directions for any pair of modalities, several positives on either side, label positives, and
the count of items several samples share."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.config import ModelConfig, from_dict
from mmalign.demo_data.common import write_samples
from mmalign.eval import bidirectional_retrieval, retrieval_metrics
from mmalign.eval.embed import embed_shards
from mmalign.eval.retrieval import shared_items
from mmalign.eval.runner import evaluate_retrieval
from mmalign.model import AlignmentModel
from mmalign.modalities.signals import Signal, encode_signal


def test_several_positives_on_both_sides():
    """Samples 0 and 1 have two items each on side a and one or two on side b: each row's positives are the rows
    of its own sample on the other side, whichever side queries."""
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1)
    b = F.normalize(torch.tensor([[0.1, 0.9], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    a_owner, b_owner = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 1])
    out = bidirectional_retrieval(a, b, b_owner, "a", "b", ks=(1,), map_at=None, a_owner=a_owner)
    assert out["a2b_R@1"] == 1.0 and out["b2a_R@1"] == 1.0
    # a -> b by hand: rows 0 and 1 have one positive (b1), rows 2 and 3 two (b0, b2) ranked first and second.
    expected = retrieval_metrics(a, b, [[1], [1], [0, 2], [0, 2]], ks=(1,))
    assert out["a2b_mAP"] == pytest.approx(expected["mAP"])
    # Group ids other than samples: labels make every same-class item a positive.
    swapped = bidirectional_retrieval(a, b, torch.tensor([0, 0, 1]), "a", "b", ks=(1,), a_owner=a_owner)
    assert swapped["b2a_R@1"] == pytest.approx(2 / 3)  # b0 (group 0) finds a2/a3 (group 1) first


def test_shared_items_counts_distinct_embeddings_across_samples():
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1e-5], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    samples = torch.tensor([0, 1, 2, 2, 3])  # rows 0/1 (samples 0, 1) and 2/4 (samples 2, 3) embed alike
    assert shared_items(x, samples) == (3, 4)
    assert shared_items(x[[0, 2, 3]], torch.tensor([0, 1, 1])) == (3, 0)


@pytest.fixture(scope="module")
def audio_ecg(tmp_path_factory):
    """Pairs of a tone (audio) and a 2-lead signal (ECG) whose frequencies follow the sample's class."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("audio-ecg")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        label = ("slow", "fast", "mid")[i % 3]
        f = {"slow": 1.0, "mid": 2.0, "fast": 3.0}[label]
        wav = io.BytesIO()
        t = np.arange(8000) / 16000
        sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * f * t) + 0.01 * rng.normal(size=t.size)).astype(np.float32),
                 16000, format="WAV")
        ecg = np.stack([np.sin(2 * np.pi * f * np.arange(200) / 50 + p) for p in (0, 1)]) + 0.05 * rng.normal(
            size=(2, 200))
        members = encode_signal(Signal(ecg, 50.0))
        samples.append({"__key__": f"s{i:03d}", "audio.wav": wav.getvalue(), "ecg.npy": members["npy"],
                        "ecg.json": members["json"], "label.txt": label.encode()})
    shards = write_samples(samples, root, "pairs", 5)
    torch.manual_seed(0)
    model = AlignmentModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": {
        "audio": {"tower": "mel_cnn", "clip_seconds": 0.5, "n_mels": 16, "tower_kwargs": {"width": 8, "depth": 1}},
        "ecg": {"kind": "timeseries", "tower": "resnet1d", "sample_rate": 50, "window_s": 2.0, "channels": 2,
                "tower_kwargs": {"widths": [8], "depths": [1]}}}}))
    return model, shards


@pytest.mark.parametrize("query, gallery", [("audio", "ecg"), ("ecg", "audio")])
def test_audio_ecg_retrieval_both_ways_with_sample_and_label_positives(audio_ecg, query, gallery):
    model, shards = audio_ecg
    emb = embed_shards(model, shards, [query, gallery], batch_size=5)
    q, g = emb["embeddings"][query], emb["embeddings"][gallery]
    labels = emb["labels"]
    own = retrieval_metrics(q, g, [[i] for i in range(12)], ks=(1, 5, 10), map_at=10)
    back = retrieval_metrics(g, q, [[i] for i in range(12)], ks=(1, 5, 10), map_at=10)
    same_label = [[j for j in range(12) if labels[j] == labels[i]] for i in range(12)]
    by_label = retrieval_metrics(q, g, same_label, ks=(1, 5, 10), map_at=10)

    out = evaluate_retrieval(model, shards, query, gallery, batch_size=5)
    a, b = query[0], gallery[0]
    assert out["retrieval_n"] == 12 and out["retrieval_positives"] == "sample"
    for k in ("R@1", "R@5", "mAP", "mAP@10"):
        assert out[f"retrieval_{a}2{b}_{k}"] == pytest.approx(own[k])
        assert out[f"retrieval_{b}2{a}_{k}"] == pytest.approx(back[k])
    labelled = evaluate_retrieval(model, shards, query, gallery, batch_size=5, positives="label")
    assert labelled["retrieval_positives"] == "label"
    for k in ("R@1", "R@5", "mAP"):
        assert labelled[f"retrieval_{a}2{b}_{k}"] == pytest.approx(by_label[k])
    assert labelled[f"retrieval_{a}2{b}_R@5"] >= out[f"retrieval_{a}2{b}_R@5"]
