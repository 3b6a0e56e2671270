"""generate(): greedy, beam and sampling share the logits processors; tiny deterministic logits_fns check each rule."""
import math

import pytest
import torch

from mmalign.heads.generation import (
    apply_repetition_penalty, ban_repeated_ngrams, generate, top_k_filter, top_p_filter,
)

PAD, EOS, BOS, V = 0, 1, 2, 8


def looping_fn(tokens, context):
    """Prefers token 3 after BOS, then repeating whatever came last; EOS is never the favourite."""
    B = tokens.shape[0]
    base = torch.tensor([-9.0, 0.2, -9.0, 2.0, 1.8, 1.6, 1.4, 1.2]).expand(B, V).clone()
    last = tokens[:, -1]
    bonus = torch.nn.functional.one_hot(last, V).float() * 3.0
    bonus[last == BOS] = 0
    return base + bonus


def random_fn(seed=0, vocab=V):
    """A fixed random 'bigram + context' model: logits = W[last token] + context @ U + position bias."""
    g = torch.Generator().manual_seed(seed)
    W, U, P = torch.randn(vocab, vocab, generator=g), torch.randn(4, vocab, generator=g), torch.randn(32, vocab, generator=g)

    def fn(tokens, context):
        return 2.0 * W[tokens[:, -1]] + context @ U + P[tokens.shape[1]]
    return fn


def _context(B=6, seed=1):
    return torch.randn(B, 4, generator=torch.Generator().manual_seed(seed))


def _body(row):
    """Generated ids after BOS, up to and including EOS."""
    ids = row[1:].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def _adjacent_repeats(out):
    return sum(sum(a == b and a not in (PAD, EOS) for a, b in zip(r[1:], r[2:])) for r in out.tolist())


def test_greedy_loops_and_repetition_penalty_reduces_repeats():
    ctx = torch.zeros(3, 1)
    plain = generate(looping_fn, ctx, BOS, EOS, PAD, max_length=12)
    assert plain[0, 1:].tolist() == [3] * 12  # the model loops
    penalised = generate(looping_fn, ctx, BOS, EOS, PAD, max_length=12, repetition_penalty=3.0)
    assert _adjacent_repeats(penalised) < _adjacent_repeats(plain)
    assert len(set(penalised[0, 1:].tolist())) > 1


def test_repetition_penalty_is_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_no_repeat_ngram_forbids_repeats(n, strategy):
    out = generate(looping_fn, torch.zeros(2, 1), BOS, EOS, PAD, max_length=5 if n == 1 else 10,
                   strategy=strategy, num_beams=3, no_repeat_ngram_size=n, generator=torch.Generator().manual_seed(0))
    for row in out:
        ids = [BOS] + _body(row)
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        assert len(grams) == len(set(grams)), ids


def test_ban_repeated_ngrams_unit():
    tokens = torch.tensor([[5, 6, 7, 5, 6]])
    banned = ban_repeated_ngrams(torch.zeros(1, V), tokens, 3)  # (5, 6) was followed by 7
    assert torch.isinf(banned[0]).nonzero().flatten().tolist() == [7]
    assert torch.isinf(ban_repeated_ngrams(torch.zeros(1, V), tokens, 1)[0]).nonzero().flatten().tolist() == [5, 6, 7]


