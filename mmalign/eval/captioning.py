"""Caption metrics, computed offline in pure Python: corpus BLEU, CIDEr-D, and exact match of a class word.

Captions are compared as word lists. A string is tokenised by ``tokenize_caption``: lower-cased, words are the
maximal runs of letters and digits (an apostrophe inside a word keeps it whole: "man's"), everything else separates
words and is dropped. This approximates coco-caption's PTB tokenisation + punctuation removal; a caption that is
already a list of words is used as given.

``references[i]`` holds the reference captions of item i: a list of strings (or of word lists), or one string.

METEOR is not provided: the coco-caption METEOR is a Java program (METEOR 1.5 with paraphrase tables), and nltk's
re-implementation needs the WordNet corpus downloaded at run time, so neither works offline from PyPI packages.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence, Union

Caption = Union[str, Sequence[str]]

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize_caption(caption: Caption) -> list[str]:
    """Lower-cased words of a caption string; a list of words is returned unchanged (as a list)."""
    if isinstance(caption, str):
        return _WORD.findall(caption.lower())
    return list(caption)


def _references(refs: Caption | Sequence[Caption]) -> list[list[str]]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("every item needs at least one reference caption")
    return [tokenize_caption(r) for r in refs]


def _prepare(predictions: Sequence[Caption], references: Sequence) -> tuple[list[list[str]], list[list[list[str]]]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    return [tokenize_caption(p) for p in predictions], [_references(r) for r in references]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


# ---------------------------------------------------------------- BLEU

def corpus_bleu(predictions: Sequence[Caption], references: Sequence, max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (Papineni et al. 2002), uniform weights, no smoothing.

    Equals nltk's ``corpus_bleu`` whenever every prediction has at least ``max_n`` words (for a shorter one nltk
    counts 1 n-gram instead of 0 in the denominator of p_n; this function, like the paper and coco-caption, counts 0).

    p_n = sum over items of n-gram counts clipped by the maximum count in any one reference / sum of the
    prediction's n-gram counts. BP = 1 if c > r else exp(1 - r / c), c = total prediction length, r = sum over items
    of the reference length closest to the prediction's (the shorter one on ties). BLEU = BP * exp(mean_n log p_n),
    and 0 when some p_n is 0 (nltk returns a float about 1e-308 there) or every prediction is empty.
    """
    hyps, refs = _prepare(predictions, references)
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, item_refs in zip(hyps, refs):
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in item_refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in item_refs:
                max_ref |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


# ---------------------------------------------------------------- CIDEr-D

def cider_d_scores(
    predictions: Sequence[Caption], references: Sequence, n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-item CIDEr-D (Vedantam et al. 2015) exactly as coco-caption's ``CiderScorer`` computes it.

    Each caption becomes, for every n-gram order k = 1..n, a vector of tf-idf weights
    ``count(g) * (log(#items) - log(max(1, df(g))))``, with df(g) = number of items whose references contain g (the
    idf comes from the reference corpus being scored, so one item alone scores 0). For each reference, the order-k
    similarity is ``sum_g min(w_pred(g), w_ref(g)) * w_ref(g) / (|w_pred| |w_ref|)`` (clipped cosine), times the
    Gaussian length penalty ``exp(-(l_pred - l_ref)^2 / (2 sigma^2))``; the item's score is the mean over k of
    these summed over references, divided by the number of references, times 10. As in coco-caption, the length l
    is the number of bigrams (word count - 1; this differs from the word count only for captions under 2 words).
    """
    hyps, refs = _prepare(predictions, references)

    def counts(words: list[str]) -> Counter:
        c: Counter = Counter()
        for k in range(1, n + 1):
            c.update(_ngrams(words, k))
        return c

    hyp_counts = [counts(h) for h in hyps]
    ref_counts = [[counts(r) for r in item_refs] for item_refs in refs]
    doc_freq: Counter = Counter()
    for item_refs in ref_counts:
        doc_freq.update(set().union(*item_refs))
    log_items = math.log(len(hyps))

    def tfidf(c: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for g, tf in c.items():
            vec[len(g) - 1][g] = tf * (log_items - math.log(max(1.0, doc_freq[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(c[g] for g in vec[1]) if n > 1 else 0

    scores = []
    for hc, item_refs in zip(hyp_counts, ref_counts):
        vec, norm, length = tfidf(hc)
        total = [0.0] * n
        for rc in item_refs:
            rvec, rnorm, rlength = tfidf(rc)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and rnorm[k] != 0:
                    val /= norm[k] * rnorm[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(item_refs) * 10.0)
    return scores


def cider_d(predictions: Sequence[Caption], references: Sequence, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of ``cider_d_scores`` (what coco-caption reports as CIDEr)."""
    scores = cider_d_scores(predictions, references, n=n, sigma=sigma)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- exact match

def caption_exact_match(predictions: Sequence[Caption], targets: Sequence[Caption]) -> float:
    """Fraction of predictions that contain their target (a class word or phrase) as whole words.

    Both are tokenised by ``tokenize_caption`` (case and punctuation ignored); a prediction matches when the target's
    words occur in it contiguously and in order. "a photo of a Cat." matches "cat"; "cats", "category" and
    "bobcat" do not; "hot dog" matches "a hot dog on a plate" but not "a hot sunny dog". No stemming or synonyms.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not predictions:
        raise ValueError("no captions to score")
    hits = 0
    for pred, target in zip(predictions, targets):
        words, want = tokenize_caption(pred), tokenize_caption(target)
        if not want:
            raise ValueError(f"empty target {target!r}")
        hits += any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))
    return hits / len(predictions)


def caption_metrics(
    predictions: Sequence[Caption], references: Sequence, targets: Sequence[Caption] | None = None
) -> dict[str, float]:
    """``{"BLEU-1".."BLEU-4", "CIDEr"}`` for the corpus, plus ``"exact_match"`` when class ``targets`` are given."""
    out = {f"BLEU-{n}": corpus_bleu(predictions, references, max_n=n) for n in range(1, 5)}
    out["CIDEr"] = cider_d(predictions, references)
    if targets is not None:
        out["exact_match"] = caption_exact_match(predictions, targets)
    return out
