"""Towers from open_clip, timm and HF (from scratch, local checkpoints), LiT locking, caching, truncation."""
import json
import logging

import pytest
import torch

from mmalign.config import ModelConfig, from_dict
from mmalign.model import AlignmentModel
from mmalign.modalities.frozen_cache import shared_cache
from mmalign.modalities.tuning import lock_tower


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register a tiny open_clip architecture (as a user with a custom model config would)."""
    import open_clip

    path = tmp_path_factory.mktemp("oc") / "mmalign-tiny-vit.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "mmalign-tiny-vit"


def _model(modalities: dict, embed_dim: int = 8) -> AlignmentModel:
    return AlignmentModel(from_dict(ModelConfig, {"embed_dim": embed_dim, "modalities": modalities}))


def test_open_clip_towers_save_and_reload(tiny_open_clip, tmp_path):
    model = _model({
        "image": {"tower": "open_clip", "model": tiny_open_clip, "image_size": 32},
        "text": {"tower": "open_clip", "model": tiny_open_clip, "max_length": 16, "lock": True,
                 "unlocked_layers": 1},
    }).eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = model.modalities["text"].tokenize(["a red square", "a blue circle", "a green cross"])
    assert tokens["input_ids"].shape == (3, 16)
    out = model({"image": images, "text": tokens}).embeddings
    assert out["image"].shape == (3, 8) and torch.allclose(out["text"].norm(dim=-1), torch.ones(3))
    # LiT with the last block unlocked: only that block of the text transformer trains.
    text_tower = model.adapters["text"].tower
    trainable = {n for n, p in text_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.transformer.resblocks.1.") for n in trainable)
    model.save_pretrained(tmp_path / "m")
    again = AlignmentModel.from_pretrained(tmp_path / "m").eval()
    for name, x in (("image", images), ("text", tokens)):
        torch.testing.assert_close(again.encode(name, x), model.encode(name, x))


def test_open_clip_image_tower_from_local_checkpoint(tiny_open_clip, tmp_path):
    import open_clip

    reference = open_clip.create_model(tiny_open_clip)
    torch.save(reference.state_dict(), tmp_path / "ckpt.pt")
    model = _model({"image": {"tower": "open_clip", "model": tiny_open_clip, "pretrained": str(tmp_path / "ckpt.pt"),
                              "image_size": 32, "proj": "none"}}, embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = torch.nn.functional.normalize(reference.eval().visual(x), dim=-1)
    torch.testing.assert_close(model.encode("image", x), expected)


def test_timm_tower():
    model = _model({"image": {"tower": "timm", "model": "test_resnet", "image_size": 32}})
    assert model.encode("image", torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_hf_text_tower_lock_last_layers_and_norms(tiny_text_model):
    model = _model({"text": {"model": tiny_text_model, "lock": True, "unlocked_layers": 1, "unlock_norms": True}})
    names = {n for n, p in model.adapters["text"].tower.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.encoder.layer.1.") for n in names)
    assert not any(n.startswith("model.encoder.layer.0.attention.self") for n in names)
    assert "model.embeddings.LayerNorm.weight" in names  # norms unlocked everywhere
    assert all(p.requires_grad for p in model.adapters["text"].proj.parameters())


def test_fully_locked_tower_stays_in_eval_mode_and_caches(tiny_text_model):
    model = _model({"text": {"model": tiny_text_model, "lock": True, "cache_frozen": True}})
    model.train()
    adapter = model.adapters["text"]
    assert not adapter.tower.training
    tokens = model.modalities["text"].tokenize(["one", "two", "one"])
    first = model.encode("text", tokens)
    assert len(shared_cache(adapter._fingerprint, adapter.tower)) == 2  # "one" is encoded once
    adapter.cache_frozen = False
    torch.testing.assert_close(model.encode("text", tokens), first)


def test_frozen_cache_keeps_bf16_features_out_of_a_float32_run(tiny_text_model):
    """The cache is shared by identical frozen towers of the process (a notebook's runs, a run and its evaluation):
    features encoded under bf16 autocast are not served to a float32 pass, and the reverse."""
    spec = {"text": {"model": tiny_text_model, "lock": True, "cache_frozen": True}}
    tokens = _model(spec).modalities["text"].tokenize(["a red square", "a blue circle"])
    bf16_run, fp32_run = _model(spec), _model(spec)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_bf16 = bf16_run.adapters["text"].tower_features(tokens)
        in_fp32 = fp32_run.adapters["text"].tower_features(tokens)
        fp32_run.adapters["text"].cache_frozen = False
        uncached = fp32_run.adapters["text"].tower_features(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            uncached_bf16 = fp32_run.adapters["text"].tower_features(tokens)
    assert not torch.equal(uncached, uncached_bf16)  # the two precisions differ here
    assert torch.equal(in_fp32, uncached)
    assert torch.equal(in_bf16, uncached_bf16.float())


def test_locked_cached_image_tower_sees_each_image_once(tiny_open_clip):
    """A cached frozen image tower gets the evaluation transform in training (random crops would miss the cache
    every epoch) and its cache holds a digest per image, not the pixels; a trainable one keeps its random crops."""
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy())
    spec = {"tower": "open_clip", "model": tiny_open_clip, "image_size": 32}
    model = _model({"image": {**spec, "lock": True, "cache_frozen": True}}).train()
    frozen = model.modalities["image"]
    views = [frozen.transform(image, train=True) for _ in range(3)]
    assert all(torch.equal(v, frozen.transform(image, train=False)) for v in views)
    model.encode("image", torch.stack(views))
    adapter = model.adapters["image"]
    assert [len(k) for k in shared_cache(adapter._fingerprint, adapter.tower)] == [16]  # 3 rows, 1 image, a 16-byte key
    trained = _model({"image": spec}).modalities["image"]
    assert not torch.equal(trained.transform(image, train=True), trained.transform(image, train=True))


def test_truncation_is_counted_and_warned(tiny_text_model, caplog):
    model = _model({"text": {"model": tiny_text_model, "max_length": 6}})
    text = model.modalities["text"]
    with caplog.at_level(logging.WARNING):
        batch = text.tokenize(["short", "a caption with far more than six tokens in it", "tiny"])
    assert batch["input_ids"].shape == (3, 6)
    assert text.truncated == 1
    assert "1 of 3 captions so far were longer than max_length=6" in caplog.text


def test_open_clip_tokenizer_truncation_is_counted_exactly():
    """A caption that exactly fills the context is not counted as truncated; one token more is."""
    from mmalign.modalities import build_modality

    cfg = from_dict(ModelConfig, {"modalities": {"text": {"tower": "open_clip", "model": "ViT-B-32",
                                                         "max_length": 8}}}).modalities["text"]
    text = build_modality("text", cfg)
    batch = text.tokenize(["a b c d e f", "a b c d e f g", "a red square"])  # 6 + 2, 7 + 2 and 3 + 2 tokens
    assert batch["input_ids"].shape == (3, 8) and batch["attention_mask"].sum(1).tolist() == [8, 8, 5]
    assert text.truncated == 1 and text.seen == 3


def test_open_clip_architecture_with_an_hf_tokenizer(tmp_path):
    """open_clip models whose text_cfg names an HF tokenizer (the SigLIP family) pad with that tokenizer's pad id
    (1 here): masks and truncation counts follow it, and the tower embeds."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "a", "red", "square", "b", "c", "d", "e", "f"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(tmp_path)
    text_cfg = {"context_length": 6, "vocab_size": len(words), "width": 16, "heads": 2, "layers": 1,
                "hf_tokenizer_name": str(tmp_path), "pad_id": 1, "no_causal_mask": True, "pool_type": "last"}
    vision_cfg = {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 8, "vision_cfg": vision_cfg, "text_cfg": text_cfg}, "preprocess_cfg": {}}))
    model = _model({"text": {"tower": "open_clip", "model": f"local-dir:{tmp_path}"}})
    text = model.modalities["text"]
    batch = text.tokenize(["a red square", "a b c d e f", "b c d e f a red"])  # 3, 6 (fills) and 7 words
    assert batch["input_ids"].shape == (3, 6) and batch["attention_mask"].sum(1).tolist() == [3, 6, 6]
    assert batch["input_ids"][0, 3:].tolist() == [1, 1, 1]
    assert text.truncated == 1 and text.seen == 3
    assert model.encode("text", batch).shape == (3, 8)


