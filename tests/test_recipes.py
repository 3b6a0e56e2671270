"""The shipped recipes: listed, printed and trained by name from any folder (they live inside the package)."""
import pytest
import yaml

from conftest import last_json, run_cli, run_in_process

from mmalign import __version__, recipes
from mmalign.cli import main
from mmalign.config import load_config


def test_recipes_lists_every_shipped_recipe_and_show_prints_one_to_start_from(tmp_path):
    listed = run_cli("recipes", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in listed] == recipes.names()
    assert {"lit_image_text", "clap_audio_text", "ecg_text", "cwcl", "symile", "gram", "coca"} <= set(recipes.names())
    lit = next(line for line in listed if line.startswith("lit_image_text"))
    assert lit.split()[1:3] == ["clip", "image+text"] and "LiT (Zhai et al. 2022): a small image tower" in lit

    shown = run_cli("recipes", "show", "lit_image_text", cwd=tmp_path).stdout
    assert shown == recipes.text("lit_image_text") and shown.startswith("# LiT")
    (tmp_path / "my.yaml").write_text(shown)  # `mmalign recipes show NAME > my.yaml`
    cfg = load_config(tmp_path / "my.yaml", ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.model.modalities["text"].lock

    proc = run_cli("recipes", "show", "lit_image_txt", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "mmalign: error: no shipped recipe named 'lit_image_txt' (did you mean 'lit_image_text'?); recipes: "
        + ", ".join(recipes.names())]


def test_summary_is_the_first_sentence_of_the_leading_comment():
    assert recipes.summary("# CoCa (Yu et al. 2022): both towers. `mmalign demo coca` builds.\n# More.\nseed: 0\n") \
        == "CoCa (Yu et al. 2022): both towers"
    assert recipes.summary("seed: 0\n# not a leading comment\n") == ""


def test_version_and_python_dash_m(tmp_path):
    assert run_cli("--version", cwd=tmp_path).stdout == f"mmalign {__version__}\n"
    assert "recipes" in run_cli("--help", cwd=tmp_path).stdout


@pytest.mark.slow
def test_train_takes_a_shipped_recipe_by_name_from_any_folder(tmp_path, shapes_dataset, tiny_text_model, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = last_json(run_in_process("data", "shards", "--from", str(shapes_dataset["csv"]), "--out",
                                      str(tmp_path / "s"), "--shard-size", "48"))["shards"]
    sets = [f"data.train={shards}", f"run_dir={tmp_path / 'run'}", f"model.modalities.text.model={tiny_text_model}",
            "train.steps=2", "train.warmup_steps=1", "data.batch_size=8", "data.num_workers=0",
            f"eval.zeroshot.data={shards}", f"eval.zeroshot.classes={shapes_dataset['classes']}",
            f"eval.zeroshot.templates={shapes_dataset['templates']}", f"eval.retrieval.data={shards}"]
    result = last_json(run_in_process("train", "lit_image_text", *(a for s in sets for a in ("--set", s))))
    assert result["steps"] == 2 and 0.0 <= result["zeroshot_top1"] <= 1.0
    saved = yaml.safe_load((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"]["name"] == "clip" and saved["model"]["modalities"]["text"]["lock"] is True

    for wrong in ("lit_image_txt", "configs/lit_image_text.yaml"):  # a typo, or a path that does not exist
        assert main(["train", wrong]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "(did you mean 'lit_image_text'?)" in err
        assert err.startswith(f"mmalign: error: recipe not found: {wrong}: no such file")