def stop_at_fn(tokens, context):
    """Each row emits token 4 (almost surely) until it has generated ``context[row, 0]`` tokens, then EOS."""
    logits = torch.full((tokens.shape[0], V), -30.0)
    logits[:, 4] = 0.0
    logits[tokens.shape[1] - 1 >= context[:, 0], EOS] = 30.0
    return logits


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_eos_stops_each_sequence_and_pads(strategy):
    calls = []

    def counted(tokens, ctx):
        calls.append(tokens.shape[1])
        return stop_at_fn(tokens, ctx)
    out = generate(counted, torch.tensor([[1], [3], [0]]), BOS, EOS, PAD, max_length=20, strategy=strategy, num_beams=2,
                   generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [[BOS, 4, EOS, PAD, PAD], [BOS, 4, 4, 4, EOS], [BOS, EOS, PAD, PAD, PAD]]
    if strategy != "beam":  # beam search may keep looking for better hypotheses after the first EOS
        assert max(calls) == 4  # stopped as soon as every sequence ended


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_min_length_blocks_early_eos(strategy):
    out = generate(stop_at_fn, torch.zeros(2, 1), BOS, EOS, PAD, max_length=20, min_length=3,
                   strategy=strategy, num_beams=2, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [[BOS, 4, 4, 4, EOS]] * 2


def test_max_length_caps_generated_tokens():
    out = generate(looping_fn, torch.zeros(2, 1), BOS, EOS, PAD, max_length=4)
    assert out.shape == (2, 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_width_one_equals_greedy(seed):
    fn, ctx = random_fn(seed), _context()
    greedy = generate(fn, ctx, BOS, EOS, PAD, max_length=15, repetition_penalty=1.3, no_repeat_ngram_size=3)
    for kwargs in (dict(length_penalty=0.0), dict(early_stopping=True)):
        beam = generate(fn, ctx, BOS, EOS, PAD, max_length=15, strategy="beam", num_beams=1,
                        repetition_penalty=1.3, no_repeat_ngram_size=3, **kwargs)
        assert torch.equal(beam, greedy), kwargs


def test_beam_finds_the_better_sequence():
    """Greedy takes 3 (p=.6) and then can only end with p=.2; 4 (p=.4) ends with p=.9: beam finds 4 EOS."""
    def fn(tokens, context):
        p = torch.full((tokens.shape[0], V), 1e-6)
        for row, last in enumerate(tokens[:, -1].tolist()):
            if last == BOS:
                p[row, 3], p[row, 4] = 0.6, 0.4
            elif last == 3:
                p[row, EOS], p[row, 5], p[row, 6], p[row, 7] = 0.2, 0.2, 0.2, 0.2
            else:
                p[row, EOS] = 0.9
        return p.log()
    ctx = torch.zeros(1, 1)
    assert _body(generate(fn, ctx, BOS, EOS, PAD, max_length=3)[0]) == [3, EOS]
    assert _body(generate(fn, ctx, BOS, EOS, PAD, max_length=3, strategy="beam", num_beams=2)[0]) == [4, EOS]


def test_top_k_one_sampling_equals_greedy_and_seed_reproduces():
    fn, ctx = random_fn(3), _context()
    greedy = generate(fn, ctx, BOS, EOS, PAD, max_length=12)
    sampled = generate(fn, ctx, BOS, EOS, PAD, max_length=12, strategy="sample", top_k=1, temperature=0.7,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, greedy)
    a, b = (generate(fn, ctx, BOS, EOS, PAD, max_length=12, strategy="sample", temperature=1.5,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)
    tiny_p = generate(fn, ctx, BOS, EOS, PAD, max_length=12, strategy="sample", top_p=1e-6,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(tiny_p, greedy)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.9)).tolist() == [[True, True, True, False]]


def test_context_structures_and_errors():
    fn = random_fn(0)
    ctx = _context(B=3)
    ref = generate(fn, ctx, BOS, EOS, PAD, max_length=6, strategy="beam", num_beams=3)
    out = generate(lambda t, c: fn(t, c["x"]), {"x": ctx}, BOS, EOS, PAD, max_length=6, strategy="beam",
                   num_beams=3)
    assert torch.equal(ref, out)
    with pytest.raises(ValueError, match="strategy"):
        generate(fn, ctx, BOS, EOS, PAD, max_length=6, strategy="nucleus")
    with pytest.raises(ValueError, match="batch_size"):
        generate(fn, None, BOS, EOS, PAD, max_length=6)
