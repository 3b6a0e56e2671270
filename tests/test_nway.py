"""N-way scores (Symile MIP, GRAM volume, sum of cosines) against brute-force loops, and ranking with them."""
import pytest
import torch
import torch.nn.functional as F

from mmalign.errors import ConfigError
from mmalign.eval import retrieval_metrics
from mmalign.eval.nway import NWAY_SCORES, nway_scores


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _brute(method, vectors):
    """Score of one tuple, from the definitions: vectors = given rows + the candidate."""
    if method == "mip":
        return torch.stack(vectors).prod(0).sum()
    if method == "cosine":
        return sum(v @ vectors[-1] for v in vectors[:-1])
    x = torch.stack(vectors)
    return -torch.sqrt(torch.det(x @ x.T).clamp_min(0) + 1e-6)


@pytest.mark.parametrize("method", sorted(NWAY_SCORES))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_scores_equal_brute_force(method, k):
    given = {f"m{i}": _unit(4, 6, seed=i) for i in range(k)}
    candidates = _unit(5, 6, seed=99)
    scores = nway_scores(given, candidates, method)
    assert scores.shape == (4, 5)
    for q in range(4):
        for c in range(5):
            ref = _brute(method, [g[q] for g in given.values()] + [candidates[c]])
            assert scores[q, c].item() == pytest.approx(ref.item(), abs=1e-5)


def test_mip_ranks_the_matching_candidate_first_where_pairwise_cannot():
    """XOR in +-1 codes: the candidate c = a * b is found by MIP; each pair alone is uninformative."""
    a = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    b = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    candidates = torch.tensor([[1.0], [-1.0]])
    target = (a * b == 1).squeeze(1).long().neg() + 1  # index of c = a * b among the candidates
    mip = nway_scores({"a": a, "b": b}, candidates, "mip")
    assert (mip.argmax(1) == target).all()
    cosine = nway_scores({"a": a, "b": b}, candidates, "cosine")
    assert cosine[1, 0] == cosine[1, 1] and cosine[2, 0] == cosine[2, 1]  # a + b = 0: no preference


def test_retrieval_metrics_with_nway_similarity_equals_the_score_matrix():
    given = {"x": _unit(6, 5, 1), "y": _unit(6, 5, 2)}
    gallery = _unit(8, 5, 3)
    positives = [[i] for i in range(6)]
    tuples = torch.stack(list(given.values()), dim=1)

    def similarity(rows, items):
        return nway_scores(dict(zip(given, rows.unbind(1))), items, "mip")

    chunked = retrieval_metrics(tuples, gallery, positives, ks=(1, 3), chunk=4, similarity=similarity)
    # the same ranking through the plain dot product, since MIP = (x * y) . c
    direct = retrieval_metrics(given["x"] * given["y"], gallery, positives, ks=(1, 3))
    assert chunked == pytest.approx(direct)


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="did you mean 'mip'"):
        nway_scores({"x": _unit(2, 3, 0)}, _unit(2, 3, 1), "mpi")
    with pytest.raises(ValueError, match="one row per query"):
        nway_scores({"x": _unit(2, 3, 0), "y": _unit(3, 3, 0)}, _unit(2, 3, 1), "mip")
