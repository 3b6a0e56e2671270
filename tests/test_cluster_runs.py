"""Runs that survive clusters, through the CLI: damaged checkpoints are skipped for the newest one that verifies,
stop signals end a run with a checkpoint and exit code 75, one run per folder, full or read-only disks, frozen towers
stored once per run, and evaluation of damaged or empty runs as one error line."""
import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    REPO, cli_env, last_json, metrics_rows, run_cli, run_in_process, shape_sample, start_cli, tiny_recipe,
    torchrun_cli, write_shard,
)
from mmalign.config import load_config, recipe_changes, to_dict
from mmalign.errors import MMAlignError
from mmalign.io import failed_errno, file_digest, verify_manifest, write_manifest, writing
from mmalign.model import AlignmentModel
from mmalign.preemption import StopRequests
from mmalign.rundir import checkpoint_dirs
from mmalign.runlock import RunLock

STOPPED = 75  # mmalign.errors.RunStopped.exit_code


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two shards of 20 samples: with batches of 4, each of 2 DataLoader workers reads 5 batches per epoch."""
    root = tmp_path_factory.mktemp("cluster-shards")
    write_shard(root / "train-0.tar", [shape_sample(i) for i in range(20)])
    write_shard(root / "train-1.tar", [shape_sample(i) for i in range(20, 40)])
    return str(root / "train-{0..1}.tar")


def recipe(folder: Path, name: str, shards: str, text_model: str) -> Path:
    """``folder/NAME.yaml``: the tiny recipe, run directory ``folder/NAME``."""
    return tiny_recipe(folder / f"{name}.yaml", folder / name, shards, text_model)


LOCKED = ["--set", "model.modalities.text.lock=true"]  # a frozen tower: stored once per run, outside the checkpoints


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_error_line(proc: subprocess.CompletedProcess, expected: str, label: str = "error") -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mmalign: ")]
    assert len(lines) == 1 and lines[0].startswith(f"mmalign: {label}: ") and expected in lines[0], proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): file_digest(p) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(shards, tiny_text_model, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6: the uninterrupted reference."""
    folder = tmp_path_factory.mktemp("finished")
    run_cli("train", str(recipe(folder, "run", shards, tiny_text_model)), *LOCKED)
    return folder / "run"


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the finished run without its final model, and the arguments that train it again."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "model")
    return run, ["train", str(finished.parent / "run.yaml"), *LOCKED, "--set", f"run_dir={run}"]


# ----------------------------------------------------------------------------------------------- frozen towers


@pytest.mark.slow
def test_frozen_towers_are_stored_once_per_run_and_the_final_model_is_whole(finished):
    (frozen,) = (finished / "checkpoints" / "frozen").iterdir()
    assert frozen.name.startswith("text-") and frozen.suffix == ".safetensors"
    assert "model.embeddings.word_embeddings.weight" in load_file(frozen)  # the tower's own state dict
    for checkpoint in checkpoint_dirs(finished):
        keys = load_file(checkpoint / "model" / "model.safetensors").keys()
        assert keys and not any(k.startswith("adapters.text.tower.") for k in keys)
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert manifest["outside"] == {f"../frozen/{frozen.name}": file_digest(frozen)}
        assert verify_manifest(checkpoint) is None
    final = weights(finished)
    assert any(k.startswith("adapters.text.tower.") for k in final)
    model = AlignmentModel.from_pretrained(finished / "model")  # self-contained: no run directory needed
    assert torch.equal(model.state_dict()["adapters.text.tower.model.embeddings.word_embeddings.weight"],
                       final["adapters.text.tower.model.embeddings.word_embeddings.weight"])


# ----------------------------------------------------------------------------------------------- damaged checkpoints


def poison(path: Path, marker: Path) -> None:
    """Replace ``path`` by a pickle that would create ``marker`` if it were ever unpickled."""

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path.write_bytes(pickle.dumps({"state": Payload()}))