@pytest.mark.parametrize("case", ["named", "forced_size", "local_dir", "coca_kwargs", "local_file"])
def test_open_clip_preprocessing_read_from_the_checkpoint_equals_the_built_model(case, tiny_open_clip, tmp_path):
    """What the open_clip towers' specs read without building (image size, mean/std, resize mode, interpolation;
    text positions) is what open_clip sets on the model it builds from the same name, weights and kwargs."""
    import open_clip

    from mmalign.modalities.openclip import open_clip_context_length, open_clip_image_defaults

    kwargs, pretrained, name = {}, None, tiny_open_clip
    if case == "forced_size":
        kwargs = {"force_image_size": 48, "force_context_length": 12}
    elif case == "local_dir":
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {
            "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear", "resize_mode": "squash"}}))
        name = f"local-dir:{tmp_path}"
    elif case == "coca_kwargs":
        from tests.test_coca_heads import TINY_OPEN_CLIP

        name, kwargs = "coca_ViT-B-32", TINY_OPEN_CLIP
    elif case == "local_file":
        pretrained = str(tmp_path / "ckpt.pt")
        torch.save(open_clip.create_model(name).state_dict(), pretrained)
    cfg = from_dict(ModelConfig, {"modalities": {"image": {"tower": "open_clip", "model": name, "pretrained": pretrained,
                                                          "tower_kwargs": kwargs}}}).modalities["image"]
    built = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    expected = open_clip.get_model_preprocess_cfg(built)
    size = expected["size"][0] if isinstance(expected["size"], tuple) else expected["size"]
    assert open_clip_image_defaults(cfg) == {
        "image_size": size, "mean": tuple(expected["mean"]), "std": tuple(expected["std"]),
        "resize_mode": expected["resize_mode"], "interpolation": expected["interpolation"]}
    assert open_clip_context_length(cfg) == built.context_length


