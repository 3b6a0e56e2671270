"""N-way evaluation protocols: hits by label (Symile-M3), per-query candidate sets (Symile-MIMIC), an item ranking
tuples (GRAM's text -> (video, audio)), and re-ranking the top k with a matching head (GRAM's DAM).

The end-to-end cases run ``mmalign eval retrieval`` on a saved model whose embeddings are the data: three feature
modalities a, b, c (2-d vectors stored as records, ``flatten`` tower, ``proj: none``), so every R@1 below is worked
out by hand from the vectors in ``VECTORS``.
"""
import io
import json

import numpy as np
import pytest
import torch

from mmalign.config import ModelConfig, from_dict
from mmalign.errors import ConfigError, DataError
from mmalign.eval.candidates import read_candidates
from mmalign.eval.protocols import Side, score_function
from mmalign.eval.retrieval import match_positives, rerank_top_k, restrict_to
from mmalign.eval.runner import evaluate_retrieval
from mmalign.eval.zeroshot import zeroshot_classifier
from mmalign.model import AlignmentModel
from tests.conftest import last_json, run_in_process, write_shard

# Unit vectors per sample s0..s3 and modality; labels cat, cat, dog, dog.
VECTORS = {
    "a": [(1, 0), (0.6, 0.8), (0, 1), (-1, 0)],
    "b": [(0.8, 0.6), (1, 0), (0, 1), (0.6, -0.8)],
    "c": [(1, 0), (0.6, 0.8), (0.28, 0.96), (-1, 0)],
}
LABELS = ["cat", "cat", "dog", "dog"]
FEATURES = {"kind": "timeseries", "tower": "flatten", "channels": 2, "sample_rate": 1, "window_s": 1,
            "standardize": False, "proj": "none"}


def _npy(vector) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(vector, dtype=np.float32).reshape(2, 1))
    return buf.getvalue()


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict:
    """Shards of the four samples and a saved model (Symile's MIP as its N-way score) with a hand-set matching head
    over (c, a, b): P(match) is high when the tuple's a_y > 0.5, low otherwise."""
    root = tmp_path_factory.mktemp("features")
    samples = []
    for i, label in enumerate(LABELS):
        sample = {"__key__": f"s{i}", "label.txt": label}
        for m, vectors in VECTORS.items():
            sample[f"{m}.npy"] = _npy(vectors[i])
            sample[f"{m}.json"] = json.dumps({"sampling_rate": 1})
        samples.append(sample)
    shards = write_shard(root / "data.tar", samples)
    config = from_dict(ModelConfig, {"embed_dim": 2, "nway_score": "mip", "modalities": {m: dict(FEATURES) for m in "abc"},
                                     "matching": {"modalities": ["c", "a", "b"], "hidden": 2}})
    model = AlignmentModel(config)
    with torch.no_grad():  # hidden unit 0 = a_y - 0.5, unit 1 = 0; LayerNorm turns them into +-1; match logit 5 x unit 0
        first, last = model.matching.mlp[0], model.matching.mlp[3]
        first.weight.zero_()
        first.weight[0, 3] = 1.0  # inputs: c_x c_y a_x a_y b_x b_y
        first.bias.copy_(torch.tensor([-0.5, 0.0]))
        last.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0]]))
        last.bias.zero_()
    model.save_pretrained(root / "model")
    return {"root": root, "shards": shards, "model": str(root / "model")}


def _eval(features, *args) -> dict:
    return last_json(run_in_process("eval", "retrieval", "--model", features["model"], "--data", features["shards"],
                                    *args))


def _evaluate(features, query, gallery, **kwargs) -> dict:
    """The same evaluation in this process (the CLI's cost is its start-up)."""
    return evaluate_retrieval(AlignmentModel.from_pretrained(features["model"]), features["shards"], query, gallery,
                              **kwargs)


@pytest.mark.slow
def test_match_label_counts_an_item_with_the_query_label(features):
    """a -> b by cosine. a_i . b_j rows: s0 [.8, 1, 0, .6], s1 [.96, .6, .8, -.28], s2 [.6, 0, 1, -.8],
    s3 [-.8, -1, 0, -.6]: top items s1, s0, s2, s2, so only s2 finds its own b (R@1 1/4), while every top item has
    the query's label (R@1 4/4). b -> a (columns): tops a1, a0, a2, a0: own 1/4; label: all but s3 (dog -> cat), 3/4."""
    item = _evaluate(features, "a", "b")
    assert item["retrieval_a2b_R@1"] == 0.25 and item["retrieval_b2a_R@1"] == 0.25
    label = _eval(features, "--query", "a", "--gallery", "b", "--match", "label")
    assert label["retrieval_a2b_R@1"] == 1.0 and label["retrieval_b2a_R@1"] == 0.75
    assert label["retrieval_match"] == "label" and item["retrieval_match"] == "item"


