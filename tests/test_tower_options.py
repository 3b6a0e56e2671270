"""Tower options are honoured or refused in one line: image sizes other than an architecture's (open_clip, timm, HF
dual encoders), ``max_length`` beyond a text model's positions; and no tower trains a parameter that gets no
gradient (a test tower with one stops the run at its first step, naming it)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmalign.config import ModelConfig, from_dict
from mmalign.errors import ConfigError, MMAlignError
from mmalign.model import AlignmentModel, parameters_without_gradient


def _model(modalities: dict, embed_dim: int = 16, **model) -> AlignmentModel:
    return AlignmentModel(from_dict(ModelConfig, {"embed_dim": embed_dim, "modalities": modalities, **model}))


@pytest.fixture(scope="module")
def open_clip_vit(tmp_path_factory) -> str:
    """A tiny open_clip ViT (32 px, 16 text positions) saved as open_clip exports it: ``local-dir:`` with weights."""
    from tower_matrix import save_open_clip_assets

    root = tmp_path_factory.mktemp("open-clip")
    save_open_clip_assets(root, names=["oc_vit"])
    return f"local-dir:{root / 'oc_vit'}"


def test_open_clip_image_size_resizes_the_position_embedding(open_clip_vit, tmp_path):
    """image_size 48 on a 32 px ViT checkpoint: open_clip's force_image_size builds the tower for 48 px and resizes
    the checkpoint's position embedding (it was a shape-mismatch traceback at the first batch)."""
    import open_clip

    model = _model({"image": {"tower": "open_clip", "model": open_clip_vit, "image_size": 48, "proj": "none"}}).eval()
    reference = open_clip.create_model(open_clip_vit, force_image_size=48).eval()
    assert reference.visual.positional_embedding.shape[0] == (48 // 8) ** 2 + 1
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.encode("image", x), F.normalize(reference.encode_image(x), dim=-1))
    model.save_pretrained(tmp_path / "m")
    again = AlignmentModel.from_pretrained(tmp_path / "m").eval()
    assert again.config.modalities["image"].image_size == 48
    with torch.no_grad():
        torch.testing.assert_close(again.encode("image", x), model.encode("image", x))
    with pytest.raises(ConfigError, match="image_size 48 and tower_kwargs.force_image_size 40 disagree"):
        _model({"image": {"tower": "open_clip", "model": open_clip_vit, "image_size": 48,
                          "tower_kwargs": {"force_image_size": 40}}})


def test_open_clip_text_tower_trains_every_parameter(open_clip_vit):
    """The text tower drops the CLIP model's own logit_scale, which never gets a gradient (with several processes,
    DistributedDataParallel stopped at step 2 on it)."""
    model = _model({"image": {"tower": "open_clip", "model": open_clip_vit},
                    "text": {"tower": "open_clip", "model": open_clip_vit}})
    tokens = model.modalities["text"].tokenize(["a red square", "a blue circle"])
    out = model({"image": torch.randn(2, 3, 32, 32), "text": tokens}).embeddings
    F.cross_entropy(out["image"] @ out["text"].T * model.logit_scale(), torch.arange(2)).backward()
    assert parameters_without_gradient(model) == {}
    assert not any("logit_" in name for name, _ in model.adapters["text"].tower.named_parameters())


def test_timm_image_size_and_preprocessing(tmp_path):
    """A fixed-size timm architecture (ViT) is built for image_size (timm's img_size); a convolutional one takes any
    size; unset preprocessing comes from timm's pretrained config."""
    import timm

    vit = _model({"image": {"tower": "timm", "model": "test_vit", "image_size": 48}}).eval()
    assert tuple(vit.adapters["image"].tower.model.patch_embed.img_size) == (48, 48)
    assert vit.encode("image", torch.randn(2, 3, 48, 48)).shape == (2, 16)
    default = timm.get_pretrained_cfg("test_convnext")
    cnn = _model({"image": {"tower": "timm", "model": "test_convnext"}}).eval()
    cfg = cnn.config.modalities["image"]
    assert (cfg.image_size, cfg.mean, cfg.std) == (default.input_size[-1], default.mean, default.std)
    assert cnn.encode("image", torch.randn(2, 3, 40, 40)).shape == (2, 16)


