"""Retrieval metrics and zero-shot accuracy against hand-computed cases."""
import pytest
import torch
import torch.nn.functional as F

from mmalign.eval import bidirectional_retrieval, retrieval_metrics, zeroshot_accuracy


def test_retrieval_metrics_hand_computed():
    # Gallery items lie on the axes; query 0 ranks gallery [0, 1, 2], query 1 ranks [2, 1, 0].
    gallery = torch.eye(3)
    query = F.normalize(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), dim=-1)
    m = retrieval_metrics(query, gallery, positives=[[1], [1, 0]], ks=(1, 2))
    assert m["R@1"] == 0.0  # neither query has a positive at rank 1
    assert m["R@2"] == 1.0
    # AP query 0: positive at rank 2 -> 1/2. Query 1: positives at ranks 2 and 3 -> (1/2 + 2/3) / 2.
    assert m["mAP"] == pytest.approx((0.5 + (0.5 + 2 / 3) / 2) / 2)


def test_map_at_k_counts_only_top_k():
    gallery = torch.eye(4)
    query = F.normalize(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), dim=-1)
    m = retrieval_metrics(query, gallery, positives=[[3]], ks=(1,), map_at=2)
    assert m["mAP@2"] == 0.0 and m["mAP"] == pytest.approx(0.25)


def test_multi_caption_bidirectional():
    img = torch.eye(2)
    captions = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    out = bidirectional_retrieval(img, F.normalize(captions, dim=-1), torch.tensor([0, 0, 1]), "i", "t")
    assert out["i2t_R@1"] == 1.0 and out["t2i_R@1"] == 1.0
    assert out["i2t_mAP"] == pytest.approx(1.0)


def test_zeroshot_accuracy():
    classifier = torch.eye(3)  # D x C
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.4, 0.6], [0.6, 0.4, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    acc = zeroshot_accuracy(feats, classifier, labels, topk=(1, 2))
    assert acc["acc1"] == pytest.approx(2 / 4)
    assert acc["acc2"] == pytest.approx(3 / 4)
    assert acc["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
