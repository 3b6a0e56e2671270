"""Caption metrics against hand-computed values (and nltk / coco-caption reference values)."""
import math

import pytest

from mmalign.eval.captioning import (
    caption_exact_match, caption_metrics, cider_d, cider_d_scores, corpus_bleu, tokenize_caption,
)

PREDS = ["The cat sat on the mat.", "a dog runs in the park"]
REFS = [["the cat is on the mat", "there is a cat on the mat"],
        ["a dog runs in a park", "the dog is running in the park"]]


def test_tokenize():
    assert tokenize_caption("A man's  red-hat, on_top!") == ["a", "man's", "red", "hat", "on", "top"]
    assert tokenize_caption(["Already", "split"]) == ["Already", "split"]


def test_bleu_identical_is_one():
    caps = ["a man rides a horse on the beach", "two dogs play in the grass together"]
    assert corpus_bleu(caps, [[c] for c in caps]) == pytest.approx(1.0)
    assert corpus_bleu(caps, [[c, "something else entirely here"] for c in caps]) == pytest.approx(1.0)


def test_bleu_hand_computed_multiple_references():
    # item 1: p1 5/6 (sat unmatched), p2 3/5, p3 1/4, p4 0/3; item 2: p1 6/6, p2 5/5, p3 3/4, p4 1/3
    # corpus: p1 11/12, p2 8/10, p3 4/8, p4 1/6; c = 12, r = 6 + 6 (closest lengths) -> BP = 1
    expected = (11 / 12 * 8 / 10 * 4 / 8 * 1 / 6) ** 0.25
    assert corpus_bleu(PREDS, REFS) == pytest.approx(expected, rel=1e-12)
    assert corpus_bleu(PREDS, REFS) == pytest.approx(0.49719876934333024, rel=1e-12)  # nltk.corpus_bleu
    assert corpus_bleu(PREDS[:1], REFS[:1]) == 0.0  # no matching 4-gram, no smoothing


def test_bleu_brevity_penalty_and_closest_reference():
    # p1 = p2 = 1, c = 2, r = 6: BP = exp(1 - 6/2)
    assert corpus_bleu(["the cat"], [["the cat sat on the mat"]], max_n=2) == pytest.approx(math.exp(-2))
    # closest reference length is 3 (|2-3| = 1 beats |2-6|): BP = exp(1 - 3/2)
    assert corpus_bleu(["the cat"], [["the cat sat on the mat", "the cat sat"]], max_n=2) == pytest.approx(
        math.exp(-0.5))
    # longer than every reference: no penalty, p1 = 3/4 -> BLEU-1 = 0.75
    assert corpus_bleu(["the cat sat down"], [["the cat sat"]], max_n=1) == pytest.approx(0.75)


def test_bleu_matches_nltk_when_installed():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hyps = [tokenize_caption(p) for p in PREDS]
    refs = [[tokenize_caption(r) for r in rr] for rr in REFS]
    for n in (1, 2, 3, 4):
        assert corpus_bleu(PREDS, REFS, max_n=n) == pytest.approx(
            nltk_bleu.corpus_bleu(refs, hyps, weights=(1 / n,) * n), rel=1e-12)


def test_cider_hand_computed():
    # two items, disjoint words: every n-gram has df = 1 and weight log(2); identical captions give cosine 1 for
    # every order present and no length penalty: 4 orders -> 10, only orders 1-2 (two words) -> 10 * 2/4 = 5
    assert cider_d(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]]) == pytest.approx(10.0)
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # a single item has idf log(1) - log(1) = 0 everywhere: CIDEr-D is 0 by construction
    assert cider_d(["a b c"], [["a b c"]]) == 0.0


def test_cider_matches_coco_caption_values():
    preds = ["a man rides a horse on the beach", "two dogs play", "a red bus", "a plate of food"]
    refs = [["a man riding a horse on a beach", "a person rides a brown horse along the shore",
             "man on horseback at the beach"],
            ["two dogs playing in the grass", "a pair of dogs play together"],
            ["a red double decker bus on the street", "a bus that is red"],
            ["a cat sleeping on a sofa", "a kitten on the couch"]]
    # computed with coco-caption's CiderScorer (pycocoevalcap) on the same word lists
    expected = [2.1554197048038097, 1.8369736623160198, 1.6422199924436183, 0.0]
    assert cider_d_scores(preds, refs) == pytest.approx(expected, rel=1e-12)
    assert cider_d(preds, refs) == pytest.approx(1.4086533398908618, rel=1e-12)


def test_cider_consensus_and_ordering():
    refs = [["a man rides a horse on the beach", "a man riding a horse on the beach", "man rides horse on beach"],
            ["two dogs play in the grass", "two dogs playing in the grass", "dogs play on grass"],
            ["a red bus on the street", "a red bus in the street", "red bus driving down a street"]]
    exact = cider_d([r[0] for r in refs], refs)
    assert exact > 0
    partial = cider_d_scores(["a man rides a horse", "two dogs play in the grass", "a red bus on the street"], refs)
    wrong = cider_d_scores(["a red bus on the street", "a man rides a horse on the beach", "two dogs play"], refs)
    perfect = cider_d_scores([r[0] for r in refs], refs)
    assert perfect[0] > partial[0] > wrong[0] >= 0.0
    padded = cider_d_scores(["a man rides a horse on the beach today under a very blue sky"] + [r[0] for r in refs[1:]],
                            refs)
    assert padded[0] < perfect[0]  # extra words: lower precision and the Gaussian length penalty


def test_exact_match():
    preds = ["A photo of a Cat.", "a photo of cats", "a concatenated cat-like bobcat", "a hot dog on a plate",
             "a hot sunny dog", "dog"]
    targets = ["cat", "cat", "Cat", "hot dog", "hot dog", "dog"]
    # matches: 0 (case/punctuation ignored), 2 ("cat-like" -> "cat"), 3, 5; not 1 (plural), not 4 (not contiguous)
    assert caption_exact_match(preds, targets) == pytest.approx(4 / 6)
    assert caption_exact_match(["bobcat"], ["cat"]) == 0.0
    with pytest.raises(ValueError):
        caption_exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        caption_exact_match(["a"], ["!"])


def test_caption_metrics_dict():
    out = caption_metrics(PREDS, REFS, targets=["cat", "park"])
    assert set(out) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "exact_match"}
    assert out["BLEU-1"] >= out["BLEU-2"] >= out["BLEU-3"] >= out["BLEU-4"] > 0
    assert out["exact_match"] == 1.0
    with pytest.raises(ValueError):
        caption_metrics(PREDS, REFS[:1])
