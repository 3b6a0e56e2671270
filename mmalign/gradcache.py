"""Gradient caching (GradCache, Gao et al. 2021): a contrastive step on a large batch, encoder memory of one chunk.

The loss needs every embedding of the batch, but the encoders' activations only need to exist one chunk at a time:

1. embed every chunk of every modality without a graph, remembering each chunk's RNG state;
2. compute the loss on the full (detached) embedding set and backpropagate it to the embeddings (and to any
   parameter the loss owns, such as the logit scale): these are the cached feature gradients;
3. re-run each chunk with a graph, under its remembered RNG state so dropout draws the same masks, and
   backpropagate its slice of the cached gradients into the encoder (``torch.autograd.backward(emb, grad)``).

The parameter gradients equal those of one backward pass through the loss on embeddings computed chunk by chunk
(the same dropout masks), to float rounding. Nothing here knows about a model class: the caller passes one encode
function per modality.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch

log = logging.getLogger(__name__)

Batch = Any  # a tensor, or a dict / tuple / list structure of tensors split along dim 0


@dataclass
class GradCacheOutput:
    """Result of :func:`gradcache_step`: everything detached from the graph."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # the loss function's dict, if it returned one
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # full-batch embeddings per modality
    feature_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # d loss / d embeddings (scaled if AMP)


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
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def _cuda_devices(x: Batch) -> list[int]:
    return sorted({t.device.index or 0 for t in _tensors(x) if t.is_cuda})


def _batch_len(x: Batch) -> int | None:
    """Rows in ``x``: the length of its first tensor or per-sample list."""
    if torch.is_tensor(x) or isinstance(x, list):
        return len(x)
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, tuple) else ()
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None


def _slice(x: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor (and per-sample list) in ``x``; other values go with every chunk."""
    if torch.is_tensor(x) or isinstance(x, list):
        return x[start:stop]
    if isinstance(x, Mapping):
        return type(x)({k: _slice(v, start, stop) for k, v in x.items()})
    if isinstance(x, tuple):
        return tuple(_slice(v, start, stop) for v in x)
    return x


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """Split a tensor or a dict/tuple of tensors into chunks of ``chunk_size`` rows (the last may be smaller)."""
    n = _batch_len(batch)
    if n is None:
        raise ValueError("cannot split a batch without tensors or lists; pass a list of chunks instead")
    return [_slice(batch, i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def gradcache_step(
    encode_fns: Mapping[str, Callable[[Batch], torch.Tensor]],
    inputs: Mapping[str, Batch | list[Batch]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor | Mapping[str, torch.Tensor]],
    chunk_size: int | None = None,
    *,
    no_sync: Callable[[], ContextManager] | None = None,
    scaler: Any = None,
) -> GradCacheOutput:
    """One GradCache forward/backward: parameter gradients of ``loss_fn`` over the whole batch, chunk by chunk.

    ``encode_fns[m]`` maps one chunk of modality ``m`` to its embeddings (rows in chunk order). ``inputs[m]`` is a
    list of chunks, or a batch (a tensor, or a dict/tuple of tensors and per-sample lists) that is split into
    ``chunk_size`` rows (no split when ``chunk_size`` is None).
    ``loss_fn`` takes the full embedding dict and returns the loss or a dict with a ``"loss"`` entry; parameters it
    owns (logit scale, bias) receive their gradients directly. Gradients are accumulated into ``.grad`` as
    ``loss.backward()`` would; the optimiser step is the caller's. ``no_sync`` (e.g. DDP's ``model.no_sync``) wraps
    every encoder backward but the last, so gradients are reduced once; ``scaler`` (a ``torch.amp.GradScaler``)
    scales the loss for mixed precision.
    """
    chunks: dict[str, list[Batch]] = {}
    for m, x in inputs.items():
        if isinstance(x, list):
            chunks[m] = x
        elif chunk_size is None:
            chunks[m] = [x]
        else:
            chunks[m] = split_batch(x, chunk_size)

    # 1. embed without a graph, remembering the RNG state before each chunk
    rng: dict[str, list[_RngState]] = {m: [] for m in chunks}
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in chunks}
    with torch.no_grad():
        for m, ms_chunks in chunks.items():
            for chunk in ms_chunks:
                rng[m].append(_RngState(_cuda_devices(chunk)))
                parts[m].append(encode_fns[m](chunk))
    embeddings = {m: torch.cat(p).requires_grad_(True) for m, p in parts.items()}
    del parts

    # 2. loss on the full set; its gradient w.r.t. the embeddings is the cache
    result = loss_fn(embeddings)
    loss = result["loss"] if isinstance(result, Mapping) else result
    torch.autograd.backward(scaler.scale(loss) if scaler is not None else loss)
    feature_grads = {m: e.grad for m, e in embeddings.items()}
    for m, g in feature_grads.items():
        if g is None:
            raise ValueError(f"the loss does not depend on the embeddings of {m!r}")

    # 3. re-embed each chunk with a graph under the same RNG state and push its cached gradient through it
    jobs = [(m, i) for m in chunks for i in range(len(chunks[m]))]
    offsets = {m: 0 for m in chunks}
    for n, (m, i) in enumerate(jobs):
        last = n == len(jobs) - 1
        sync = contextlib.nullcontext() if (no_sync is None or last) else no_sync()
        with sync, rng[m][i].replay():
            emb = encode_fns[m](chunks[m][i])
            start = offsets[m]
            offsets[m] += emb.shape[0]
            torch.autograd.backward(emb, feature_grads[m][start : offsets[m]])
    log.debug("gradcache: %d chunks over %s", len(jobs), ", ".join(f"{m}={len(c)}" for m, c in chunks.items()))

    outputs = {}
    if isinstance(result, Mapping):
        outputs = {k: v.detach() if torch.is_tensor(v) else v for k, v in result.items()}
    return GradCacheOutput(
        loss=loss.detach(),
        outputs=outputs,
        embeddings={m: e.detach() for m, e in embeddings.items()},
        feature_grads=feature_grads,
    )
