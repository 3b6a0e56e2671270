"""Gradient caching (GradCache, Gao et al. 2021): a contrastive step on a large batch, encoder memory of one chunk.

The loss needs every embedding of the batch, but the encoders' activations only need to exist one chunk at a time:

1. run the model's forward on every row chunk of the batch without a graph, remembering each chunk's RNG state;
2. compute the loss on the whole batch's (detached) output and backpropagate it to the embeddings (and to any
   parameter the loss owns, such as the logit scale): these are the cached feature gradients;
3. re-run the forward on each chunk with a graph, under its remembered RNG state so dropout draws the same masks,
   and backpropagate its slice of the cached gradients into the encoders (``torch.autograd.backward``).

The parameter gradients equal those of one backward pass through the loss on embeddings computed chunk by chunk
(the same dropout masks), to float rounding. The forward is the model's own (an ``AlignmentOutput`` per chunk):
embeddings get the cached gradients, the rest of the output (presence masks, frozen features) is concatenated.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch

from .losses.contract import AlignmentOutput

log = logging.getLogger(__name__)

Batch = Any  # a tensor, or a (nested) dict of tensors split along dim 0


@dataclass
class GradCacheOutput:
    """Result of :func:`gradcache_step`: everything detached from the graph."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor]  # the loss function's dict, if it returned one
    embeddings: dict[str, torch.Tensor]  # full-batch embeddings per modality


class _RngState:
    """The CPU and CUDA generator states at one point, to replay the same random draws later."""

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay(self):
        """Run a block from this state; the global generators are left as they were before the block."""
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            yield


def _tensors(x: Batch) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    return [t for v in x.values() for t in _tensors(v)] if isinstance(x, Mapping) else []


def _cuda_devices(x: Batch) -> list[int]:
    return sorted({t.device.index or 0 for t in _tensors(x) if t.is_cuda})


def _slice(x: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor in ``x``; other values go with every chunk."""
    if torch.is_tensor(x):
        return x[start:stop]
    if isinstance(x, Mapping):
        return type(x)({k: _slice(v, start, stop) for k, v in x.items()})
    return x


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """Split a tensor or a (nested) dict of tensors into chunks of ``chunk_size`` rows (the last may be smaller)."""
    tensors = _tensors(batch)
    if not tensors:
        raise ValueError("cannot split a batch without tensors")
    n = len(tensors[0])
    return [_slice(batch, i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def gradcache_step(
    forward: Callable[[Batch], AlignmentOutput],
    batch: Batch,
    loss_fn: Callable[[AlignmentOutput], torch.Tensor | Mapping[str, torch.Tensor]],
    chunk_size: int,
    *,
    scaler: Any = None,
) -> GradCacheOutput:
    """One GradCache forward/backward: parameter gradients of ``loss_fn`` over the whole batch, chunk by chunk.

    ``forward`` maps a chunk of ``batch`` (a nested dict of tensors, split into ``chunk_size`` rows) to its output. ``loss_fn`` takes the whole batch's output and returns the loss or a dict with a ``"loss"``
    entry; parameters it owns (logit scale, bias) receive their gradients directly. Gradients are accumulated into
    ``.grad`` as ``loss.backward()`` would; the optimiser step is the caller's. ``scaler`` (a
    ``torch.amp.GradScaler``) scales the loss for mixed precision.
    """
    chunks = split_batch(batch, chunk_size)

    # 1. the forward without a graph, remembering the RNG state before each chunk
    rng, parts = [], []
    with torch.no_grad():
        for chunk in chunks:
            rng.append(_RngState(_cuda_devices(chunk)))
            parts.append(forward(chunk))
    whole = AlignmentOutput.cat(parts)
    embeddings = {m: e.requires_grad_(True) for m, e in whole.embeddings.items()}
    del parts

    # 2. loss on the whole batch; its gradient w.r.t. the embeddings is the cache
    result = loss_fn(replace(whole, embeddings=embeddings))
    loss = result["loss"] if isinstance(result, Mapping) else result
    torch.autograd.backward(scaler.scale(loss) if scaler is not None else loss)
    feature_grads = {m: e.grad for m, e in embeddings.items()}
    for m, g in feature_grads.items():
        if g is None:
            raise ValueError(f"the loss does not depend on the embeddings of {m!r}")

    # 3. the forward on each chunk again, with a graph, under the same RNG state; push its cached gradients through
    start = 0
    for chunk, state in zip(chunks, rng):
        with state.replay():
            emb = forward(chunk).embeddings
        stop = start + next(iter(emb.values())).shape[0]
        torch.autograd.backward([emb[m] for m in feature_grads], [g[start:stop] for g in feature_grads.values()])
        start = stop
    log.debug("gradcache: %d chunks of %d rows", len(chunks), chunk_size)

    outputs = {}
    if isinstance(result, Mapping):
        outputs = {k: v.detach() if torch.is_tensor(v) else v for k, v in result.items()}
    return GradCacheOutput(loss=loss.detach(), outputs=outputs,
                           embeddings={m: e.detach() for m, e in embeddings.items()})
