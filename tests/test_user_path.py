"""The user's path of issue 17, end to end through the command line: each fault a new user met is now one error
line or a result that says what it is, and the evaluations people ask for exist (per-class recall, prompts per
class, a linear probe, the scored step)."""
import json
import logging
import re
import shutil
import tarfile

import pytest

from conftest import last_json, run_cli, run_in_process, run_main, tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(shapes_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("user-shards")
    code, stdout, err = run_main("data", "shards", "--from", str(shapes_dataset["csv"]), "--out", str(out),
                                 "--shard-size", "16")
    assert code == 0, err
    return json.loads(stdout.splitlines()[-1])["shards"]


@pytest.fixture(scope="module")
def trained(shards, shapes_dataset, tiny_text_model, tmp_path_factory):
    """A run directory trained for 6 steps (checkpoints at 3 and 6), with its recipe."""
    root = tmp_path_factory.mktemp("user-run")
    recipe = tiny_recipe(root / "recipe.yaml", root / "run", shards, tiny_text_model, shapes_dataset["classes"],
                         shapes_dataset["templates"])
    code, _, err = run_main("train", str(recipe))
    assert code == 0, err
    return {"run": root / "run", "recipe": recipe}


def one_error_line(code: int, err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("mmalign: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------------- tracebacks


def test_recipe_slips_are_one_line_before_anything_runs(trained, tmp_path):
    """A typo inside tower_kwargs (was a 32-line TypeError traceback) and image_size 0 (passed the check and failed
    in a DataLoader worker): one line each, and nothing trained."""
    typo = run_in_process("train", str(trained["recipe"]), "--set", f"run_dir={tmp_path / 'a'}",
                          "--set", "model.modalities.image.tower_kwargs={width: 16, detph: 4}", check=False)
    assert one_error_line(typo.returncode, typo.stderr) == (
        "mmalign: error: modality 'image': small_cnn tower_kwargs: unknown key 'detph' (did you mean 'depth'?); "
        "the tower takes width, depth, in_channels, norm")
    code, _, err = run_main("train", str(trained["recipe"]), "--set", f"run_dir={tmp_path / 'b'}",
                            "--set", "model.modalities.image.image_size=0")
    assert one_error_line(code, err).endswith("model.modalities.image.image_size must be a number >= 1, got 0")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no checkpoint, config or log written


def test_text_to_image_retrieval_with_several_captions_per_image(trained, shards, caplog):
    """--query text --gallery image crashed ('every query needs at least one positive'); now both directions are
    scored with each caption's image as its positive, the same numbers as the other way round."""
    code, out, err = run_main("eval", "retrieval", "--model", str(trained["run"]), "--data", shards,
                              "--query", "text", "--gallery", "image")
    assert code == 0, err
    t2i = json.loads(out.splitlines()[-1])
    code, out, _ = run_main("eval", "retrieval", "--model", str(trained["run"]), "--data", shards,
                            "--query", "image", "--gallery", "text")
    i2t = json.loads(out.splitlines()[-1])
    assert t2i["retrieval_n"] == i2t["retrieval_n"] == 48
    for key in ("t2i_R@1", "t2i_mAP", "i2t_R@5", "i2t_mAP@10"):
        assert t2i[f"retrieval_{key}"] == pytest.approx(i2t[f"retrieval_{key}"])
    # The 96 captions repeat (12 shape-colour pairs x 2 templates): said, with the count, and in the result.
    assert t2i["retrieval_distinct_text"] == 24
    assert any("96 text items have only 24 distinct embeddings" in r.message for r in caplog.records)
    code, out, _ = run_main("eval", "retrieval", "--model", str(trained["run"]), "--data", shards,
                            "--query", "text", "--gallery", "image", "--positives", "label")
    by_label = json.loads(out.splitlines()[-1])
    assert by_label["retrieval_match"] == "label" and "retrieval_distinct_text" not in by_label
    assert by_label["retrieval_t2i_R@1"] >= t2i["retrieval_t2i_R@1"]


# ------------------------------------------------------------------------------------------- silently wrong


def test_class_file_typo_fails_before_encoding_or_training(trained, shards, tmp_path, caplog):
    typo = tmp_path / "classes.txt"
    typo.write_text("square\ncircle\ntriangel\ncross\n")
    caplog.set_level(logging.DEBUG)
    code, _, err = run_main("eval", "zeroshot", "--model", str(trained["run"]), "--data", shards,
                            "--classes", str(typo))
    line = one_error_line(code, err)
    assert "12 sample(s) have labels not in" in line and "triangle (did you mean 'triangel'?)" in line
    assert "embed" not in err  # failed before the first batch was encoded
    code, _, err = run_main("train", str(trained["recipe"]), "--set", f"run_dir={tmp_path / 'run'}",
                            "--set", f"eval.zeroshot.classes={typo}")
    assert one_error_line(code, err).startswith("mmalign: error: eval.zeroshot: ")
    assert not (tmp_path / "run" / "checkpoints").exists()  # was found only after all of training


def test_zeroshot_prompts_per_class_recall_and_confusion(trained, shards, tmp_path):
    prompts = tmp_path / "classes.txt"
    prompts.write_text("square: a square\nsquare: a box with four equal sides\ncircle\ntriangle: a triangle\n"
                       "cross: a plus sign\n")
    code, out, err = run_main("eval", "zeroshot", "--model", str(trained["run"]), "--data", shards,
                              "--classes", str(prompts), "--templates", str(tmp_path / "none.txt"))
    assert "templates file not found" in one_error_line(code, err)
    code, out, err = run_main("eval", "zeroshot", "--model", str(trained["run"]), "--data", shards,
                              "--classes", str(prompts))
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    recall = result["zeroshot_per_class_recall"]
    assert list(recall) == ["square", "circle", "triangle", "cross"]
    confusion = result["zeroshot_confusion"]
    assert confusion["classes"] == list(recall) and [sum(row) for row in confusion["matrix"]] == [12] * 4
    assert recall == {c: pytest.approx(row[i] / 12) for i, (c, row) in enumerate(zip(recall, confusion["matrix"]))}
    assert result["zeroshot_top1"] == pytest.approx(sum(confusion["matrix"][i][i] for i in range(4)) / 48)
    assert result["model_step"] == 6


def test_eval_and_report_of_an_interrupted_run_name_the_scored_step(trained, shards, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    shutil.rmtree(run / "model")  # as if stopped after the step-6 checkpoint, before the end
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    code, out, err = run_main("eval", "retrieval", "--model", str(run), "--data", shards)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["model_step"] == 3 and result["model"].endswith("checkpoints/step_00000003/model")
    assert any("no final model" in r.message and "step 3" in r.message for r in caplog.records)
    code, out, err = run_main("report", str(run))
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["model_step"] == 3
    assert re.search(r"<th>model_step</th><td class='num'>3</td>", (run / "report.html").read_text())
    code, out, _ = run_main("eval", "retrieval", "--model", str(trained["run"]), "--data", shards)
    assert json.loads(out.splitlines()[-1])["model_step"] == 6  # the final model records its step


def test_linear_probe(trained, shards, tmp_path):
    train, test = shards.replace("{000000..000002}", "{000000..000001}"), shards.replace("{000000..000002}", "000002")
    code, out, err = run_main("eval", "linear-probe", "--model", str(trained["run"]), "--train-data", train,
                              "--data", test, "--batch-size", "16")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["linear_probe_n_train"] == 32 and result["linear_probe_n"] == 16
    assert 0 <= result["linear_probe_top1"] <= 1 and set(result["linear_probe_per_class_recall"]) == {
        "square", "circle", "triangle", "cross"}
    assert result["linear_probe_weight_decay"] > 0 and result["model_step"] == 6


def test_data_shards_validates_reports_shuffles_and_splits(shapes_dataset, tmp_path):
    from PIL import Image

    src = tmp_path / "textures"
    images = sorted((shapes_dataset["root"] / "images").iterdir())
    for i, cls in enumerate(["woven", "knitted"]):
        (src / cls).mkdir(parents=True)
        for path in images[i * 10:(i + 1) * 10]:
            shutil.copy(path, src / cls / path.name)
    (src / "felted").mkdir()  # an empty class folder
    Image.new("RGB", (64, 64), (200, 10, 10)).save(src / "woven" / "full.jpg")
    data = (src / "woven" / "full.jpg").read_bytes()
    (src / "woven" / "corrupt.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    out = tmp_path / "shards"
    proc = run_in_process("data", "shards", "--from", str(src), "--out", str(out), "--shard-size", "8")
    summary = last_json(proc)
    assert summary["samples"] == 21 and summary["skipped"] == {"bad image": 1}
    assert summary["skipped_files"][0]["file"] == str(src / "woven" / "corrupt.jpg")
    assert "truncated" in summary["skipped_files"][0]["reason"].lower() and summary["empty_classes"] == ["felted"]
    assert "class folder" in proc.stderr and "felted is empty" in proc.stderr
    read = [tarfile.open(p).extractfile(m).read().decode() for p in sorted(out.glob("*.tar"))
            for m in tarfile.open(p) if m.name.endswith("label.txt")]
    assert len(read) == 21 and read[:10] != sorted(read)[:10]  # shuffled across shards, not in class order

    again = run_in_process("data", "shards", "--from", str(src), "--out", str(out), check=False)
    assert "already holds 3 shard(s)" in one_error_line(again.returncode, again.stderr) and "--overwrite" in again.stderr
    split = last_json(run_in_process("data", "shards", "--from", str(src), "--out", str(out), "--overwrite",
                                     "--split", "test=0.2"))
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]  # old ones removed
    assert split["splits"]["test"]["samples"] == 4 and split["splits"]["train"]["samples"] == 17  # 2 of 11, 2 of 10
    strict = run_in_process("data", "shards", "--from", str(src), "--out", str(tmp_path / "strict"), "--strict",
                            check=False)
    assert "corrupt.jpg" in one_error_line(strict.returncode, strict.stderr)
    assert not list((tmp_path / "strict").glob("*.tar"))

    csv = tmp_path / "pairs.csv"
    csv.write_text(f"image,text\n{images[0]},a square\n{images[1]},\n{images[2]},a circle\n")
    summary = last_json(run_in_process("data", "shards", "--from", str(csv), "--out", str(tmp_path / "csv")))
    assert summary["samples"] == 2 and summary["skipped"] == {"empty caption": 1}
    assert summary["skipped_files"] == [{"file": f"{csv} line 3", "reason": "empty caption"}]


def test_training_ends_its_data_workers(trained, tmp_path):
    """A finished run leaves no DataLoader worker behind, even while garbage collection is off: one left for the
    interpreter's exit (the loader held in a reference cycle) ignored multiprocessing's SIGTERM and hung
    ``mmalign train`` after its result (about 1 in 3 CLI runs of the compute-threads test below)."""
    import gc
    import multiprocessing

    gc.disable()
    try:
        code, _, err = run_main("train", str(trained["recipe"]), "--set", f"run_dir={tmp_path / 'run'}", "--set",
                                "data.num_workers=1", "--set", "train.steps=14", "--set", "train.checkpoint_every=100")
        left = multiprocessing.active_children()
    finally:
        gc.enable()
    for worker in left:
        worker.kill()  # so that a failure here does not hang the test process at its exit
    assert code == 0, err
    assert not left


def test_compute_threads_are_logged_and_keep_the_cores_light_workers_leave(trained, tmp_path):
    """With a data worker on a small machine the loop kept one thread per core left after a whole core per worker
    (1 of 2); now it measures the worker's load and keeps ceil(cores - load) threads, and says so."""
    proc = run_cli("train", str(trained["recipe"]), "--set", f"run_dir={tmp_path / 'run'}", "--set",
                   "data.num_workers=1", "--set", "train.steps=14", "--set", "train.checkpoint_every=100",
                   threads=None)
    import math
    import os

    cores = len(os.sched_getaffinity(0))
    start = re.search(r"compute threads: (\d+) \((\d+) core\(s\) for this process; 1 data worker\(s\)\)", proc.stderr)
    assert start and int(start[2]) == cores, proc.stderr[-2000:]
    measured = re.search(r"data workers kept ([\d.]+) core\(s\) busy over steps 3-13: compute threads (\d+) -> (\d+)",
                         proc.stderr)
    assert measured, proc.stderr[-2000:]
    load, before, after = float(measured[1]), int(measured[2]), int(measured[3])
    assert after == max(1, min(before, math.ceil(cores - load - 1e-6)))
    assert load < 1 and after == before  # a light worker leaves the loop its threads