@pytest.mark.slow
def test_candidates_file_ranks_each_query_among_its_own_candidates(features):
    """(a, b) -> c by MIP, (a * b) . c: the tuples a * b are s0 (.8, 0), s1 (.6, 0), s2 (0, 1), s3 (-.6, 0).
    Against all of c: s1's tuple scores c0 (.6) above its own c1 (.36), the others find theirs: R@1 3/4.
    Candidates s0: [s0, s1] -> .8 vs .48, hit; s1: [s1, s0] -> .36 vs .6, miss; s3: [s3, s2] -> .6 vs 0, hit:
    R@1 2/3 over the 3 listed queries."""
    path = features["root"] / "candidates.jsonl"
    path.write_text('{"query": "s0", "candidates": ["s0", "s1"]}\n{"query": "s1", "candidates": ["s1", "s0"]}\n\n'
                    '{"query": "s3", "candidates": ["s3", "s2"]}\n')
    full = _evaluate(features, "a,b", "c")
    assert full["retrieval_ab2c_R@1"] == 0.75 and full["retrieval_n"] == 4
    listed = _eval(features, "--query", "a,b", "--gallery", "c", "--candidates", str(path))
    assert listed["retrieval_ab2c_R@1"] == pytest.approx(2 / 3) and listed["retrieval_n"] == 3
    assert listed["retrieval_candidates"] == str(path) and listed["retrieval_score"] == "mip"


@pytest.mark.slow
def test_an_item_ranks_tuples_and_a_matching_head_reranks_the_top_k(features):
    """c -> (a, b) by MIP: c0 [.8, .6, 0, -.6] -> s0 hit; c1 [.48, .36, .8, -.36] -> s2 miss; c2 [.224, .168, .96,
    -.168] -> s2 hit; c3 [-.8, -.6, 0, .6] -> s3 hit: R@1 3/4 (label: c1's top s2 is a dog, still 3/4).
    Re-ranking the top 2 by the head (a_y > 0.5 -> match: s1, s2 yes; s0, s3 no): c0 {s0, s1} -> s1 miss;
    c1 {s2, s0} -> s2 miss; c2 {s2, s0} -> s2 hit; c3 {s3, s2} -> s2 miss: R@1 1/4. The top 1 alone re-ranks nothing."""
    out = _eval(features, "--query", "c", "--gallery", "a,b", "--rerank", "2")
    assert out["retrieval_c2ab_R@1"] == 0.75 and out["retrieval_c2ab_rerank_R@1"] == 0.25
    assert out["retrieval_c2ab_R@5"] == out["retrieval_c2ab_rerank_R@5"] == 1.0 and out["retrieval_rerank_k"] == 2
    assert "retrieval_ab2c_R@1" not in out  # one direction: the item ranks tuples
    label = _evaluate(features, "c", "a,b", match="label", rerank=1)
    assert label["retrieval_c2ab_R@1"] == label["retrieval_c2ab_rerank_R@1"] == 0.75


@pytest.mark.slow
def test_protocol_mistakes_are_one_line_errors(features):
    bad = features["root"] / "bad.jsonl"
    bad.write_text('{"query": "s0", "candidates": ["s0", "s9"]}\n')
    proc = run_in_process("eval", "retrieval", "--model", features["model"], "--data", features["shards"],
                          "--query", "a", "--gallery", "b", "--candidates", str(bad), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "bad.jsonl:1: candidate 's9' of query 's0' is not a sample key" in proc.stderr.strip().splitlines()[-1]

    no_hit = features["root"] / "no_hit.jsonl"
    no_hit.write_text('{"query": "s0", "candidates": ["s1"]}\n')
    with pytest.raises(DataError, match="no candidate of query 's0' is its own sample"):
        _evaluate(features, "a", "b", candidates=str(no_hit))
    dogs = features["root"] / "dogs.jsonl"
    dogs.write_text('{"query": "s0", "candidates": ["s2", "s3"]}\n')  # s0 is a cat
    with pytest.raises(DataError, match="no candidate of query 's0' has its label"):
        _evaluate(features, "a", "b", candidates=str(dogs), match="label")
    with pytest.raises(ConfigError, match=r"the matching head scores \(c, a, b\) tuples"):
        _evaluate(features, "a", "b", rerank=3)


def test_two_tuples_have_no_score():
    side = Side(["a", "b"], {"a": torch.eye(2), "b": torch.eye(2)}, torch.arange(2))
    with pytest.raises(ConfigError, match="one side must be a single modality"):
        score_function(side, side, "mip")


def test_match_positives_by_sample_and_by_label():
    query, gallery = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 2, 2])  # two captions for samples 0 and 2
    assert match_positives(query, gallery) == [[0, 1], [2], [3, 4]]
    assert match_positives(query, gallery, ["x", "y", "x"]) == [[0, 1, 3, 4], [2], [0, 1, 3, 4]]


