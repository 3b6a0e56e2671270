"""Data: WebDataset streaming with per-modality decoding, and writers that turn files on disk into shards."""
from .pipeline import (
    SKIP_REASONS, counted_batches, expand_urls, iterate_batches, make_dataset, make_loader, merge_skips, pass_items,
)

__all__ = ["SKIP_REASONS", "counted_batches", "expand_urls", "iterate_batches", "make_dataset", "make_loader",
           "merge_skips", "pass_items"]
