"""Data: WebDataset streaming with per-modality decoding, and writers that turn files on disk into shards."""
from .pipeline import expand_urls, iterate_batches, make_dataset, make_loader, merge_skips

__all__ = ["expand_urls", "iterate_batches", "make_dataset", "make_loader", "merge_skips"]
