"""The benchmarks' quick modes run on tiny sizes and write well-formed results sections."""
import json

import pytest

from benchmarks import bench_losses
from benchmarks._results import update_results


@pytest.mark.slow
def test_quick_bench_writes_results(tmp_path):
    argv = ["--quick", "--sizes", "64", "128", "--dim", "64", "--no-gpu", "--out-dir", str(tmp_path)]
    assert bench_losses.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    section = data["sections"]["losses_cpu_quick"]
    rows = section["rows"]
    assert rows[0]["kind"] == "machine" and rows[0]["cpus"] >= 1
    meas = [r for r in rows if r["kind"] == "measurement"]
    assert {(r["method"], r["B"]) for r in meas} == {(m, B) for m in bench_losses.METHODS for B in (64, 128)}
    for r in meas:
        assert r["status"] == "ok" and r["time_s"] > 0 and r["peak_mb"] is not None
        assert r["time_vs_open_clip"] > 0
    md = (tmp_path / "results.md").read_text()
    assert {r["block"] for r in meas if "chunked" in r["method"]} == {64, 128}  # one block at these sizes
    assert "## losses_cpu_quick" in md and "| B | method | block | time (s)" in md
    assert "chunked_clip_loss" in md and "chunked_siglip_loss" in md


def test_update_results_keeps_other_sections(tmp_path):
    update_results("a", [{"x": 1}], "table A", out_dir=tmp_path)
    update_results("b", [{"y": 2}], "table B", out_dir=tmp_path)
    update_results("a", [{"x": 3}], "table A2", out_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["sections"]) == ["a", "b"] and data["sections"]["a"]["rows"] == [{"x": 3}]
    md = (tmp_path / "results.md").read_text()
    assert "table A2" in md and "table B" in md and "table A\n" not in md


def _section(out_dir, name: str) -> tuple[dict, str]:
    data = json.loads((out_dir / "results.json").read_text())
    return data["sections"][name], (out_dir / "results.md").read_text()


@pytest.mark.slow
def test_quick_data_bench_compares_both_loaders(tmp_path):
    from benchmarks import bench_data

    assert bench_data.main(["--quick", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")]) == 0
    section, md = _section(tmp_path, "data_cpu_quick")
    rows = section["rows"]
    passes = [r for r in rows if r["kind"] == "pass"]
    assert {r["method"] for r in passes} == set(bench_data.METHODS) and len(passes) == 4 * len(bench_data.DATASETS)
    quick_samples = {name: spec["samples"][1] for name, spec in bench_data.DATASETS.items()}
    assert all(r["samples"] == quick_samples[r["dataset"]] and r["skipped"] == 0 and r["samples_per_s"] > 0
               for r in passes)
    summary = [r for r in rows if r["kind"] == "summary"]
    assert len(summary) == 2 * len(bench_data.DATASETS)
    assert all(s["samples_per_s"] > 0 and s["samples_per_cpu_s"] > 0 for s in summary)
    ratios = {r["dataset"]: r for r in rows if r["kind"] == "ratio"}
    assert set(ratios) == set(bench_data.DATASETS) and all(r["ratio"] > 0 and r["cpu_ratio"] > 0
                                                           for r in ratios.values())
    assert "## data_cpu_quick" in md and "| mmalign |" in md and "| webdataset |" in md
    assert "jpeg: 32 JPEGs of 256-512 px" in md


@pytest.mark.slow
def test_quick_train_step_bench_times_both_loops(tmp_path):
    from benchmarks import bench_train_step

    assert bench_train_step.main(["--quick", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")]) == 0
    section, md = _section(tmp_path, "train_step_cpu_quick")
    rows = section["rows"]
    summary = [r for r in rows if r["kind"] == "summary"]
    variants = {(r["setting"], r["compiled"]) for r in summary}
    assert variants == {("clip", False), ("clip", True), ("lit_locked_text", False), ("lit_locked_image", False),
                        ("clip_resnet", False), ("clip_resnet_channels_last", False)}
    assert {(r["setting"], r["compiled"], r["method"]) for r in summary} == {
        (*v, m) for v in variants for m in bench_train_step.METHODS}
    for s in summary:
        assert s["timed_steps"] == 2 and s["median_step_s"] > 0
    by = {(r["setting"], r["compiled"], r["method"]): r for r in summary}
    for setting, compiled in variants:  # the same network (mmalign's text tower drops open_clip's logit_scale)
        mine, theirs = by[(setting, compiled, "mmalign")], by[(setting, compiled, "open_clip")]
        assert mine["params"] == theirs["params"] and mine["trainable"] == theirs["trainable"]
    assert by[("lit_locked_image", False, "mmalign")]["trainable"] < by[("clip", False, "mmalign")]["trainable"]
    assert all(r["ratio"] > 0 for r in rows if r["kind"] == "ratio")
    assert "## train_step_cpu_quick" in md and "| lit_locked_text | mmalign |" in md and "| open_clip |" in md
    assert "channels-last: mmalign's ResNet step with / without `train.channels_last` = " in md


@pytest.mark.slow
def test_quick_eval_bench_compares_mmalign_with_a_plain_loop(tmp_path):
    from benchmarks import bench_eval

    assert bench_eval.main(["--quick", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")]) == 0
    section, md = _section(tmp_path, "eval_zeroshot_cpu_quick")
    passes = [r for r in section["rows"] if r["kind"] == "pass"]
    assert sorted(r["method"] for r in passes) == sorted(bench_eval.METHODS)
    assert all(r["images"] == 64 and 0 <= r["top1"] <= 1 and r["samples_per_s"] > 0 for r in passes)
    assert {r["method"] for r in section["rows"] if r["kind"] == "ratio"} == {"mmalign", "mmalign, 0 workers"}
    assert "## eval_zeroshot_cpu_quick" in md and "| plain loop |" in md
