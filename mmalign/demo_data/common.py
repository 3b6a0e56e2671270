"""Shared pieces of the demo data builders: writing sample dicts to shards, a 'built already' marker, and a
word-level tokenizer for demos whose captions use a small closed vocabulary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..data.shards import write_shard_set

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def write_samples(samples: Iterable[dict], out_dir: Path, prefix: str, shard_size: int) -> str:
    """Write sample dicts (``__key__`` + ``name.ext`` bytes) to ``prefix-%06d.tar``; returns the brace pattern."""
    return write_shard_set(samples, out_dir, prefix, shard_size)["shards"]


def cached_build(out_dir: Path, version: str, build) -> dict:
    """Run ``build(out_dir) -> dict`` once; later calls read the saved summary (rebuilt when ``version`` changes)."""
    marker = out_dir / "built.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("version") == version:
            return saved["paths"]
    paths = build(out_dir)
    marker.write_text(json.dumps({"version": version, "paths": paths}, indent=2))
    return paths


def word_tokenizer(texts: Iterable[str], out_dir: Path) -> str:
    """Save an HF tokenizer whose vocabulary is the lower-cased words and punctuation marks of ``texts`` plus
    [PAD] [UNK] [BOS] [EOS], and return its folder (``AutoTokenizer.from_pretrained`` loads it offline).

    A caption decoder over a demo's few dozen words has a tiny output layer, where a 50k-token BPE vocabulary
    would make the LM head the slowest part of training on a CPU.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()  # words (\w+) and runs of punctuation
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())})
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}, unk_token="[UNK]"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = split
    pad, unk, bos, eos = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token=pad, unk_token=unk, bos_token=bos,
                                        eos_token=eos, clean_up_tokenization_spaces=True)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
