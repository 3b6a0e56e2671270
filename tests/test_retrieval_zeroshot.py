"""Retrieval metrics and zero-shot accuracy against hand-computed cases; embedding shards with workers."""
import os

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


@pytest.mark.slow
def test_workers_embed_every_sample_as_the_main_process_does(tmp_path, tiny_text_model):
    """``embed_shards`` with its default DataLoader workers (one per shard, as the CPUs allow) gives each sample
    the embeddings it gets without workers, in batches of other samples."""
    from conftest import shape_sample, tiny_recipe, write_shard
    from mmalign.build import build_model
    from mmalign.config import load_config
    from mmalign.eval.embed import embed_shards, eval_workers

    for s in range(3):
        write_shard(tmp_path / f"val-{s}.tar", [shape_sample(i) for i in range(10 * s, 10 * s + 7 + s)])
    data = str(tmp_path / "val-{0..2}.tar")
    model = build_model(load_config(tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", data, tiny_text_model)))
    by_key = {}
    for workers in (0, None):
        emb = embed_shards(model, data, ["image", "text"], batch_size=4, num_workers=workers)
        assert emb["samples_per_s"] > 0 and sorted(emb["labels"]) == sorted(shape_sample(i)["label.txt"] for i in
                                                                             [*range(7), *range(10, 18), *range(20, 29)])
        by_key[workers] = {k: (emb["embeddings"]["image"][i], emb["embeddings"]["text"][i])
                           for i, k in enumerate(emb["keys"])}
    assert eval_workers(3) == min(3, 4, len(os.sched_getaffinity(0)))
    assert by_key[None].keys() == by_key[0].keys() and len(by_key[0]) == 24
    for key, (image, text) in by_key[0].items():
        torch.testing.assert_close(by_key[None][key][0], image, msg=key)
        torch.testing.assert_close(by_key[None][key][1], text, msg=key)
