"""CoCa end to end: a tiny captioning model trains through the real loop, evaluates zero-shot/retrieval/captions,
round-trips save/load, and `mmalign caption` writes JSONL; config errors are one clear line."""
import json

import pytest
import torch

from conftest import last_json, metrics_rows, run_in_process
from mmalign.config import GenerationConfig, ModelConfig, from_dict, load_config
from mmalign.errors import ConfigError, DataError
from mmalign.eval.captioning import TOKENIZER_JAVA, TOKENIZER_PYTHON, coco_toolkit_available
from mmalign.losses.caption import caption_targets
from mmalign.model import AlignmentModel
from mmalign.modalities.text import CaptionTokenizer


IMAGE = {"tower": "small_cnn", "tower_kwargs": {"width": 8, "depth": 2}, "image_size": 16,
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
TEXT = {"tower": "coca_decoder", "max_length": 12, "tower_kwargs": {"width": 16, "heads": 2, "layers": 2}}
CAPTION = {"context": "image", "text": "text", "n_queries": 4, "heads": 2}


@pytest.fixture(scope="module")
def shards(shapes_dataset, tmp_path_factory):
    from mmalign.data.shards import write_shards

    return write_shards(shapes_dataset["csv"], tmp_path_factory.mktemp("coca-shards"), shard_size=24)["shards"]


@pytest.fixture(scope="module")
def trained(shards, shapes_dataset, tmp_path_factory):
    """A tiny CoCa (small CNN tokens -> CocaHead, CLIP BPE caption decoder) trained 6 steps by `train`."""
    from mmalign.train import train

    run_dir = tmp_path_factory.mktemp("coca-run")
    data = {"data": shards, "classes": str(shapes_dataset["classes"]), "templates": str(shapes_dataset["templates"])}
    recipe = {
        "run_dir": str(run_dir),
        "model": {"embed_dim": 16, "modalities": {"image": IMAGE, "text": TEXT}, "caption": CAPTION},
        "loss": {"name": "coca"},
        "data": {"train": shards, "batch_size": 8, "shuffle_buffer": 16, "num_workers": 0},
        "train": {"steps": 6, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 6, "log_every": 2},
        "eval": {"batch_size": 16, "zeroshot": data, "retrieval": {"data": shards},
                 "caption": {"data": shards, "max_length": 6}},
    }
    result = train(load_config(base=recipe))
    return run_dir, result


@pytest.mark.slow
def test_tiny_coca_trains_and_evaluates(trained):
    run_dir, result = trained
    assert result["steps"] == 6
    logged = metrics_rows(run_dir)
    assert all({"loss_caption", "loss_contrastive"} <= set(row) for row in logged)
    assert logged[-1]["loss_caption"] < logged[0]["loss_caption"]  # the decoder learns (CE from ~ln 49408)
    # zero-shot and retrieval use the decoder's unimodal CLS output as the text embedding
    assert 0.0 <= result["zeroshot_top1"] <= 1.0 and result["zeroshot_n"] == 48
    assert "retrieval_i2t_R@1" in result
    # captions of every held-out image, scored against the references and the class word
    assert result["caption_n"] == 48
    assert {"caption_BLEU-4", "caption_CIDEr", "caption_ROUGE-L", "caption_exact_match"} <= set(result)
    assert result["caption_tokenizer"] in (TOKENIZER_JAVA, TOKENIZER_PYTHON)
    rows = [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {"key", "caption", "references", "label"} <= set(rows[0])
    assert "## Generated captions" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_save_load_round_trip_gives_identical_captions(trained, shapes_dataset):
    from PIL import Image

    run_dir, _ = trained
    model = AlignmentModel.from_pretrained(run_dir / "model").eval()
    again = AlignmentModel.from_pretrained(run_dir / "model").eval()
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved["caption"] == {**CAPTION}
    image = model.modalities["image"]
    files = sorted((shapes_dataset["root"] / "images").glob("*.png"))[:4]
    x = torch.stack([image.transform(Image.open(f).convert("RGB"), train=False) for f in files])
    for gen in (GenerationConfig(max_length=6), GenerationConfig(strategy="beam", num_beams=2, max_length=6),
                GenerationConfig(strategy="sample", top_k=5, max_length=6, seed=3)):
        first = model.generate_captions(x, gen)
        assert first == again.generate_captions(x, gen) and len(first) == 4
    torch.testing.assert_close(model.encode("image", x), again.encode("image", x))
    with pytest.raises(ConfigError, match="max_length 20"):
        model.generate_captions(x, GenerationConfig(max_length=20))


@pytest.mark.slow
def test_caption_cli_writes_jsonl(trained, shards, shapes_dataset, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "captions.jsonl"
    head = last_json(run_in_process("caption", "--model", str(run_dir), "--data", shards, "--out", str(out),
                                    "--strategy", "beam", "--num-beams", "2", "--max-length", "5"))
    assert head["caption_n"] == 48 and head["captions"] == str(out)
    # the COCO caption metrics, METEOR and coco-caption's own tokenizer where Java and pycocoevalcap are installed
    assert {"caption_BLEU-4", "caption_CIDEr", "caption_ROUGE-L", "caption_exact_match"} <= set(head)
    assert ("caption_METEOR" in head) == coco_toolkit_available()
    assert head["caption_tokenizer"] == (TOKENIZER_JAVA if coco_toolkit_available() else TOKENIZER_PYTHON)
    assert 0 <= head.get("caption_METEOR", 0) <= 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 48
    assert all(isinstance(r["caption"], str) and r["references"] and r["label"] for r in rows)


@pytest.mark.slow
def test_captions_of_image_files(trained, shapes_dataset, tmp_path):
    """Files (a folder, a glob) have no references: captions only, no scores; other files are a clear error."""
    from mmalign.eval.runner import evaluate_captions

    run_dir, _ = trained
    model = AlignmentModel.from_pretrained(run_dir / "model")
    folder = shapes_dataset["root"] / "images"
    out = tmp_path / "files.jsonl"
    head = evaluate_captions(model, str(folder), out, GenerationConfig(max_length=4), batch_size=32)
    assert head["caption_n"] == 48 and "caption_BLEU-4" not in head and "caption_exact_match" not in head
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows[0]) == {"key", "caption"} and rows[0]["key"].endswith("img000.png")
    assert evaluate_captions(model, f"{folder}/img00*.png", out, GenerationConfig(max_length=4))["caption_n"] == 10
    with pytest.raises(DataError, match="pairs.csv: cannot caption a .csv file"):
        evaluate_captions(model, str(shapes_dataset["csv"]), out)


def _model(modalities: dict, caption: dict | None = CAPTION) -> AlignmentModel:
    return AlignmentModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": modalities, "caption": caption}))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="needs a caption decoder tower"):
        _model({"image": IMAGE, "text": {"tower": "open_clip", "model": "ViT-B-32"}})
    with pytest.raises(ConfigError, match="gives no token sequence"):
        _model({"image": {"tower": "timm", "model": "test_resnet", "image_size": 32}, "text": TEXT})
    with pytest.raises(ConfigError, match="needs model.caption"):
        _model({"image": IMAGE, "text": TEXT}, caption=None)
    base = {"run_dir": str(tmp_path), "data": {"train": "x.tar"},
            "model": {"modalities": {"image": IMAGE, "text": TEXT}}}
    from mmalign.build import build_model

    with pytest.raises(ConfigError, match="loss 'coca' needs model.caption"):
        build_model(load_config(base={**base, "loss": {"name": "coca"}}))
    with pytest.raises(ConfigError, match="use a loss with a caption term"):
        build_model(load_config(base={**base, "model": {**base["model"], "caption": CAPTION}}))
    with pytest.raises(ConfigError, match="model.caption.context 'audio' is not one of"):
        load_config(base={**base, "model": {**base["model"], "caption": {"context": "audio"}}})
    with pytest.raises(ConfigError, match="eval.caption.strategy must be greedy, beam or sample"):
        load_config(base={**base, "eval": {"caption": {"strategy": "nucleus"}}})
    with pytest.raises(ConfigError, match="does not combine with train.gradcache_chunk"):
        load_config(base={**base, "model": {**base["model"], "caption": CAPTION}, "train": {"gradcache_chunk": 4}})


def test_hf_tokenizer_and_labels_keep_eos(tiny_text_model):
    """A BERT tokenizer: [CLS] starts and [SEP] ends a caption; padding is marked by the mask, not the pad id."""
    tok = CaptionTokenizer(tiny_text_model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (101, 102, 0) and tok.vocab_size == 30522
    ids, mask, truncated = tok.encode(["a red square", "a picture of a square in blue"], max_length=7)
    assert ids[0, 0] == 101 and ids[0].tolist()[4] == 102 and mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert ids[1, -1] == 102 and truncated == 1
    assert tok.decode(ids) == ["a red square", "a picture of a square"]
    # a tokenizer that pads with its EOS id: labels still keep the real EOS and ignore only the padding
    eos = 7
    tokens = torch.tensor([[1, 5, eos, eos, eos]])
    labels = caption_targets(torch.zeros(1, 5, 9), tokens, torch.tensor([[1, 1, 1, 0, 0]])).labels
    assert labels.tolist() == [[5, eos, -100, -100]]


def test_open_clip_vit_tokens_feed_the_caption_head():
    import open_clip

    vit = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    open_clip.factory._MODEL_CONFIGS["mmalign-coca-test-vit"] = vit
    model = _model({"image": {"tower": "open_clip", "model": "mmalign-coca-test-vit", "image_size": 32},
                    "text": TEXT})
    tokens = model.modalities["text"].tokenize(["a red square", "a blue circle"])
    out = model({"image": torch.randn(2, 3, 32, 32), "text": tokens})
    assert model.adapters["image"].tower.token_dim == 32
    assert out.embeddings["image"].shape == out.embeddings["text"].shape == (2, 8)
    assert out.caption.logits.shape[:2] == out.caption.labels.shape == (2, tokens["input_ids"].shape[1] - 1)


def test_open_clip_coca_from_a_recipe_equals_open_clip(tmp_path):
    """An open_clip CoCa checkpoint loaded through a recipe (its image tower + the open_clip_coca text tower, the
    tower's own tokens as context) gives open_clip's image/text embeddings and caption logits; save/load keeps them."""
    from test_coca_heads import TINY_OPEN_CLIP

    from mmalign.heads import open_clip_coca

    torch.manual_seed(0)
    reference = open_clip_coca("coca_ViT-B-32", **TINY_OPEN_CLIP).eval()
    torch.save(reference.model.state_dict(), tmp_path / "coca.pt")
    common = {"model": "coca_ViT-B-32", "pretrained": str(tmp_path / "coca.pt"), "tower_kwargs": TINY_OPEN_CLIP,
              "proj": "none"}
    config = {"embed_dim": 64, "caption": {"context": "image", "n_queries": 0},
              "modalities": {"image": {"tower": "open_clip", "image_size": 32, **common},
                             "text": {"tower": "open_clip_coca", "max_length": 76, **common}}}
    model = AlignmentModel(from_dict(ModelConfig, config)).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.modalities["text"].tokenize(["a dog", "two cats on a sofa"])
    assert torch.equal(tokens["input_ids"], reference.tokenizer(["a dog", "two cats on a sofa"]))
    with torch.no_grad():
        expected = reference(images, tokens["input_ids"])
        out = model({"image": images, "text": tokens})
        embeddings = out.embeddings
        torch.testing.assert_close(embeddings["image"], torch.nn.functional.normalize(expected["image_embedding"]))
        torch.testing.assert_close(embeddings["text"], torch.nn.functional.normalize(expected["text_embedding"]))
        torch.testing.assert_close(out.caption.logits, expected["logits"][:, :-1])
        torch.testing.assert_close(model.encode("text", tokens), embeddings["text"])
    ours = model.generate_captions(images, GenerationConfig(max_length=4))
    context = reference.encode_image(images)[1]
    from mmalign.heads import generate

    ids = generate(reference.step, context, reference.bos_id, reference.eos_id, reference.pad_id, max_length=4)
    assert ours == reference.decode(ids)
    model.save_pretrained(tmp_path / "saved")
    again = AlignmentModel.from_pretrained(tmp_path / "saved").eval()
    assert again.generate_captions(images, GenerationConfig(max_length=4)) == ours
    with pytest.raises(ConfigError, match="n_queries 0 passes the tower's 64-wide tokens"):
        _model({"image": {"tower": "open_clip", "image_size": 32, **common}, "text": TEXT},
               caption={"context": "image", "n_queries": 0})
