"""Batched text generation for any decoder with a next-token interface.

``logits_fn(tokens, context) -> B x V`` returns the logits of the next token after ``tokens`` (B x t, BOS first)
given ``context`` (a tensor, a tuple/list/dict of tensors, or None; batch first). ``CocaTextDecoder.step`` and
``OpenClipCoca.step`` are such functions.

The logits processors are small pure functions ``(logits B x V, tokens B x t, ...) -> logits`` shared by every
strategy: repetition penalty, no-repeat-ngram, minimum length; sampling adds temperature, top-k and top-p.
Length conventions: ``max_length`` is the most tokens generated after BOS (EOS included), ``min_length`` the fewest
generated before EOS may appear. The result is B x (1 + L), BOS in column 0, L <= max_length, and every sequence
that ended early is padded with ``pad_id`` after its EOS.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor, Any], torch.Tensor]
_NEG_INF = float("-inf")


# ---------------------------------------------------------------- logits processors (pure functions)

def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): for every token already in ``tokens``, divide its logit by ``penalty`` if it is
    positive and multiply it by ``penalty`` if negative (penalty > 1 discourages repeats; 1 is a no-op)."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, tokens)
    return logits.scatter(1, tokens, torch.where(seen > 0, seen / penalty, seen * penalty))


def ban_repeated_ngrams(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already present in ``tokens`` (n <= 0: no-op;
    n = 1 bans every token already present)."""
    t = tokens.shape[1]
    if n <= 0 or t < n:
        return logits
    ngrams = tokens.unfold(1, n, 1)  # B x (t - n + 1) x n
    if n == 1:
        match = torch.ones(ngrams.shape[:2], dtype=torch.long, device=tokens.device)
    else:  # earlier n-grams whose first n - 1 tokens equal the last n - 1 tokens
        match = (ngrams[:, :, :-1] == tokens[:, None, t - n + 1:]).all(-1).long()
    hits = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, ngrams[:, :, -1], match)
    return logits.masked_fill(hits > 0, _NEG_INF)