def test_hf_dual_encoder_image_size_interpolates_its_position_embedding(tiny_hf_clip):
    from transformers import CLIPModel

    model = _model({"image": {"tower": "hf_clip", "model": tiny_hf_clip, "image_size": 48, "proj": "none"}}).eval()
    reference = CLIPModel.from_pretrained(tiny_hf_clip).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(model.encode("image", x), F.normalize(expected, dim=-1))


def test_max_length_beyond_the_text_positions_is_a_config_error(tiny_text_model, tiny_hf_clip, open_clip_vit):
    for tower, model, positions in (("hf", tiny_text_model, 64), ("hf_clip", tiny_hf_clip, 77),
                                    ("open_clip", open_clip_vit, 16)):
        ok = _model({"text": {"tower": tower, "model": model, "max_length": positions}})
        assert ok.modalities["text"].tokenize(["word " * 200])["input_ids"].shape[1] == positions
        with pytest.raises(ConfigError, match=f"max_length {positions + 1} exceeds the {positions} text positions "
                                              f"of {tower}"):
            _model({"text": {"tower": tower, "model": model, "max_length": positions + 1}})


def test_text_positions_count_from_the_padding_index():
    """RoBERTa-style models (CLAP's text tower) number positions from padding_idx + 1: 514 embeddings hold 512."""
    from transformers import RobertaConfig, RobertaModel

    from mmalign.modalities.hf import text_positions

    model = RobertaModel(RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=100, max_position_embeddings=514))
    assert text_positions(model) == 512


# ------------------------------------------------------------------------------------------------ unused parameters


class PixelMeanWithSpare(nn.Module):
    """A tower with a parameter its forward never uses (what open_clip's text tower had in its logit_scale)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 8)
        self.spare = nn.Parameter(torch.zeros(4))
        self.out_dim = 8

    def forward(self, x):
        return self.net(x.mean(dim=(2, 3)))


@pytest.mark.slow
def test_a_trainable_parameter_without_gradient_stops_the_run_at_its_first_step(tmp_path, tiny_text_model):
    from conftest import shape_sample, write_shard
    from mmalign.config import load_config
    from mmalign.modalities import TowerSpec, register_tower
    from mmalign.train import train

    register_tower("image", "test_spare_parameter", TowerSpec(build=lambda cfg: PixelMeanWithSpare()))
    shards = write_shard(tmp_path / "train.tar", [shape_sample(i) for i in range(8)])
    recipe = {"run_dir": str(tmp_path / "run"),
              "model": {"embed_dim": 8, "modalities": {
                  "image": {"tower": "test_spare_parameter", "image_size": 16},
                  "text": {"tower": "hf", "model": tiny_text_model, "lock": True}}},
              "data": {"train": shards, "batch_size": 8, "shuffle_buffer": 0, "num_workers": 0},
              "train": {"steps": 3, "warmup_steps": 0, "checkpoint_every": 1, "log_every": 1, "device": "cpu"}}
    with pytest.raises(MMAlignError) as raised:
        train(load_config(base=recipe))
    message = str(raised.value)
    assert "\n" not in message and message.startswith("trainable parameters got no gradient in the first step")
    assert "image tower (test_spare_parameter): adapters.image.tower.spare" in message
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # stopped before its first checkpoint


def test_open_clip_coca_from_scratch_initialises_every_parameter():
    """open_clip leaves its CoCa decoder's text_projection as torch.empty memory (garbage captions, different each
    run); with deterministic algorithms torch fills such memory with NaN, which finds it."""
    from tower_matrix import OPEN_CLIP_COCA

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model = _model({"image": {"tower": "open_clip", "model": "coca_ViT-B-32", "proj": "none",
                                  "tower_kwargs": OPEN_CLIP_COCA},
                        "text": {"tower": "open_clip_coca", "model": "coca_ViT-B-32", "proj": "none",
                                 "tower_kwargs": OPEN_CLIP_COCA}},
                       embed_dim=32, caption={"context": "image", "n_queries": 0})
    finally:
        torch.use_deterministic_algorithms(False)
    assert [name for name, p in model.named_parameters() if not torch.isfinite(p).all()] == []
