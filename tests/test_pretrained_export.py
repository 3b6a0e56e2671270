"""Starting from pretrained checkpoints (HF dual encoders, open_clip), LoRA, long captions, and export to plain
transformers / open_clip with identical embeddings after reload."""
import io
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import exported_embedding
from mmalign.config import ModelConfig, from_dict, load_config
from mmalign.model import AlignmentModel

CAPTIONS = ["a red square", "a picture of a blue circle in the corner"]
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def _model(modalities: dict, embed_dim: int) -> AlignmentModel:
    return AlignmentModel(from_dict(ModelConfig, {"embed_dim": embed_dim, "modalities": modalities})).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def shapes_shards(shapes_dataset, tmp_path_factory):
    from mmalign.data.shards import write_shards

    return write_shards(shapes_dataset["csv"], tmp_path_factory.mktemp("shards"), shard_size=24)["shards"]


def test_hf_clip_towers_are_the_checkpoint(tiny_hf_clip, tmp_path):
    """Adapters cut from a CLIPModel give exactly get_image_features / get_text_features (normalised), with the
    checkpoint's image processor and tokenizer; saving and reloading the mmalign model keeps them."""
    from transformers import CLIPModel

    model = _model({"image": {"tower": "hf_clip", "model": tiny_hf_clip, "proj": "none"},
                    "text": {"tower": "hf_clip", "model": tiny_hf_clip, "proj": "none"}}, embed_dim=16)
    image_cfg = model.config.modalities["image"]
    assert (image_cfg.image_size, image_cfg.mean, image_cfg.std) == (32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert (image_cfg.resize_mode, image_cfg.interpolation) == ("shortest", "bicubic")
    assert model.config.modalities["text"].max_length == 77
    reference = CLIPModel.from_pretrained(tiny_hf_clip).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.modalities["text"].tokenize(CAPTIONS)
    assert tokens["input_ids"][0, 0].item() == 49406  # CLIP's start-of-text: the checkpoint's tokenizer
    with torch.no_grad():
        expected_image = F.normalize(reference.get_image_features(pixel_values=x).pooler_output, dim=-1)
        expected_text = F.normalize(reference.get_text_features(**tokens).pooler_output, dim=-1)
        assert _max_diff(model.encode("image", x), expected_image) < 1e-5
        assert _max_diff(model.encode("text", tokens), expected_text) < 1e-5
        model.save_pretrained(tmp_path / "m")
        again = AlignmentModel.from_pretrained(tmp_path / "m").eval()
        assert _max_diff(again.encode("image", x), expected_image) < 1e-5
        assert _max_diff(again.encode("text", again.modalities["text"].tokenize(CAPTIONS)), expected_text) < 1e-5


@pytest.mark.slow
def test_lora_run_trains_only_adapters_merges_and_exports_as_clip_model(tiny_hf_clip, shapes_shards, tmp_path):
    """LoRA on both towers of a CLIP checkpoint: only LoRA weights, heads and the logit scale change; merging gives
    the same embeddings; `mmalign export --format hf` writes a CLIPModel that plain transformers reloads to the
    same embeddings, with the trained logit scale, tokenizer and image processor."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from mmalign.cli import main
    from mmalign.train import train

    lora = "{r: 4, alpha: 8}"
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(f"""run_dir: {tmp_path / 'run'}
model:
  embed_dim: 12
  modalities:
    image: {{tower: hf_clip, model: '{tiny_hf_clip}', lora: {lora}}}
    text: {{tower: hf_clip, model: '{tiny_hf_clip}', lora: {lora}}}
data: {{train: '{shapes_shards}', batch_size: 8, shuffle_buffer: 8, num_workers: 0}}
train: {{steps: 3, lr: 0.01, warmup_steps: 0, checkpoint_every: 3, log_every: 1}}
""")
    train(load_config(recipe))
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    base = load_file(f"{tiny_hf_clip}/model.safetensors")
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(trained[k].abs().sum() > 0 for k in lora_b)  # adapters moved away from their zero init
    for name, value in trained.items():
        if "lora_" in name or ".proj." in name or name == "log_logit_scale":
            continue
        part = name.split(".tower.model.model.", 1)[1].replace(".base_layer", "")
        assert torch.equal(value, base[part]), name  # the checkpoint's own weights did not move

    model = AlignmentModel.from_pretrained(tmp_path / "run" / "model").eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.modalities["text"].tokenize(CAPTIONS)
    with torch.no_grad():
        image, text = model.encode("image", x), model.encode("text", tokens)
        model.merge_lora()
        assert _max_diff(model.encode("image", x), image) < 1e-5
        assert _max_diff(model.encode("text", tokens), text) < 1e-5

    assert main(["export", "--model", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    info = json.loads((tmp_path / "hf" / "mmalign_export.json").read_text())
    assert (info["layout"], info["class"]) == ("dual", "CLIPModel")
    clip = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    enc = AutoTokenizer.from_pretrained(tmp_path / "hf")(CAPTIONS, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], tokens["input_ids"])
    with torch.no_grad():
        assert _max_diff(F.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1), image) < 1e-5
        assert _max_diff(F.normalize(clip.get_text_features(**enc).pooler_output, dim=-1), text) < 1e-5
    assert clip.logit_scale.exp().item() == pytest.approx(info["logit_scale"], rel=1e-6)
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_mean) == [0.5, 0.4, 0.3] and processor.crop_size["height"] == 32


def test_export_towers_layout_reloads_in_plain_transformers(tiny_hf_clip, tiny_text_model, tmp_path):
    """A CLIP image tower with an MLP head and a BERT text tower with a linear head: one transformers folder per
    modality + heads.safetensors, recomputed here from the documented JSON only."""
    from transformers import AutoTokenizer

    from mmalign.export import export_model

    model = _model({"image": {"tower": "hf_clip", "model": tiny_hf_clip, "proj": "mlp"},
                    "text": {"tower": "hf", "model": tiny_text_model, "max_length": 16}}, embed_dim=12)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.modalities["text"].tokenize(CAPTIONS)
    with torch.no_grad():
        expected = {"image": model.encode("image", x), "text": model.encode("text", tokens)}
    assert export_model(model, tmp_path / "out", "hf")["layout"] == "towers"

    info = json.loads((tmp_path / "out" / "mmalign_export.json").read_text())
    text_inputs = dict(AutoTokenizer.from_pretrained(tmp_path / "out" / "text")(
        CAPTIONS, padding=True, truncation=True, max_length=info["modalities"]["text"]["max_length"],
        return_tensors="pt"))
    for name, inputs in (("image", {"pixel_values": x}), ("text", text_inputs)):
        assert _max_diff(exported_embedding(tmp_path / "out", name, inputs), expected[name]) < 1e-5, name


@pytest.mark.parametrize("kind", ["ast", "whisper", "clap", "wav2vec2"])
def test_export_hf_audio_tower_reloads_with_its_feature_extractor(kind, tiny_text_model, tmp_path):
    """A fine-tuned HF audio tower (with an MLP head) exports with its feature extractor: plain transformers on the
    exported folder gives the same embedding of a full-length clip."""
    import soundfile as sf
    from transformers import AutoFeatureExtractor

    from mmalign.export import export_model
    from test_audio import save_tiny_hf, tone

    audio = {"tower": "hf", "model": save_tiny_hf(kind, tmp_path / kind), "proj": "mlp"}
    if kind == "wav2vec2":
        audio["clip_seconds"] = 0.5  # waveform models take any length; the others fix it
    model = _model({"audio": audio, "text": {"tower": "hf", "model": tiny_text_model}}, embed_dim=8)
    modality = model.modalities["audio"]
    clip = tone(440, modality.clip_samples / modality.rate, modality.rate)
    with torch.no_grad():
        expected = model.encode("audio", modality.collate([modality.transform(modality.decode(clip, "wav"), False)]))
    export_model(model, tmp_path / "out", "hf")

    spec = json.loads((tmp_path / "out" / "mmalign_export.json").read_text())["modalities"]["audio"]
    assert spec["sample_rate"] == 16000 and spec["clip_seconds"] == pytest.approx(modality.clip_samples / 16000)
    wave, rate = sf.read(io.BytesIO(clip), dtype="float32")
    features = AutoFeatureExtractor.from_pretrained(tmp_path / "out" / "audio")(
        wave, sampling_rate=rate, return_tensors="pt")
    inputs = {k: v for k, v in features.items() if k in ("input_values", "input_features", "is_longer")}
    assert _max_diff(exported_embedding(tmp_path / "out", "audio", inputs), expected) < 1e-5


@pytest.mark.slow
def test_open_clip_checkpoint_fine_tunes_and_exports(shapes_shards, tmp_path):
    """An open_clip architecture from a local checkpoint (with its preprocessing), one training step, then export to
    open_clip: open_clip.create_model('local-dir:...') gives the same embeddings, and mmalign loads it back."""
    import open_clip

    from mmalign.export import export_model
    from mmalign.train import train

    source = tmp_path / "pretrained"
    source.mkdir()
    preprocess = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                  "resize_mode": "squash"}
    (source / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP,
                                                              "preprocess_cfg": preprocess}))
    torch.manual_seed(0)
    net = open_clip.create_model(f"local-dir:{source}", load_weights=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(source / "open_clip_model.safetensors"))

    tower = f"{{tower: open_clip, model: 'local-dir:{source}'}}"
    recipe = tmp_path / "oc.yaml"
    recipe.write_text(f"""run_dir: {tmp_path / 'run'}
model:
  embed_dim: 8
  modalities: {{image: {tower}, text: {tower}}}
data: {{train: '{shapes_shards}', batch_size: 8, shuffle_buffer: 8, num_workers: 0}}
train: {{steps: 1, lr: 0.001, warmup_steps: 0, checkpoint_every: 1}}
""")
    result = train(load_config(recipe))
    assert result["steps"] == 1 and torch.isfinite(torch.tensor(result["final_loss"]))
    model = AlignmentModel.from_pretrained(tmp_path / "run" / "model").eval()
    cfg = model.config.modalities["image"]
    assert (cfg.image_size, cfg.mean, cfg.resize_mode, cfg.interpolation) == (32, (0.5,) * 3, "squash", "bilinear")
    assert model.config.modalities["text"].max_length == 16
    after = model.adapters["image"].tower.visual.state_dict()
    assert any(not torch.equal(v, net.visual.state_dict()[k]) for k, v in after.items())  # the step trained it

    x = torch.randn(2, 3, 32, 32)
    tokens = model.modalities["text"].tokenize(CAPTIONS)
    with torch.no_grad():
        image, text = model.encode("image", x), model.encode("text", tokens)
    export_model(model, tmp_path / "oc", "open_clip")
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    with torch.no_grad():
        assert _max_diff(F.normalize(exported.encode_image(x), dim=-1), image) < 1e-5
        assert _max_diff(F.normalize(exported.encode_text(tokenizer(CAPTIONS)), dim=-1), text) < 1e-5
    back = _model({"image": {"tower": "open_clip", "model": f"local-dir:{tmp_path / 'oc'}", "proj": "none"}},
                  embed_dim=8)
    with torch.no_grad():
        assert _max_diff(back.encode("image", x), image) < 1e-5


def test_long_captions_as_averaged_windows(tiny_text_model):
    """long_text: windows splits a long caption into overlapping windows and averages their tower features."""
    model = _model({"text": {"tower": "hf", "model": tiny_text_model, "max_length": 8, "long_text": "windows",
                             "window_overlap": 2, "proj": "none"}}, embed_dim=32)
    text = model.modalities["text"]
    long_caption = "a very long caption that goes on and on about a red square next to a blue circle"
    batch = text.tokenize(["short one", long_caption])
    owner = batch["owner"]
    assert owner[0] == 0 and (owner == 1).sum() >= 3 and text.truncated == 1
    with torch.no_grad():
        tower = model.adapters["text"].tower
        rows = tower({k: v for k, v in batch.items() if k != "owner"})
        expected = F.normalize(torch.stack([rows[owner == 0].mean(0), rows[owner == 1].mean(0)]), dim=-1)
        assert _max_diff(model.encode("text", batch), expected) < 1e-6


def test_lora_recipe_and_config_errors(tiny_text_model):
    from mmalign.errors import ConfigError

    recipe = load_config("recipes/clip_lora.yaml")
    assert recipe.model.modalities["text"].lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.modalities["image"].lora.r == 8

    with pytest.raises(ConfigError, match="lora.r must be a number >= 1"):
        load_config(None, ["run_dir=x", "data.train=x", "model.modalities.text.model=m",
                           "model.modalities.text.lora.r=0"])
    with pytest.raises(ConfigError, match="no linear or attention layers"):
        _model({"image": {"tower": "small_cnn", "tower_kwargs": {"depth": 1}, "lora": {"r": 2}}}, embed_dim=4)


def test_siglip_checkpoint_towers_and_export(tmp_path):
    """SigLIP: no projection layers, last-token text pooling (captions padded to max_length), squash resize; the
    adapters equal SiglipModel's features and export back to a SiglipModel with the trained scale and bias."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from conftest import TINY_TOWER, save_clip_tokenizer
    from mmalign.export import export_model

    torch.manual_seed(0)
    config = SiglipConfig(text_config=dict(vocab_size=49408, max_position_embeddings=16, **TINY_TOWER),
                          vision_config=dict(image_size=32, patch_size=8, **TINY_TOWER))
    SiglipModel(config).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    save_clip_tokenizer(tmp_path / "siglip")
    path = str(tmp_path / "siglip")
    model = AlignmentModel(from_dict(ModelConfig, {
        "embed_dim": 32, "logit_bias": True, "modalities": {
            "image": {"tower": "hf_clip", "model": path, "proj": "none"},
            "text": {"tower": "hf_clip", "model": path, "proj": "none"}}})).eval()
    text_cfg, image_cfg = model.config.modalities["text"], model.config.modalities["image"]
    assert (text_cfg.max_length, text_cfg.padding) == (16, "max_length")
    assert (image_cfg.resize_mode, image_cfg.mean) == ("squash", (0.5, 0.5, 0.5))
    tokens = model.modalities["text"].tokenize(CAPTIONS)
    assert tokens["input_ids"].shape == (2, 16)
    x = torch.randn(2, 3, 32, 32)
    reference = SiglipModel.from_pretrained(path).eval()
    with torch.no_grad():
        image, text = model.encode("image", x), model.encode("text", tokens)
        assert _max_diff(image, F.normalize(reference.get_image_features(pixel_values=x).pooler_output, dim=-1)) < 1e-5
        assert _max_diff(text, F.normalize(reference.get_text_features(**tokens).pooler_output, dim=-1)) < 1e-5
    assert export_model(model, tmp_path / "out", "hf")["layout"] == "dual"
    exported = SiglipModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _max_diff(F.normalize(exported.get_image_features(pixel_values=x).pooler_output, dim=-1), image) < 1e-5
        assert exported.logit_bias.item() == pytest.approx(-10.0) and exported.logit_scale.exp().item() == \
            pytest.approx(10.0)


def test_lora_on_an_hf_audio_tower_saves_and_reloads(tmp_path):
    """LoRA works on any tower: a wav2vec2 audio tower trains only its adapters and reloads to the same embeddings."""
    from test_audio import audio_model, save_tiny_hf, tone

    folder = save_tiny_hf("wav2vec2", tmp_path / "w2v")
    model = audio_model(tower="hf", model=folder, clip_seconds=0.5,
                        lora={"r": 2, "target_modules": ["q_proj", "v_proj"]}).eval()
    tower = {n for n, p in model.adapters["audio"].tower.named_parameters() if p.requires_grad}
    assert tower and all("lora_" in n for n in tower)
    modality = model.modalities["audio"]
    batch = modality.collate([modality.transform(modality.decode(tone(440, 0.8), "wav"), train=False)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
        expected = model.encode("audio", batch)
    model.save_pretrained(tmp_path / "saved")
    again = AlignmentModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert _max_diff(again.encode("audio", batch), expected) < 1e-6
        assert _max_diff(again.merge_lora().encode("audio", batch), expected) < 1e-5


def test_export_errors_name_the_tower(tiny_text_model, tmp_path):
    from mmalign.errors import ConfigError
    from mmalign.export import export_model

    model = _model({"image": {"tower": "small_cnn", "tower_kwargs": {"width": 4, "depth": 1}},
                    "text": {"tower": "hf", "model": tiny_text_model}}, embed_dim=4)
    with pytest.raises(ConfigError, match="not the image tower 'small_cnn'"):
        export_model(model, tmp_path / "hf", "hf")
    with pytest.raises(ConfigError, match="needs exactly one open_clip image tower"):
        export_model(model, tmp_path / "oc", "open_clip")
    assert not (tmp_path / "hf").exists()  # nothing half-written