def test_restrict_and_rerank_order_only_the_candidates_and_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    restricted = restrict_to(scores, [torch.tensor([1, 3]), torch.tensor([0])])
    assert restricted[0].isinf().tolist() == [True, False, True, False] and restricted[1, 0] == 0.1
    flip = rerank_top_k(scores, 2, lambda top: torch.tensor([[0.1, 0.9], [0.2, 0.3]]))
    assert flip[0].argsort(descending=True).tolist() == [1, 0, 2, 3]  # top 2 swapped, the rest as before
    assert flip[1].argsort(descending=True).tolist() == [2, 3, 1, 0]
    # a re-ranked top k never pulls in a non-candidate, and non-candidates stay last
    mixed = rerank_top_k(restricted, 3, lambda top: torch.ones(top.shape))
    assert mixed[0].argsort(descending=True)[:2].tolist() in ([1, 3], [3, 1]) and mixed[0].isinf().sum() == 2


def test_candidates_file_errors_name_the_line(tmp_path):
    def error(text: str) -> str:
        path = tmp_path / "c.jsonl"
        path.write_text(text)
        with pytest.raises(DataError) as e:
            read_candidates(path, {"s0", "s1"}, "a sample key")
        return str(e.value)

    assert "c.jsonl:2: not JSON" in error('{"query": "s0", "candidates": ["s0"]}\n{oops\n')
    assert 'c.jsonl:1: "candidates" of query \'s0\' must be a non-empty list' in error('{"query": "s0", "candidates": []}')
    assert "c.jsonl:2: query 's0' is listed twice" in error('{"query": "s0", "candidates": ["s0"]}\n' * 2)
    assert 'needs "query"' in error('["s0"]')
    assert "has no queries" in error("\n\n")
    assert read_candidates(_write(tmp_path, '{"query": "s1", "candidates": ["s1", "s0", "s1"]}'), {"s0", "s1"},
                           "") == {"s1": ["s1", "s0"]}


def _write(tmp_path, text):
    path = tmp_path / "ok.jsonl"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_zeroshot_candidates_classify_each_listed_sample_among_its_own_classes(features, tiny_text_model):
    """Modality a (the vectors above) against prompts of cat, dog, bird through a tiny text tower. Listed: s0 among
    [cat] alone (a hit whatever the scores), s2 among all three (as without the file), s3 among [cat, dog] (a hit
    when a3 scores dog's prompt embedding above cat's): top-1 = (1 + [s2's top class is dog] + [dog > cat for s3]) / 3,
    over 3 samples instead of 4."""
    root = features["root"]
    config = from_dict(ModelConfig, {"embed_dim": 2, "modalities": {
        "a": dict(FEATURES), "text": {"tower": "hf", "model": tiny_text_model, "max_length": 16}}})
    torch.manual_seed(0)
    AlignmentModel(config).save_pretrained(root / "text_model")
    model = AlignmentModel.from_pretrained(root / "text_model")
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    (root / "templates.txt").write_text("a {}\n")
    path = root / "classes.jsonl"
    path.write_text('{"query": "s0", "candidates": ["cat"]}\n{"query": "s2", "candidates": ["dog", "cat", "bird"]}\n'
                    '{"query": "s3", "candidates": ["cat", "dog"]}\n')
    classifier = zeroshot_classifier(model, ["cat", "dog", "bird"], ["a {}"])  # 2 x 3
    scores = torch.tensor(VECTORS["a"], dtype=torch.float32) @ classifier
    expected = (1 + int(scores[2].argmax() == 1) + int(scores[3, 1] > scores[3, 0])) / 3
    out = last_json(run_in_process("eval", "zeroshot", "--model", str(root / "text_model"), "--data",
                                   features["shards"], "--query", "a", "--classes", str(root / "classes.txt"),
                                   "--templates", str(root / "templates.txt"), "--candidates", str(path)))
    assert out["zeroshot_top1"] == pytest.approx(expected) and out["zeroshot_n"] == 3
    assert out["zeroshot_candidates"] == str(path)
    lacking = root / "lacking.jsonl"
    lacking.write_text('{"query": "s1", "candidates": ["dog", "bird"]}\n')  # s1 is a cat
    proc = run_in_process("eval", "zeroshot", "--model", str(root / "text_model"), "--data", features["shards"],
                          "--query", "a", "--classes", str(root / "classes.txt"), "--candidates", str(lacking),
                          check=False)
    assert proc.returncode == 2 and "the candidates of 's1' lack its label 'cat'" in proc.stderr, proc.stderr
