"""The training data of a run: inputs checked before anything is built, each process's endless stream of batches,
batches moved to the device, and the limit on unusable samples."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .config import Config
from .data import counted_batches, expand_urls, pass_items
from .distributed import rank
from .errors import ConfigError, DataError
from .eval.zeroshot import check_labels, read_classes, read_templates
from .modalities import Modality, inputs_to
from .rundir import TrainState


def check_inputs(cfg: Config) -> list[str]:
    """Fail before building anything if a data path does not exist, or the zero-shot eval set has a label its
    classes file lacks (read from the label members only); returns the training shard urls."""
    urls = expand_urls(cfg.data.train)
    zs, rt = cfg.eval.zeroshot, cfg.eval.retrieval
    for key, spec in (("eval.zeroshot.data", zs.data), ("eval.retrieval.data", rt.data)):
        if spec:
            try:
                expand_urls(spec)
            except DataError as e:
                raise DataError(f"{key}: {e}") from None
    for key, file in (("eval.zeroshot.classes", zs.classes), ("eval.zeroshot.templates", zs.templates)):
        if file and not Path(file).is_file():
            raise ConfigError(f"{key}: file not found: {file}")
    if zs.data and zs.classes:
        try:
            check_labels(zs.data, list(read_classes(zs.classes)), zs.classes)
            read_templates(zs.templates)
        except DataError as e:
            raise DataError(f"eval.zeroshot: {e}") from None
    return urls


def batch_stream(cfg: Config, urls: list[str], modalities: dict[str, Modality], state: TrainState,
                 pin_memory: bool) -> Iterator[dict]:
    """This process's training batches, endless: passes (epochs) over the shards, reshuffled per epoch.

    Each process runs its own epochs (processes may read different amounts of data; training counts steps, so none
    waits for another at an epoch's end). A resumed run replays the epoch up to ``state.batches_in_epoch``.
    """
    while True:
        items = pass_items(urls, modalities, cfg.data.batch_size, train=True, seed=cfg.seed, epoch=state.epoch,
                           shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                           num_workers=cfg.data.num_workers, pin_memory=pin_memory)
        for number, batch in counted_batches(items, state.skipped, replay=state.batches_in_epoch):
            state.batches_in_epoch = number
            yield batch
        if state.batches_in_epoch == 0:
            raise DataError(
                f"no complete batch of {cfg.data.batch_size} in {cfg.data.train} for process {rank()} (skipped: "
                f"{state.skipped.get('counts', {})}); check the shards or lower data.batch_size"
            )
        state.epoch += 1
        state.batches_in_epoch = 0



def to_device(batch: dict, names: list[str], device: torch.device) -> dict:
    """The inputs of ``names`` and their presence masks, on ``device``."""
    out = {}
    for name in names + [f"{n}__present" for n in names if f"{n}__present" in batch]:
        out[name] = inputs_to(batch[name], device, non_blocking=True)
    return out



def n_skipped(skipped: dict) -> int:
    """How many items were skipped, over all reasons (``skipped``: merged ``SkipStats``)."""
    return sum(skipped.get("counts", {}).values())


def check_bad_fraction(bad: float, used: float, skipped: dict, limit: float) -> None:
    """Stop when more than ``limit`` of what was read (over all processes, from 100 items on) was unusable.

    A shard-level fault (unreadable, corrupt, empty shard) counts as one item.
    """
    total = bad + used
    if total >= 100 and bad / total > limit:
        examples = "; ".join(f"{r}: {ex[0]}" for r, ex in skipped.get("examples", {}).items())
        raise DataError(
            f"{bad:.0f} of {total:.0f} samples were unusable (more than data.max_bad_fraction={limit}): "
            f"{skipped.get('counts', {})}. Examples: {examples}"
        )
