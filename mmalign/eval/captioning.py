"""Caption metrics as the COCO caption toolkit (coco-caption / pycocoevalcap) computes them: corpus BLEU-1..4,
CIDEr-D, ROUGE-L and METEOR, on PTB-tokenised captions, plus exact match of a class word.

Tokenisation. coco-caption lower-cases and tokenises every caption with the Stanford PTB tokenizer (CoreNLP 3.4.1,
a Java program) and drops punctuation tokens. :func:`coco_tokenize` runs that same tokenizer (the jar shipped by the
``pycocoevalcap`` package, ``pip install mmalign[coco]``) where Java is installed, and otherwise
:func:`tokenize_caption`, a Python port of its rules for caption text, tested token for token against the jar
(hyphenated words stay whole, "man's" -> "man 's", "don't" -> "do n't", decimals and thousands stay whole, brackets
become -lrb- / -rrb-, which coco-caption keeps). :func:`caption_metrics` reports which one it used. A caption that
is already a list of words is used as given.

``references[i]`` holds the reference captions of item i: a list of strings (or of word lists), or one string.

BLEU, CIDEr-D and ROUGE-L are computed here in Python and equal the toolkit's scorers on the same tokens. METEOR is
the toolkit's METEOR 1.5 (Java, with its paraphrase tables, shipped by ``pycocoevalcap``): it is reported where
Java and ``pycocoevalcap`` are installed, and left out otherwise.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Sequence, Union

Caption = Union[str, Sequence[str]]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- tokenisation

# Tokens coco-caption removes after tokenising. It compares them with the lower-cased output, so the upper-case
# bracket names never match and "-lrb-"/"-rrb-" stay in the captions: kept as is, to give the toolkit's numbers.
COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "gimme": ("gim", "me"), "lemme": ("lem", "me"), "y'all": ("y'", "all")}
_CLITIC = re.compile(r"(.*?)(n['’]t|['’](?:s|re|ve|ll|d|m))")
_DOUBLE_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"'})
_PTB_TOKEN = re.compile(r"""
    https?://\S+ | www\.\S+                         # URLs
  | [\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+ | @\w+         # e-mail addresses, @handles
  | (?:[^\W\d_]\.){2,}                              # letter-period abbreviations: u.s., p.m., e.g.
  | [^\W\d_]\.(?=\s)                                # initials: j. smith, c. 1900
  | (?:mr|mrs|ms|dr|jr|sr|st|vs|etc|mt|ft|no)\.(?=\s|$)    # common abbreviations
  | \d+(?:[.,:]\d+)+(?:-\w+)*                       # numbers with separators: 3.5, 1,000, 5:30, 1.5-inch
  | 'n' | y'all                                     # rock 'n' roll
  | (?<!\S)(?:n['’]t|['’](?:s|re|ve|ll|d|m))(?!\w)  # clitics already split off: "man 's"
  | (?<!\S)-\d+(?:[.,:]\d+)*                        # negative numbers
  | \w+(?:-\w+|/\w+|['’][^\W\d_]+)*                 # words, hyphenated and slashed compounds, clitics (split below)
  | [:;]-?[()] | &amp; | \.\.\.+ | --+ | [?!]{2,} | \S     # emoticons, entities, ellipses, dashes, ?!, the rest
""", re.VERBOSE)


def tokenize_caption(caption: Caption) -> list[str]:
    """coco-caption's tokens of one caption, by a Python port of the PTB tokenizer's rules (no Java needed).

    Lower-cased; clitics split off ("man's" -> "man", "'s"; "can't" -> "ca", "n't"); hyphenated words, decimals,
    thousands and times kept whole; brackets named (-lrb-); then the punctuation coco-caption drops is dropped. It
    matched the Java tokenizer on every caption of the test corpus (tests/test_caption_metrics.py) and of the CWCL
    demo (4,803 captions); rarer constructions may differ. A list of words is returned unchanged (as a list).
    """
    if not isinstance(caption, str):
        return list(caption)
    out: list[str] = []
    for token in _PTB_TOKEN.findall(caption.translate(_DOUBLE_QUOTES).lower()):
        clitic = _CLITIC.fullmatch(token)
        if token in _SPLIT_WORDS:
            out.extend(_SPLIT_WORDS[token])
        elif clitic:
            out.extend(t for t in (clitic[1], clitic[2].replace("’", "'")) if t)
        elif token in ('"', "&amp;"):
            out.append("''" if token == '"' else "&")
        else:
            out.append(token[:-1] + _BRACKETS[token[-1]] if token[-1] in _BRACKETS else token)
    return [t for t in out if t not in COCO_PUNCTUATION]


def _coco_jar(name: str) -> Path | None:
    """A jar shipped by ``pycocoevalcap`` (``tokenizer/stanford-corenlp-3.4.1.jar``, ``meteor/meteor-1.5.jar``), or
    None when the package or Java is missing."""
    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __init__.py, no origin
    if spec is None or shutil.which("java") is None:
        return None
    return next((jar for folder in spec.submodule_search_locations or () if (jar := Path(folder) / name).is_file()),
                None)


def coco_toolkit_available() -> bool:
    """Whether Java and ``pycocoevalcap`` are installed: then the tokenizer is coco-caption's own and METEOR runs."""
    return _coco_jar("tokenizer/stanford-corenlp-3.4.1.jar") is not None


TOKENIZER_JAVA = "ptb-corenlp-3.4.1"  # the Stanford tokenizer coco-caption runs
TOKENIZER_PYTHON = "ptb-python-port"  # tokenize_caption


def coco_tokenize(captions: Sequence[str]) -> tuple[list[list[str]], str]:
    """Tokenise captions as coco-caption does: ``(tokens per caption, tokenizer name)``.

    With Java and ``pycocoevalcap`` installed, one run of its Stanford PTB tokenizer (``-preserveLines -lowerCase``,
    line breaks inside a caption become spaces; an empty caption gives no tokens) and coco-caption's punctuation
    filter: ``TOKENIZER_JAVA``.
    Otherwise, or if that run fails, :func:`tokenize_caption` (``TOKENIZER_PYTHON``).
    """
    jar = _coco_jar("tokenizer/stanford-corenlp-3.4.1.jar")
    if jar is not None and captions:
        lines = [re.sub(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]", " ", c) for c in captions]  # one caption per line
        try:
            run = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                  "-lowerCase"], input="\n".join(lines).encode(), capture_output=True, check=True,
                                 timeout=600)
            out = run.stdout.decode().split("\n")
            if len(out) >= len(lines):
                return [[t for t in line.split() if t not in COCO_PUNCTUATION] for line in out[:len(lines)]], \
                    TOKENIZER_JAVA
            log.warning("the PTB tokenizer returned %d lines for %d captions; using the Python port", len(out),
                        len(lines))
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("the PTB tokenizer (Java) failed (%s); using the Python port", e)
    return [tokenize_caption(c) for c in captions], TOKENIZER_PYTHON


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


def _coco_tokens(
    predictions: Sequence[Caption], references: Sequence
) -> tuple[list[list[str]], list[list[list[str]]], str]:
    """``(predictions, references, tokenizer)``: every string caption tokenised in one :func:`coco_tokenize` call,
    lists of words kept as given (tokenizer ``"given"`` when there is no string)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    ref_lists = [[r] if isinstance(r, str) else list(r) for r in references]
    strings = [c for c in [*predictions, *(r for rs in ref_lists for r in rs)] if isinstance(c, str)]
    tokens, tokenizer = coco_tokenize(strings) if strings else ([], "given")
    next_tokens = iter(tokens)

    def take(caption: Caption) -> list[str]:
        return next(next_tokens) if isinstance(caption, str) else list(caption)

    return [take(p) for p in predictions], [[take(r) for r in rs] for rs in ref_lists], tokenizer


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


# ---------------------------------------------------------------- ROUGE-L

def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (dynamic programming, O(len(a) len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_scores(predictions: Sequence[Caption], references: Sequence, beta: float = 1.2) -> list[float]:
    """Per-item ROUGE-L (Lin 2004) as coco-caption's ``Rouge`` computes it.

    For each reference r: P_r = LCS / |prediction|, R_r = LCS / |r|; with P = max_r P_r and R = max_r R_r (maxima
    taken separately), F = (1 + beta^2) P R / (R + beta^2 P), beta = 1.2; 0 when P or R is 0 (or the prediction is
    empty).
    """
    hyps, refs = _prepare(predictions, references)
    scores = []
    for hyp, item_refs in zip(hyps, refs):
        lcs = [_lcs_length(r, hyp) for r in item_refs]
        precision = max(n / len(hyp) for n in lcs) if hyp else 0.0
        recall = max(n / len(r) for n, r in zip(lcs, item_refs) if r) if any(item_refs) else 0.0
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision)
                      if precision and recall else 0.0)
    return scores


def rouge_l(predictions: Sequence[Caption], references: Sequence, beta: float = 1.2) -> float:
    """Corpus ROUGE-L: the mean of ``rouge_l_scores`` (what coco-caption reports as ROUGE_L)."""
    scores = rouge_l_scores(predictions, references, beta)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- METEOR

def meteor(predictions: Sequence[Caption], references: Sequence) -> float | None:
    """Corpus METEOR 1.5 (Denkowski & Lavie 2014) from coco-caption's own scorer (``pycocoevalcap``'s ``Meteor``:
    the Java METEOR with its paraphrase tables, ``-l en -norm``) on the tokenised captions; None when Java or
    ``pycocoevalcap`` is missing or the scorer fails. Starting it loads the tables: ~20 s and ~2 GB of memory."""
    if _coco_jar("meteor/meteor-1.5.jar") is None:
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    hyps, refs = _prepare(predictions, references)
    gts = {i: [" ".join(r) for r in item_refs] for i, item_refs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        log.warning("METEOR (Java) failed (%s); it is left out", e)
        return None
    finally:
        del scorer


# ---------------------------------------------------------------- all of them

def caption_metrics(
    predictions: Sequence[Caption], references: Sequence, targets: Sequence[Caption] | None = None
) -> dict[str, float | str]:
    """The COCO caption metrics of a corpus: ``BLEU-1``..``BLEU-4``, ``CIDEr`` (CIDEr-D), ``ROUGE-L``, ``METEOR``
    (where Java and ``pycocoevalcap`` are installed), ``tokenizer`` (which tokenizer produced the tokens, see
    :func:`coco_tokenize`), plus ``exact_match`` when class ``targets`` are given.

    String captions are tokenised together by :func:`coco_tokenize`, as coco-caption does before scoring.
    """
    hyps, refs, tokenizer = _coco_tokens(predictions, references)
    out: dict[str, float | str] = {f"BLEU-{n}": corpus_bleu(hyps, refs, max_n=n) for n in range(1, 5)}
    out["CIDEr"] = cider_d(hyps, refs)
    out["ROUGE-L"] = rouge_l(hyps, refs)
    score = meteor(hyps, refs)
    if score is not None:
        out["METEOR"] = score
    out["tokenizer"] = tokenizer
    if targets is not None:
        out["exact_match"] = caption_exact_match(predictions, targets)
    return out