def test_lock_without_block_list_is_a_clear_error():
    from mmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="has no block list"):
        lock_tower(torch.nn.Linear(2, 2), unlocked_layers=1)


def test_image_transforms_give_open_clips_pixels():
    """ToTensor + Normalize fused into one step: open_clip's pixels up to float rounding, train (same random crop)
    and evaluation transforms, every resize mode."""
    import open_clip
    from PIL import Image

    from mmalign.modalities.image import ImageModality, NormalizedTensor

    image = Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy())
    for mode in ("shortest", "longest", "squash"):
        modality = ImageModality("image", ImageModality.config_class(kind="image", image_size=32, resize_mode=mode))
        for train in (True, False):
            cfg = modality.cfg
            reference = open_clip.image_transform(32, is_train=train, mean=cfg.mean, std=cfg.std, resize_mode=mode,
                                                  interpolation=cfg.interpolation,
                                                  aug_cfg=modality.train_augment if train else None)
            torch.manual_seed(0)
            ours = modality.transform(image, train)
            assert isinstance(modality._transforms[train].transforms[-1], NormalizedTensor)
            torch.manual_seed(0)
            torch.testing.assert_close(ours, reference(image), rtol=0, atol=1e-6)
            assert ours.is_contiguous() and ours.dtype == torch.float32