def forbid_tokens(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Set the logits of ``token_ids`` to -inf (e.g. EOS before ``min_length``)."""
    logits = logits.clone()
    logits[:, token_ids] = _NEG_INF
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by ``temperature`` (> 0; 1 is a no-op)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th kept), -inf elsewhere; k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability sums to
    at least ``p`` (always the most likely one), -inf elsewhere; p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # mass of the strictly more likely tokens already reaches p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), _NEG_INF)


def process_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    n_generated: int,
    eos_id: int,
    min_length: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> torch.Tensor:
    """The processors every strategy applies, in order: repetition penalty, no-repeat-ngram, EOS ban while
    ``n_generated < min_length``."""
    logits = apply_repetition_penalty(logits, tokens, repetition_penalty)
    logits = ban_repeated_ngrams(logits, tokens, no_repeat_ngram_size)
    if n_generated < min_length:
        logits = forbid_tokens(logits, [eos_id])
    return logits


def sampling_filter(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (what sampling adds to ``process_logits``)."""
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


# ---------------------------------------------------------------- strategies

def _map_context(context: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(context, torch.Tensor):
        return fn(context)
    if isinstance(context, dict):
        return {k: _map_context(v, fn) for k, v in context.items()}
    if isinstance(context, (list, tuple)):
        return type(context)(_map_context(v, fn) for v in context)
    return context


def _first_tensor(context: Any) -> torch.Tensor | None:
    if isinstance(context, torch.Tensor):
        return context
    values = context.values() if isinstance(context, dict) else context if isinstance(context, (list, tuple)) else ()
    for v in values:
        if (t := _first_tensor(v)) is not None:
            return t
    return None


def _next_logits(logits_fn: LogitsFn, tokens: torch.Tensor, context: Any) -> torch.Tensor:
    logits = logits_fn(tokens, context)
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _greedy_or_sample(logits_fn, context, tokens, eos_id, pad_id, max_length, sample, generator, proc, filt):
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for step in range(max_length):
        logits = process_logits(_next_logits(logits_fn, tokens, context), tokens, step, **proc)
        if sample:
            probs = sampling_filter(logits, **filt).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = nxt.masked_fill(finished, pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt == eos_id
        if bool(finished.all()):
            break
    return tokens


def _beam_search(logits_fn, context, tokens, eos_id, pad_id, max_length, k, length_penalty, early_stopping, proc):
    """Beam search over B x k rows; a finished hypothesis scores sum(log p) / n_generated ** length_penalty."""
    B = tokens.shape[0]
    device = tokens.device
    context = _map_context(context, lambda x: x.repeat_interleave(k, dim=0))
    tokens = tokens.repeat_interleave(k, dim=0)  # row b * k + j is beam j of item b
    scores = torch.full((B, k), _NEG_INF, device=device, dtype=torch.float64)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (normalised score, ids after BOS)
    done = [False] * B

    def add_hyp(b: int, score: float, ids: list[int]) -> None:
        hyps[b].append((score / (len(ids) ** length_penalty), ids))
        hyps[b].sort(key=lambda h: -h[0])
        del hyps[b][k:]

    step = 0
    for step in range(max_length):
        logits = process_logits(_next_logits(logits_fn, tokens, context), tokens, step, **proc)
        logp = F.log_softmax(logits, dim=-1)
        V = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(B, k * V)
        top_scores, top_idx = cand.topk(min(2 * k, k * V), dim=1)
        top_scores, top_beam, top_tok = top_scores.tolist(), (top_idx // V).tolist(), (top_idx % V).tolist()
        src_rows, new_tok, new_scores = [], [], []
        for b in range(B):
            if done[b]:  # frozen: keep the rows, append padding
                src_rows += [b * k + j for j in range(k)]
                new_tok += [pad_id] * k
                new_scores += scores[b].tolist()
                continue
            live: list[tuple[float, int, int]] = []
            for rank, (s, j, t) in enumerate(zip(top_scores[b], top_beam[b], top_tok[b])):
                if t == eos_id:
                    if rank < k and s > _NEG_INF:  # only an EOS among the k best candidates ends a hypothesis
                        add_hyp(b, s, tokens[b * k + j, 1:].tolist() + [eos_id])
                elif len(live) < k:
                    live.append((s, j, t))
            best_live = live[0][0]
            if len(hyps[b]) == k:  # can any live beam still beat the worst kept hypothesis?
                bound_len = max_length if length_penalty > 0 else step + 1
                done[b] = early_stopping or hyps[b][-1][0] >= best_live / (bound_len ** length_penalty)
            src_rows += [b * k + j for _, j, _ in live]
            new_tok += [t for _, _, t in live]
            new_scores += [s for s, _, _ in live]
        tokens = torch.cat([tokens[src_rows], torch.tensor(new_tok, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device, dtype=scores.dtype).reshape(B, k)
        if all(done):
            break
    for b in range(B):  # beams still running at max_length become hypotheses without EOS
        if not done[b]:
            for j in range(k):
                if scores[b, j] > _NEG_INF:
                    add_hyp(b, scores[b, j].item(), tokens[b * k + j, 1:].tolist())
    best = [hyps[b][0][1] if hyps[b] else tokens[b * k, 1:].tolist() for b in range(B)]  # else: all banned
    out = torch.full((B, 1 + max(len(ids) for ids in best)), pad_id, dtype=torch.long, device=device)
    out[:, 0] = tokens[0, 0]
    for b, ids in enumerate(best):
        out[b, 1: 1 + len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    return out


@torch.no_grad()
def generate(
    logits_fn: LogitsFn,
    context: Any,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    min_length: int = 0,
    strategy: str = "greedy",
    num_beams: int = 1,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    generator: torch.Generator | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Generate B sequences: B x (1 + L) long tensor, BOS first, pad after each sequence's EOS (L <= max_length).

    strategy: "greedy" (argmax), "sample" (temperature -> top-k -> top-p, then ``torch.multinomial`` with
    ``generator``), or "beam" (``num_beams`` beams per item; the best hypothesis by sum of log-probabilities divided
    by (generated tokens, EOS included) ** ``length_penalty``). Beam search stops an item when it has
    ``num_beams`` finished hypotheses and no live beam can still beat the worst of them (``early_stopping``: as soon
    as it has them). With ``num_beams=1`` it equals greedy when ``length_penalty=0`` or ``early_stopping=True``;
    with a positive length penalty it may go on past the first EOS to find a better normalised hypothesis.
    Temperature/top-k/top-p apply to sampling only; repetition penalty, no-repeat-ngram and min_length to all.
    B is the batch size of ``context`` (its first tensor), or ``batch_size`` when the context has no tensor.
    """
    if max_length < 1 or min_length < 0:
        raise ValueError(f"need max_length >= 1 and min_length >= 0, got {max_length}, {min_length}")
    first = _first_tensor(context)
    if batch_size is None:
        if first is None:
            raise ValueError("generate needs batch_size when the context holds no tensor")
        batch_size = first.shape[0]
    device = first.device if first is not None else torch.device("cpu")
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    proc = dict(eos_id=eos_id, min_length=min_length, repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size)
    if strategy in ("greedy", "sample"):
        filt = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        return _greedy_or_sample(logits_fn, context, tokens, eos_id, pad_id, max_length, strategy == "sample",
                                 generator, proc, filt)
    if strategy == "beam":
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        return _beam_search(logits_fn, context, tokens, eos_id, pad_id, max_length, num_beams, length_penalty,
                            early_stopping, proc)
    raise ValueError(f"unknown strategy {strategy!r}; use 'greedy', 'beam' or 'sample'")
