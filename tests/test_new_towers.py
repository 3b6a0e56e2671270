"""A user adds a tower of each kind (text, audio, image) in this one file: a class and one ``register_tower`` with its
preprocessing spec each. They train through ``mmalign.train.train`` with nothing changed anywhere else; the spec's
defaults (one read from the tower's checkpoint folder) are resolved into the config before building, and the saved
model preprocesses and embeds as the trained one."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.modalities import TowerSpec, register_tower
from mmalign.modalities.audio import AudioTowerSpec
from mmalign.modalities.text import TextTowerSpec
from mmalign.model import AlignmentModel
from mmalign.train import train
from tests.conftest import metrics_rows, shape_png, write_shard
from tests.test_audio import tone


# ------------------------------------------------------------------------------------------------- text: bytes


class ByteTokenizer:
    """UTF-8 bytes (+1, so 0 pads) of each caption, cut to ``max_length``."""

    def __init__(self, cfg):
        self.max_length = cfg.max_length

    def tokenize(self, texts, cfg):
        rows = [list(t.encode())[: cfg.max_length] for t in texts]
        ids = torch.zeros(len(rows), max(1, max(map(len, rows))), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long) + 1
        truncated = sum(len(t.encode()) > cfg.max_length for t in texts)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}, truncated

    def save(self, directory):
        return False  # nothing to save: the tokenizer is this code


class ByteBag(nn.Module):
    """Mean of byte embeddings over the caption."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(257, width, padding_idx=0)
        self.out_dim = width

    def forward(self, inputs):
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (self.embed(inputs["input_ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1)


register_tower("text", "test_byte_bag", TextTowerSpec(
    build=lambda cfg: ByteBag(**cfg.tower_kwargs), tokenizer=ByteTokenizer, defaults=lambda cfg: {"max_length": 24}))


# ------------------------------------------------------------------------------------------------- audio: loudness


class FrameLoudness:
    """Root-mean-square of 20 ms frames: one feature per frame, frames x 1."""

    axes = None  # not a spectrogram: no SpecAugment

    def __init__(self, cfg):
        self.frame = int(cfg.sample_rate * 0.02)

    def fixed_samples(self):
        return None

    def __call__(self, window, signal):
        frames = window[: window.shape[0] // self.frame * self.frame].reshape(-1, self.frame)
        return frames.pow(2).mean(1, keepdim=True).sqrt(), signal / window.shape[0]

    def save(self, directory):
        return False


class LoudnessMLP(nn.Module):
    def __init__(self, frames: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(frames, width), nn.GELU(), nn.Linear(width, width))
        self.out_dim = width

    def forward(self, inputs):
        return self.net(inputs["input"])


register_tower("audio", "test_loudness", AudioTowerSpec(
    build=lambda cfg: LoudnessMLP(round(cfg.clip_seconds / 0.02), **cfg.tower_kwargs), features=FrameLoudness,
    defaults=lambda cfg: {"sample_rate": 8000, "clip_seconds": 0.4}))


# ------------------------------------------------------------------------------------------------- image: pixels


class PixelMLP(nn.Module):
    def __init__(self, image_size: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size**2, width))
        self.out_dim = width

    def forward(self, x):
        return self.net(x)


def checkpoint_preprocess(cfg) -> dict:
    """The preprocessing the 'checkpoint' folder (``model``) was trained with."""
    saved = json.loads(Path(cfg.model, "preprocess.json").read_text())
    return {"image_size": saved["size"], "mean": tuple(saved["mean"]), "std": tuple(saved["std"])}


register_tower("image", "test_pixel_mlp", TowerSpec(
    build=lambda cfg: PixelMLP(cfg.image_size, **cfg.tower_kwargs), defaults=checkpoint_preprocess,
    model="a folder with preprocess.json"))


# ------------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-towers")
    checkpoint = root / "pixel-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "preprocess.json").write_text(json.dumps({"size": 12, "mean": [0.4] * 3, "std": [0.3] * 3}))
    samples = [{"__key__": f"s{i:03d}", "image.png": shape_png(i), "audio.wav": tone(200 + 50 * i, 0.3, 16000),
                "text.txt": f"shape number {i}"} for i in range(16)]
    shards = write_shard(root / "train-000000.tar", samples)
    recipe = {
        "run_dir": str(root / "run"),
        "model": {"embed_dim": 8, "modalities": {
            "image": {"tower": "test_pixel_mlp", "model": str(checkpoint)},
            "audio": {"tower": "test_loudness", "tower_kwargs": {"width": 8}},
            "text": {"tower": "test_byte_bag"}}},
        "loss": {"name": "clip"},
        "data": {"train": shards, "batch_size": 8, "shuffle_buffer": 0, "num_workers": 0},
        "train": {"steps": 1, "warmup_steps": 0, "checkpoint_every": 1, "log_every": 1},
    }
    return root, train(load_config(base=recipe))


def test_new_towers_of_every_kind_train_one_step(run):
    root, result = run
    assert result["steps"] == 1 and np.isfinite(result["final_loss"])
    logged = metrics_rows(root / "run")
    assert logged[-1]["step"] == 1 and np.isfinite(logged[-1]["loss"]) and logged[-1]["grad_norm"] > 0


def test_spec_defaults_are_resolved_before_building_and_saved(run):
    root, _ = run
    saved = json.loads((root / "run" / "model" / "config.json").read_text())["modalities"]
    assert saved["image"]["image_size"] == 12 and saved["image"]["mean"] == [0.4] * 3  # from the checkpoint
    assert saved["image"]["resize_mode"] == "shortest"  # what the tower leaves unset: the kind's default
    assert (saved["audio"]["sample_rate"], saved["audio"]["clip_seconds"]) == (8000, 0.4)
    assert saved["text"]["max_length"] == 24 and saved["text"]["padding"] == "longest"

    model = AlignmentModel.from_pretrained(root / "run" / "model").eval()
    audio, text = model.modalities["audio"], model.modalities["text"]
    item = audio.transform(audio.decode(tone(300, 0.3, 16000), "wav"), train=False)
    assert item["input"].shape == (1, 20, 1)  # 0.4 s at 8 kHz in 20 ms frames
    batch = text.tokenize(["a caption longer than twenty-four bytes", "short"])
    assert batch["input_ids"].shape == (2, 24) and text.truncated == 1
    with torch.no_grad():
        embeddings = model({"audio": audio.collate([item]), "text": batch}).embeddings
    assert torch.allclose(embeddings["text"].norm(dim=-1), torch.ones(2))
    again = AlignmentModel.from_pretrained(root / "run" / "model").eval()
    with torch.no_grad():
        assert torch.equal(again.encode("text", batch), embeddings["text"])


def test_a_spec_names_what_its_tower_needs():
    from mmalign.config import ModelConfig, from_dict

    cfg = from_dict(ModelConfig, {"modalities": {"image": {"tower": "test_pixel_mlp"}}})
    with pytest.raises(ConfigError, match="modality 'image': image tower test_pixel_mlp needs 'model' "
                                          r"\(a folder with preprocess.json\)"):
        AlignmentModel(cfg)
    with pytest.raises(ConfigError, match="long_text: windows needs an HF encoder tower"):
        AlignmentModel(from_dict(ModelConfig, {"modalities": {"text": {"tower": "test_byte_bag",
                                                                        "long_text": "windows"}}}))
    with pytest.raises(TypeError, match="a text tower needs a TextTowerSpec"):
        register_tower("text", "test_no_tokenizer", TowerSpec(build=lambda cfg: ByteBag()))