def damage(checkpoint: Path, how: str, tmp_path: Path) -> str:
    """Damage a checkpoint; returns what the warning about it must say."""
    weights_file = checkpoint / "model" / "model.safetensors"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    if how == "truncated safetensors":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
        return "model/model.safetensors has 1000 bytes"
    if how == "missing manifest entry":
        del manifest["files"]["optimizer.pt"]
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
        return "optimizer.pt is not in manifest.json"
    if how == "flipped byte":
        data = bytearray(weights_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights_file.write_bytes(bytes(data))
        return "model/model.safetensors does not match its SHA-256"
    # A poisoned optimizer.pt with a manifest updated to match: only weights_only loading stands in the way.
    poison(checkpoint / "optimizer.pt", tmp_path / "pwned")
    manifest["files"]["optimizer.pt"] = file_digest(checkpoint / "optimizer.pt")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return "cannot be loaded (UnpicklingError: Weights only load failed"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated safetensors", "missing manifest entry", "flipped byte",
                                 "poisoned optimizer.pt"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(how, finished, tmp_path):
    run, train = copy_of(finished, tmp_path)
    expected = damage(run / "checkpoints" / "step_00000006", how, tmp_path)
    proc = run_in_process(*train)
    warnings = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == 1 and "step_00000006" in warnings[0] and expected in warnings[0], proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step_00000003 (step 3)" in proc.stderr
    assert_same_weights(weights(finished), weights(run))  # steps 4-6 again: the uninterrupted run's weights
    assert verify_manifest(run / "checkpoints" / "step_00000006") is None  # written anew
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_error_and_nothing_is_deleted(finished, tmp_path):
    run, train = copy_of(finished, tmp_path)
    (frozen,) = (run / "checkpoints" / "frozen").iterdir()  # shared by both checkpoints, covered by their manifests
    data = bytearray(frozen.read_bytes())
    data[-10] ^= 0xFF
    frozen.write_bytes(bytes(data))
    before = snapshot(run)
    proc = run_in_process(*train, check=False)
    assert proc.returncode == 2
    line = one_error_line(proc, "no checkpoint to resume from: step_00000006: ")
    assert "step_00000003: " in line and f"../frozen/{frozen.name} does not match its SHA-256" in line
    assert snapshot(run) == before
    for command in (["eval", "retrieval", "--model", str(run), "--data", "unused.tar"],
                    ["export", "--model", str(run), "--to", str(tmp_path / "export")]):
        proc = run_in_process(*command, check=False)
        assert proc.returncode == 2
        one_error_line(proc, f"no model found at {run}: no final model, and no checkpoint verifies")


@pytest.mark.slow
def test_resume_from_picks_a_checkpoint_and_no_resume_only_starts_new_runs(finished, tmp_path):
    run, train = copy_of(finished, tmp_path)
    damage(run / "checkpoints" / "step_00000003", "flipped byte", tmp_path)
    proc = run_in_process(*train, "--resume-from", str(run / "checkpoints" / "step_00000003"), check=False)
    assert proc.returncode == 2
    one_error_line(proc, "no checkpoint to resume from: step_00000003: model/model.safetensors does not match")
    proc = run_in_process(*train, "--resume-from", str(finished / "checkpoints" / "step_00000003"))
    assert f"resuming from {finished / 'checkpoints' / 'step_00000003'} (step 3)" in proc.stderr
    assert_same_weights(weights(finished), weights(run))

    proc = run_in_process(*train, "--no-resume", check=False)
    assert proc.returncode == 2
    one_error_line(proc, f"--no-resume (train.resume: false) starts a new run, but {run} already holds one")
    fresh = tmp_path / "fresh"
    proc = run_in_process(*train[:-1], f"run_dir={fresh}", "--no-resume", "--set", "train.steps=1")
    assert "resuming" not in proc.stderr and last_json(proc)["steps"] == 1


# ----------------------------------------------------------------------------------------------- eval on bad runs


@pytest.mark.slow
def test_eval_export_and_report_of_empty_or_damaged_runs_are_one_line(finished, shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(to_dict(load_config(finished.parent / "run.yaml"))))
    cut = tmp_path / "cut"
    shutil.copytree(finished, cut)
    model_file = cut / "model" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    cases = [
        (["eval", "zeroshot", "--model", str(empty), "--data", "x.tar", "--classes", "c.txt"], "no model found at"),
        (["eval", "retrieval", "--model", str(cut), "--data", "x.tar"], f"cannot load weights from {model_file}"),
        (["export", "--model", str(cut / "model"), "--to", str(tmp_path / "out")], "cannot load weights from"),
        (["report", str(cut)], "cannot load weights from"),
        (["report", str(tmp_path / "nothing")], "not a run directory"),
    ]
    for command, expected in cases:
        proc = run_in_process(*command, check=False)
        assert proc.returncode == 2, command
        one_error_line(proc, expected)

    # A run without a final model yet is evaluated on its newest checkpoint, frozen towers included.
    shutil.rmtree(cut / "model")
    proc = run_in_process("eval", "retrieval", "--model", str(cut), "--data", shards, "--query", "image")
    assert "using its checkpoint step_00000006" in proc.stderr and last_json(proc)["retrieval_n"] == 40


# ----------------------------------------------------------------------------------------------- stop signals


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run has logged ``step`` (log_every: 1)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {timeout} s")


# 2 DataLoader workers reading 5 batches each per epoch; no checkpoint but the one a stop signal asks for.
SIGNALLED = [*LOCKED, "--set", "data.num_workers=2", "--set", "data.batch_size=4", "--set", "train.checkpoint_every=100"]


@pytest.mark.slow
def test_sigterm_with_workers_checkpoints_stops_with_75_and_resumes_bit_identically(shards, tiny_text_model,
                                                                                    tmp_path):
    """One process with 2 DataLoader workers; while it runs, a second run on its folder is refused."""
    sets = [*SIGNALLED, "--set", "train.steps=14"]
    straight = run_cli("train", str(recipe(tmp_path, "straight", shards, tiny_text_model)), *sets)
    assert last_json(straight)["steps"] == 14

    train = ["train", str(recipe(tmp_path, "stopped", shards, tiny_text_model)), *sets]
    run = tmp_path / "stopped"
    proc = start_cli(*train, log=tmp_path / "stopped.log")
    wait_for_step(run, 2, proc)
    os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-run: its lock stays taken
    try:
        second = run_in_process(*train, check=False)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert second.returncode == 2
    one_error_line(second, f"run directory {run} is in use by process {proc.pid} on {socket.gethostname()}")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == STOPPED
    log = (tmp_path / "stopped.log").read_text()
    assert "Traceback" not in log and "stop requested (SIGTERM): writing a checkpoint after step" in log
    (step,) = [p.name for p in checkpoint_dirs(run)]
    stopped_at = int(step.split("_")[1])
    assert 2 <= stopped_at < 14
    assert f"mmalign: stopped: SIGTERM: stopped after step {stopped_at} of 14, checkpoint {run / 'checkpoints' / step}" \
        f" written; run the same command to resume" in log
    assert verify_manifest(run / "checkpoints" / step) is None and not (run / "model").exists()

    resumed = run_cli(*train)
    assert f"(step {stopped_at})" in resumed.stderr
    assert_same_weights(weights(tmp_path / "straight"), weights(run))
    rows = [row["step"] for row in metrics_rows(run)]
    assert rows == list(range(1, 15))


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_torchrun_stops_both_processes_at_one_checkpoint(shards, tiny_text_model, tmp_path):
    env = cli_env(CUDA_VISIBLE_DEVICES="")
    sets = [*SIGNALLED, "--set", "train.steps=16"]
    for name in ("straight", "stopped"):
        recipe(tmp_path, name, shards, tiny_text_model)
    straight = subprocess.run(torchrun_cli("train", str(tmp_path / "straight.yaml"), *sets), env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run, log = tmp_path / "stopped", tmp_path / "stopped.log"
    command = torchrun_cli("train", str(tmp_path / "stopped.yaml"), *sets)
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wait_for_step(run, 2, proc)
    os.kill(proc.pid, signal.SIGTERM)  # as Kubernetes does: torchrun passes it on to both processes
    proc.wait(timeout=120)
    text = log.read_text()
    (step,) = [p.name for p in checkpoint_dirs(run)]
    stopped_at = int(step.split("_")[1])
    assert text.count("mmalign: stopped: ") == 2 and text.count(f"stopped after step {stopped_at} of 16") == 2, text
    state = json.loads((run / "checkpoints" / step / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and 2 <= stopped_at < 16

    resumed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "straight"), weights(run))


def test_stop_requests_take_sigterm_sigusr1_and_a_second_ctrl_c_stops_at_once():
    for first in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        before = signal.getsignal(first)
        with StopRequests() as stop:
            os.kill(os.getpid(), first)
            assert stop.requested and stop.signal == first.name
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(first) is before


# ----------------------------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_stale_lock_is_taken_over(shards, tiny_text_model, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    proc = run_in_process("train", str(recipe(tmp_path, "run", shards, tiny_text_model)), "--set", "train.steps=1")
    assert f"took over the lock of process {dead.pid} on {socket.gethostname()}" in proc.stderr
    assert (run / "train.lock").read_text() == ""  # released at the end


def test_without_file_locking_the_pid_and_host_decide(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    (tmp_path / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(MMAlignError, match=f"in use by process {os.getppid()} on {socket.gethostname()}"):
        RunLock(tmp_path).__enter__()
    (tmp_path / "train.lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname()}))
    with RunLock(tmp_path):  # that pid runs nowhere: stale
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------- full or read-only disks


def test_a_lock_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(MMAlignError, match=r"cannot write .*train\.lock \(No space left on device\)"):
        RunLock(tmp_path).__enter__()


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_earlier_ones_and_is_one_line(shards, tiny_text_model, tmp_path,
                                                                            monkeypatch):
    train = ["train", str(recipe(tmp_path, "run", shards, tiny_text_model)), *LOCKED]
    run = tmp_path / "run"
    monkeypatch.setenv("MMALIGN_FAIL_AT", "checkpoint:6:ENOSPC")
    proc = run_in_process(*train, check=False)
    monkeypatch.delenv("MMALIGN_FAIL_AT")
    assert proc.returncode == 2
    one_error_line(proc, f"cannot write {run / 'checkpoints' / 'step_00000006'}: No space left on device; it needs "
                         f"about ")
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000003"]
    assert verify_manifest(run / "checkpoints" / "step_00000003") is None
    assert not list((run / "checkpoints").glob(".*")) and not (run / "model").exists()
    rows = [row["step"] for row in metrics_rows(run)]
    assert rows == list(range(1, 7))  # every line whole; cut back to step 3 when the run resumes

    resumed = run_in_process(*train)
    assert "(step 3)" in resumed.stderr and last_json(resumed)["steps"] == 6
    assert [row["step"] for row in metrics_rows(run)] == rows


def mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs at ``folder`` (root only), or skip the test."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may write in: read-only for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "readonly"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        mount_tmpfs(folder, "ro,size=1m")
        yield folder
        subprocess.run(["umount", "-l", str(folder)])


@pytest.mark.slow
def test_an_unwritable_run_directory_is_refused_before_training(unwritable, shards, tiny_text_model, tmp_path):
    run = unwritable / "run"
    recipe(tmp_path, "run", shards, tiny_text_model)
    proc = run_in_process("train", str(tmp_path / "run.yaml"), "--set", f"run_dir={run}", check=False)
    assert proc.returncode == 2
    one_error_line(proc, f"run directory {run} is not writable (")
    assert "training" not in proc.stderr


@pytest.mark.slow
def test_a_really_full_disk_during_a_checkpoint(shards, tiny_text_model, tmp_path):
    """The same on a full tmpfs: the writers' own errors (torch, safetensors, tokenizers) become one line."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=32m")
    try:
        recipe(tmp_path, "run", shards, tiny_text_model)
        train = ["train", str(tmp_path / "run.yaml"), *LOCKED, "--set", f"run_dir={disk / 'run'}"]
        run_in_process(*train, "--set", "train.steps=3")
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 200_000))  # room for logs, not for a checkpoint
        proc = run_in_process(*train, check=False)
        assert proc.returncode == 2
        one_error_line(proc, "No space left on device; it needs about ")
        assert [p.name for p in checkpoint_dirs(disk / "run")] == ["step_00000003"]
        assert verify_manifest(disk / "run" / "checkpoints" / "step_00000003") is None
        (disk / "filler").unlink()
        assert last_json(run_in_process(*train))["steps"] == 6
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_disk_errors_are_found_in_what_the_writers_raise(tmp_path):
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert failed_errno(wrapped) == errno.ENOSPC  # torch.save into an open file
    assert failed_errno(Exception("Error while serializing: I/O error: Read-only file system (os error 30)")) == 30
    with pytest.raises(MMAlignError, match=r"cannot write .*x: Disk quota exceeded; it needs about 2\.0 MB, "):
        with writing(tmp_path / "x", needed=2_000_000):
            raise OSError(errno.EDQUOT, "quota")
    with pytest.raises(ValueError):  # not the disk: a bug, raised as it is
        with writing(tmp_path / "x"):
            raise ValueError("bug")


def test_manifests_find_missing_added_cut_and_changed_files(tmp_path):
    (tmp_path / "a").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("world")
    assert verify_manifest(tmp_path) == "no manifest.json (written last: the folder is incomplete)"
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is None
    (tmp_path / "c").write_text("new")
    assert verify_manifest(tmp_path) == "c is not in manifest.json"
    (tmp_path / "c").unlink()
    (tmp_path / "sub" / "b").write_text("worlds")
    assert verify_manifest(tmp_path) == "sub/b has 6 bytes, manifest.json says 5"
    (tmp_path / "sub" / "b").write_text("wOrld")
    assert verify_manifest(tmp_path) == "sub/b does not match its SHA-256 in manifest.json"
    (tmp_path / "sub" / "b").unlink()
    assert verify_manifest(tmp_path) == "sub/b is missing"


# ----------------------------------------------------------------------------------------------- changed recipes


def test_recipe_changes_that_shape_the_model_or_data_are_refused_others_applied():
    lit = REPO / "recipes" / "lit_image_text.yaml"
    saved = to_dict(load_config(lit))
    new = to_dict(load_config(lit, ["model.modalities.image.image_size=96", "train.lr=0.001", "train.steps=900",
                                    "data.num_workers=0", "run_dir=elsewhere", "eval.batch_size=64"]))
    refused, applied = recipe_changes(saved, new)
    assert refused == ["model.modalities.image.image_size: 16 -> 96", "train.lr: 0.002 -> 0.001"]
    assert applied == ["data.num_workers: 1 -> 0", "eval.batch_size: 256 -> 64",
                       "run_dir: 'runs/demo-lit' -> 'elsewhere'", "train.steps: 300 -> 900"]


@pytest.mark.slow
def test_a_finished_run_rerun_with_another_image_size_is_refused_and_safe_changes_are_applied(finished, tmp_path):
    """Issue 17's example: re-running a finished run with ``--set model.modalities.image.image_size=96`` evaluated
    the 16-px model at 96 px and rewrote config.json to say 96."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    train = ["train", str(finished.parent / "run.yaml"), *LOCKED, "--set", f"run_dir={run}"]
    before = snapshot(run)
    proc = run_in_process(*train, "--set", "model.modalities.image.image_size=96", check=False)
    assert proc.returncode == 2
    one_error_line(proc, "was trained with another recipe: model.modalities.image.image_size: 16 -> 96. A resumed run "
                         "cannot change")
    assert snapshot(run) == before  # config.json still says what the weights are

    proc = run_in_process(*train, "--set", "train.steps=8", "--set", "train.log_every=2")
    assert "resuming with changed settings: " in proc.stderr and "train.steps: 6 -> 8" in proc.stderr
    assert "train.log_every: 1 -> 2" in proc.stderr and last_json(proc)["steps"] == 8
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 8
    assert json.loads((run / "model" / "config.json").read_text())["modalities"]["image"]["image_size"] == 16
