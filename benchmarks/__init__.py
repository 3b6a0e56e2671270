"""Benchmarks (``make bench``): side-by-side runs against open_clip and friends, written to results.json/.md."""
