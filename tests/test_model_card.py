"""`mmalign export` writes a model card (README.md, Hugging Face convention) with the run's recipe and results."""
import json

import pytest
import yaml

from mmalign.cli import main
from mmalign.model_card import base_checkpoint, front_matter

pytestmark = pytest.mark.slow


def read_card(path) -> tuple[dict, str]:
    """(front matter, body) of a README.md as the hub splits it: YAML between the first two '---' lines."""
    text = path.read_text()
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def test_export_writes_a_model_card_with_results_and_recipe(tiny_hf_clip, shapes_dataset, tmp_path):
    from mmalign.data.shards import write_shards

    shards = write_shards(shapes_dataset["csv"], tmp_path / "shards", shard_size=48)["shards"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""run_dir: {tmp_path / 'run'}
model:
  embed_dim: 12
  modalities:
    image: {{tower: hf_clip, model: '{tiny_hf_clip}', lora: {{r: 4, alpha: 8}}}}
    text: {{tower: hf_clip, model: '{tiny_hf_clip}', lock: true}}
data: {{train: '{shards}', batch_size: 8, shuffle_buffer: 8, num_workers: 0}}
train: {{steps: 2, lr: 0.01, warmup_steps: 0, checkpoint_every: 2, log_every: 1}}
eval:
  zeroshot: {{data: '{shards}', classes: '{shapes_dataset['classes']}', templates: '{shapes_dataset['templates']}'}}
  retrieval: {{data: '{shards}', query: image, gallery: text}}
""")
    assert main(["train", str(recipe)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for source in ("run", "run/model"):  # a run directory, or its model folder
        out = tmp_path / f"hf-{source.replace('/', '-')}"
        assert main(["export", "--model", str(tmp_path / source), "--to", str(out), "--format", "hf"]) == 0
        meta, body = read_card(out / "README.md")
        assert meta["library_name"] == "transformers"  # the dual layout: CLIPModel.from_pretrained(out)
        assert meta["tags"] == ["mmalign", "multimodal", "contrastive-learning", "clip", "image", "text"]
        assert meta["pipeline_tag"] == "zero-shot-image-classification"
        assert "base_model" not in meta  # a local folder is no hub id; the body names it
        assert f"| image | image | hf_clip | {tiny_hf_clip} | LoRA (r=4) |" in body
        assert f"| text | text | hf_clip | {tiny_hf_clip} | locked |" in body
        for key in ("zeroshot_top1", "retrieval_i2t_R@1", "steps"):
            assert f"| {key} | {results[key]:.4g} |" in body
        saved_recipe = yaml.safe_load(body.split("```yaml\n", 1)[1].split("\n```", 1)[0])
        assert saved_recipe == json.loads((tmp_path / "run" / "config.json").read_text())

    # A model folder without its run: the card says what it lacks instead of inventing it.
    (tmp_path / "lone").mkdir()
    (tmp_path / "run" / "model").rename(tmp_path / "lone" / "model")
    assert main(["export", "--model", str(tmp_path / "lone" / "model"), "--to", str(tmp_path / "lone-hf")]) == 0
    meta, body = read_card(tmp_path / "lone-hf" / "README.md")
    assert meta["library_name"] == "transformers" and "No `results.json` was found" in body
    assert "| image | image | ? | unknown (no training recipe found) | ? |" in body


def test_front_matter_lists_hub_checkpoints_as_base_models():
    recipe = {"loss": {"name": "siglip"}, "model": {"modalities": {
        "image": {"tower": "open_clip", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        "text": {"tower": "hf", "model": "sentence-transformers/all-MiniLM-L6-v2"},
        "audio": {"tower": "hf", "model": "MIT/ast-finetuned-audioset-10-10-0.4593", "init": "scratch"},
        "ecg": {"tower": "resnet1d"}}}}
    kinds = {"image": "image", "text": "text", "audio": "audio", "ecg": "timeseries"}
    meta = front_matter(kinds, recipe, "towers")
    assert meta["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert meta["library_name"] == "mmalign" and meta["pipeline_tag"] == "feature-extraction"
    assert meta["tags"][3:] == ["siglip", "audio", "image", "text", "timeseries"]
    sections = recipe["model"]["modalities"]
    assert base_checkpoint(sections["image"]) == "ViT-B-32 (laion2b_s34b_b79k)"
    assert base_checkpoint(sections["audio"]) is None and base_checkpoint(sections["ecg"]) is None
    assert front_matter({"a": "audio", "t": "text"}, {}, "open_clip")["pipeline_tag"] == "zero-shot-audio-classification"
