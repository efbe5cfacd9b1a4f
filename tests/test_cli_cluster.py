"""The command line on a shared cluster: settings declared once, run folders that never mix,
exact resume in every case, preemption, gradient accumulation, the user's own model and images."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from larsopt.cli import data, main, outputs
from larsopt.cli.config import OPTIMIZERS, RunConfig, config_fields, flag_of
from larsopt.cli.progress import Progress
from larsopt.cli.training import WarmupThenDecay
from test_cli import (QUICK, assert_run_files, assert_same_state, checkpoint, metrics_without_time, snapshot, train,
                      write_cifar, write_npz)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line on stderr (and nothing else there)."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("larsopt: error: "), lines
    return lines[0]


def strict_json(text: str) -> object:
    """``json.loads`` that rejects NaN and Infinity, as most JSON readers do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def signal_at_step(monkeypatch: pytest.MonkeyPatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send ``signum`` to this process once a run has done ``step`` steps."""
    original = Progress.step

    def step_then_signal(self: Progress, loss: float, accuracy: float, samples: int) -> None:
        original(self, loss, accuracy, samples)
        if self.done_steps == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Progress, "step", step_then_signal)


def resume(out: Path, *options: str) -> int:
    return main(["train", "--out", str(out), "--resume", "--quiet", *options])


# --- settings declared once (issue 11, item 9) -------------------------------------------------

def test_every_config_field_is_an_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in config_fields("train"):
        assert flag_of(spec) in text, spec.name
        if spec.metadata["default_text"] is None:
            assert f"(default: {spec.default})" in text, spec.name
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "(default: 30)" in capsys.readouterr().out  # compare's own epochs


def test_a_checkpoint_without_newer_fields_resumes_with_their_defaults(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written before ``threads``, ``accumulate``, ``augment`` and ``image_size``
    existed resumes, those fields at their defaults, and ends like a run never stopped."""
    assert train(tmp_path / "whole") == 0
    signal_at_step(monkeypatch, 7)
    assert train(tmp_path / "old") == 130
    state = checkpoint(tmp_path / "old")
    for name in ("threads", "accumulate", "augment", "image_size", "device"):
        del state["config"][name]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    monkeypatch.undo()
    torch.set_num_threads(1)
    assert resume(tmp_path / "old") == 0
    assert metrics_without_time(tmp_path / "old") == metrics_without_time(tmp_path / "whole")
    assert_same_state(checkpoint(tmp_path / "old"), checkpoint(tmp_path / "whole"))
    config = json.loads((tmp_path / "old" / "summary.json").read_text())["config"]
    assert (config["accumulate"], config["augment"], config["image_size"]) == (1, False, 32)


def test_a_checkpoint_with_unknown_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "--epochs", "2") == 0
    state = checkpoint(tmp_path / "run")
    state["config"]["dampening"] = 0.5
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    before = snapshot(tmp_path / "run")
    assert resume(tmp_path / "run", "--epochs", "3") == 2
    assert "dampening" in error_line(capsys)
    assert snapshot(tmp_path / "run") == before


def test_saved_settings_are_checked_by_the_option_parsers() -> None:
    assert RunConfig.from_saved({"batch_size": 64, "lr": 0.5}).batch_size == 64
    with pytest.raises(Exception, match="batch_size"):
        RunConfig.from_saved({"batch_size": 0})


# --- item 1: run folders are claimed atomically ------------------------------------------------

def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    moment = time.gmtime(1_700_000_000)
    monkeypatch.setattr(time, "gmtime", lambda *args: moment)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Another run takes the default folder's name while this one loads its data: this one
    gets a folder of its own and leaves the other's alone."""
    monkeypatch.chdir(tmp_path)
    _fixed_clock(monkeypatch)
    other = tmp_path / "runs" / "20231114-221320-synthetic-mlp-lars"
    load = data.load

    def load_while_another_run_starts(*args: object) -> data.Dataset:
        other.mkdir(parents=True)
        (other / "metrics.jsonl").write_text("the other run's\n")
        return load(*args)

    monkeypatch.setattr(data, "load", load_while_another_run_starts)
    assert main(["train", *QUICK, "--epochs", "2"]) == 0
    assert (other / "metrics.jsonl").read_text() == "the other run's\n"
    assert sorted(path.name for path in other.iterdir()) == ["metrics.jsonl"]
    mine = tmp_path / "runs" / "20231114-221320-synthetic-mlp-lars-2"
    assert_run_files(mine, epochs=2)
    assert str(Path("runs") / mine.name) in capsys.readouterr().out


def test_two_runs_given_the_same_new_out_do_not_share_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    load = data.load

    def load_while_another_run_writes(*args: object) -> data.Dataset:
        out.mkdir()
        (out / "checkpoint.pt").write_text("the other run's")
        return load(*args)

    monkeypatch.setattr(data, "load", load_while_another_run_writes)
    assert train(out) == 2
    assert "not empty" in error_line(capsys)
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt"]
    assert (out / "checkpoint.pt").read_text() == "the other run's"


def test_a_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "--epochs", "2") == 0
    before = snapshot(tmp_path / "run")
    descriptor = os.open(tmp_path / "run" / outputs.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # what a running larsopt holds
        assert resume(tmp_path / "run", "--epochs", "3") == 2
        assert "another larsopt command" in error_line(capsys)
        assert train(tmp_path / "run", "--overwrite") == 2
        assert "another larsopt command" in error_line(capsys)
    finally:
        os.close(descriptor)
    (tmp_path / "run" / outputs.LOCK).unlink()
    assert snapshot(tmp_path / "run") == before


def test_parallel_default_runs_in_subprocesses(tmp_path: Path) -> None:
    """Three runs started together with the default --out: three folders, three results."""
    processes = [subprocess.Popen([sys.executable, "-m", "larsopt", "train", *QUICK, "--seed", str(seed)],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed in range(3)]
    outs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outs
    folders = {line.split("outputs in ")[1] for out, _ in outs for line in out.splitlines() if "outputs in" in line}
    assert len(folders) == 3
    seeds = {json.loads((tmp_path / folder / "summary.json").read_text())["config"]["seed"] for folder in folders}
    assert seeds == {0, 1, 2}


# --- item 2 and 9: a failed run leaves the earlier run and the folder as they were ----------------

def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: Path, state: dict) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(outputs, "save_checkpoint", no_space)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "--epochs", "2") == 0
    before = snapshot(tmp_path / "run")
    _full_disk(monkeypatch)
    assert train(tmp_path / "run", "--overwrite") == 4
    line = error_line(capsys)
    assert "No space left on device" in line and str(tmp_path / "run") in line
    assert snapshot(tmp_path / "run") == before
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == sorted(outputs.RUN_FILES)


def test_overwrite_replaces_every_file_of_the_old_run(tmp_path: Path) -> None:
    assert train(tmp_path / "run", "--epochs", "2", "--seed", "5") == 0
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert train(tmp_path / "run", "--overwrite") == 0
    assert_run_files(tmp_path / "run", epochs=3)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == sorted([*outputs.RUN_FILES, "notes.txt"])


def test_a_full_disk_in_a_new_run_leaves_nothing_that_blocks_a_rerun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _full_disk(monkeypatch)
    assert train(tmp_path / "new" / "run") == 4
    assert "No space left on device" in error_line(capsys)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert train(tmp_path / "new" / "run") == 0


def test_a_full_disk_after_a_checkpoint_says_how_to_continue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    save = outputs.save_checkpoint
    calls = []

    def first_then_full(path: Path, state: dict) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(path, state)

    monkeypatch.setattr(outputs, "save_checkpoint", first_then_full)
    assert train(tmp_path / "run") == 4
    assert "--resume" in error_line(capsys)
    monkeypatch.undo()
    assert resume(tmp_path / "run") == 0
    assert_run_files(tmp_path / "run", epochs=3)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("option", ["--overwrite", "--resume"])
def test_a_read_only_run_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    assert train(tmp_path / "run", "--epochs", "2") == 0
    before = snapshot(tmp_path / "run")
    (tmp_path / "run").chmod(0o555)
    try:
        arguments = ["--epochs", "3"] if option == "--resume" else []
        code = resume(tmp_path / "run", *arguments) if option == "--resume" else train(tmp_path / "run", option)
        assert code == 2
        assert "cannot write there" in error_line(capsys)
    finally:
        (tmp_path / "run").chmod(0o755)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("option", ["--overwrite", "--resume"])
def test_an_unwritable_run_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], option: str) -> None:
    """As above where the tests run as root: the folder refuses new files."""
    assert train(tmp_path / "run", "--epochs", "2") == 0
    before = snapshot(tmp_path / "run")
    folder = str(tmp_path / "run")
    real_open = os.open

    def read_only_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).startswith(folder) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    code = resume(tmp_path / "run", "--epochs", "3") if option == "--resume" else train(tmp_path / "run", option)
    assert code == 2
    assert "cannot write there (Permission denied)" in error_line(capsys)
    monkeypatch.undo()
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("arguments,word", [
    (["--seed", str(2**64)], "--seed"),
    (["--data", "synthetic:100000000"], "synthetic:100000000"),
    (["--threads", "-1"], "--threads"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--checkpoint-every", "10x"], "--checkpoint-every"),
    (["--accumulate", "3"], "--accumulate 3"),
    (["--image-size", "100000"], "--image-size"),
])
def test_more_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], arguments: list[str], word: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert train(tmp_path / "run", *arguments) == 2
    assert word in error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_images_too_small_for_the_model_are_one_line_and_leave_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_npz(tmp_path / "tiny.npz", (1, 1, 1))
    for _ in range(2):  # the second try meets no folder left by the first
        assert train(tmp_path / "run", "--data", f"npz:{path}", "--model", "cnn", "--batch-size", "8") == 2
        assert "--model cnn does not fit samples of shape (1, 1, 1)" in error_line(capsys)
        assert not (tmp_path / "run").exists()


def test_compare_with_a_seed_near_the_limit_writes_nothing(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--seed", str(2**64 - 2), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "2^64" in error_line(capsys)
    assert not (tmp_path / "c").exists()


def test_bench_checks_its_arguments_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert "missing" in error_line(capsys)
    assert main(["bench", "--threads", "-1"]) == 2
    assert "--threads" in error_line(capsys)
    assert main(["bench", "--sets", "resnet"]) == 2
    assert "resnet" in error_line(capsys)
    assert main(["bench", "--step", "4"]) == 2  # no abbreviations
    assert "did you mean --steps" in error_line(capsys)


# --- item 3: everything that changes the numbers is saved -----------------------------------------

def test_resume_reuses_the_saved_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "whole") == 0
    signal_at_step(monkeypatch, 7)
    assert train(tmp_path / "stopped") == 130
    assert "--threads" not in capsys.readouterr().out  # the printed resume command needs nothing more
    monkeypatch.undo()
    torch.set_num_threads(2)
    assert resume(tmp_path / "stopped") == 0
    assert torch.get_num_threads() == 1
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["threads"] == 1
    assert metrics_without_time(tmp_path / "stopped") == metrics_without_time(tmp_path / "whole")
    assert_same_state(checkpoint(tmp_path / "stopped"), checkpoint(tmp_path / "whole"))
    assert resume(tmp_path / "stopped", "--threads", "2", "--epochs", "4") == 2
    assert "--threads 2 differs" in error_line(capsys)


# --- item 4: the batch is what is trained -----------------------------------------------------------

def test_a_batch_larger_than_the_training_set_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--optimizer", "sgd", "--batch-size", "100000", "--out", str(tmp_path / "run")]) == 2
    assert "--batch-size 100000: larger than the training set of digits (1437 samples)" in error_line(capsys)
    assert main(["compare", "--batch-sizes", "64,2000", "--out", str(tmp_path / "c")]) == 2
    assert "2000" in error_line(capsys)
    assert not any(tmp_path.iterdir())


# --- item 5: data that cannot train is refused --------------------------------------------------------

def _write_partial_cifar(folder: Path) -> Path:
    write_cifar(folder)
    for index in (3, 4):
        (folder / f"data_batch_{index}").unlink()
    return folder


@pytest.mark.parametrize("case,word", [
    ("beyond float32", "beyond float32's range"),
    ("too large to standardise", "too large to standardise"),
    ("huge label", "999999999"),
    ("partial cifar", "data_batch_3, data_batch_4 missing"),
])
def test_data_that_cannot_train_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                           word: str) -> None:
    inputs = np.random.default_rng(0).normal(size=(40, 4))
    # Each value fits float32, their sum does not.
    near_limit = np.where(np.arange(160).reshape(40, 4) % 2 == 0, 3e38, 2e38).astype(np.float32)
    spec = {
        "beyond float32": lambda: f"npz:{write_npz(tmp_path / 'a.npz', (4,), x_train=inputs * 1e39)}",
        "too large to standardise": lambda: f"npz:{write_npz(tmp_path / 'b.npz', (4,), x_train=near_limit)}",
        "huge label": lambda: f"npz:{write_npz(tmp_path / 'c.npz', (4,), y_train=np.full(40, 999_999_999))}",
        "partial cifar": lambda: f"cifar10:{_write_partial_cifar(tmp_path / 'cifar')}",
    }[case]()
    assert train(tmp_path / "run", "--data", spec, "--batch-size", "8") == 2
    assert word in error_line(capsys)
    assert not (tmp_path / "run").exists()


# --- item 6: a warm-up as long as the run ---------------------------------------------------------------

def test_the_default_warm_up_fits_a_short_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--epochs 3`` with the default warm-up: a quarter of the run, then the lr decays."""
    at = QUICK.index("--warmup-epochs")
    quick = QUICK[:at] + QUICK[at + 2:]
    assert main(["train", *quick, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["warmup_epochs"] == 0.75
    rates = [row["lr"] for row in metrics_without_time(tmp_path / "run")]
    assert rates[0] == 10.0 and rates[-1] < 0.1
    assert capsys.readouterr().err == ""


def test_a_typed_warm_up_as_long_as_the_run_is_warned_about(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "--warmup-epochs", "3") == 0
    err = capsys.readouterr().err
    assert err.startswith("larsopt: warning: --warmup-epochs 3 is not shorter than the run") and "never decays" in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["warmup_epochs"] == 3


# --- item 7: divergence -----------------------------------------------------------------------------------

def test_a_diverged_run_exits_3_and_writes_valid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train(out, "--optimizer", "sgd", "--lr", "1e6", "--epochs", "3") == 3
    err = capsys.readouterr().err
    assert err.startswith("larsopt: the run diverged: a loss is not finite at epoch 1")
    summary = strict_json((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["completed"] is False
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_loss"] is None  # stopped at the first diverged epoch
    assert resume(out) == 2
    assert "diverged" in error_line(capsys)


def test_json_files_never_hold_nan(tmp_path: Path) -> None:
    outputs.write_json(tmp_path / "a.json", {"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert strict_json((tmp_path / "a.json").read_text()) == {"loss": None, "rows": [None, 1.5]}


# --- item 10: preemption -----------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "whole") == 0
    signal_at_step(monkeypatch, 7, signal.SIGTERM)
    assert train(tmp_path / "stopped") == 143
    assert "--resume" in capsys.readouterr().out
    assert (checkpoint(tmp_path / "stopped")["epoch"], checkpoint(tmp_path / "stopped")["batch"]) == (1, 2)
    monkeypatch.undo()
    assert resume(tmp_path / "stopped") == 0
    assert metrics_without_time(tmp_path / "stopped") == metrics_without_time(tmp_path / "whole")
    assert_same_state(checkpoint(tmp_path / "stopped"), checkpoint(tmp_path / "whole"))


@pytest.mark.slow
def test_sigterm_to_a_subprocess(tmp_path: Path) -> None:
    options = ["--data", "synthetic:2000", "--batch-size", "16", "--epochs", "6", "--warmup-epochs", "1",
               "--quiet", "--threads", "1"]
    assert main(["train", *options, "--out", str(tmp_path / "whole")]) == 0
    process = subprocess.Popen([sys.executable, "-m", "larsopt", "train", *options, "--out", str(tmp_path / "run")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 143 and "--resume" in stdout
    assert resume(tmp_path / "run", "--threads", "1") == 0
    assert metrics_without_time(tmp_path / "run") == metrics_without_time(tmp_path / "whole")


def test_checkpoint_every_time_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = []
    save = outputs.save_checkpoint
    monkeypatch.setattr(outputs, "save_checkpoint", lambda path, state: saved.append(
        (state["epoch"], state["batch"])) or save(path, state))
    assert train(tmp_path / "every-step", "--checkpoint-every", "0.000001s") == 0
    assert len(saved) == 15 and saved[1] == (0, 2)  # every step, mid-epoch too
    saved.clear()
    assert train(tmp_path / "hourly", "--checkpoint-every", "1h") == 0
    assert saved == [(3, 0)]  # only at the end


# --- item 14: resume as it is used ------------------------------------------------------------------------------

def test_a_relative_data_path_is_saved_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    write_npz(tmp_path / "work" / "data.npz", (6,))
    options = ["--data", "npz:data.npz", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--quiet",
               "--threads", "1"]
    assert main(["train", *options, "--out", "whole"]) == 0
    signal_at_step(monkeypatch, 6)
    assert main(["train", *options, "--out", "stopped"]) == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    config = checkpoint(tmp_path / "work" / "stopped")["config"]
    assert config["data"] == f"npz:{tmp_path / 'work' / 'data.npz'}"
    assert resume(tmp_path / "work" / "stopped", "--data", "npz:work/data.npz", "--checkpoint-every", "2") == 0
    assert metrics_without_time(tmp_path / "work" / "stopped") == metrics_without_time(tmp_path / "work" / "whole")


def test_more_epochs_continue_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run") == 0
    before = metrics_without_time(tmp_path / "run")
    assert resume(tmp_path / "run", "--epochs", "5") == 0
    rows = metrics_without_time(tmp_path / "run")
    assert rows[:3] == before and len(rows) == 5
    # From step 15 on, the lr follows the schedule of a 5-epoch run (25 steps, warm-up 5 steps).
    assert rows[3]["lr"] == pytest.approx(10.0 * WarmupThenDecay("poly", 5, 25)(19))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["epochs"] == 5
    capsys.readouterr()
    assert resume(tmp_path / "run", "--epochs", "4") == 2
    assert "fewer than the 5 epochs" in error_line(capsys)


def test_resume_of_a_complete_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run") == 0
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert resume(tmp_path / "run", "--quiet") == 0
    assert "is complete (3 epochs); nothing to do" in capsys.readouterr().out
    assert snapshot(tmp_path / "run") == before
    # A run whose last files could not be written (a full disk after the last checkpoint) gets them.
    (tmp_path / "run" / "summary.json").unlink()
    (tmp_path / "run" / "curves.png").unlink()
    assert resume(tmp_path / "run") == 0
    assert "test accuracy" in capsys.readouterr().out
    assert_run_files(tmp_path / "run", epochs=3)


# --- item 15: small things ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments,expected", [
    (["train", "--batchsize", "8"], "unknown option --batchsize; did you mean --batch-size? (see larsopt train --help)"),
    (["train", "--batch", "8"], "unknown option --batch; did you mean --batch-size? (see larsopt train --help)"),
    (["compare", "--batch-size=8"], "unknown option --batch-size; did you mean --batch-sizes? (see larsopt compare"),
    (["train", "--learning-rate", "3"], "unknown option --learning-rate (see larsopt train --help)"),
    (["train", "--lr", "1", "extra"], "unexpected argument 'extra' (see larsopt train --help)"),
])
def test_unknown_options_suggest_the_subcommands_own(capsys: pytest.CaptureFixture[str], arguments: list[str],
                                                     expected: str) -> None:
    assert main(arguments) == 2
    assert expected in error_line(capsys)


def test_output_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        assert train(tmp_path / "run", "--epochs", "1", "--warmup-epochs", "0") == 0
    finally:
        os.umask(previous)
    for name in outputs.RUN_FILES:
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o640, name


def test_the_progress_bar_never_shows_zero_samples_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    postfixes = []

    class Bar:
        def __init__(self, **kwargs: object) -> None:
            self.format_dict = {"rate": None}

        def set_postfix(self, **values: str) -> None:
            postfixes.append(values)

        def update(self, count: int) -> None:
            pass

    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=Bar))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = Progress(total_steps=3, done_steps=0, epochs=1, quiet=False)
    for _ in range(3):
        progress.step(1.0, 0.5, 64)
    assert all(values["samples_s"] not in ("0", "-") for values in postfixes), postfixes


def test_help_does_not_import_torch() -> None:
    """``larsopt --help`` and ``larsopt train --help`` with torch made unimportable: the command
    line's own modules need no torch to parse and print help."""
    code = textwrap.dedent(f"""
        import sys, types
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch imported")
        sys.meta_path.insert(0, NoTorch())
        # larsopt/__init__.py imports the optimizer (and torch); load the cli package without it.
        package = types.ModuleType("larsopt")
        package.__path__ = [{str(REPO / "src" / "larsopt")!r}]
        package.__version__ = "test"
        sys.modules["larsopt"] = package
        from larsopt.cli import main
        for arguments in (["--help"], ["train", "--help"], ["compare", "--help"]):
            try:
                main(arguments)
            except SystemExit as done:
                assert done.code == 0
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr[-2000:]


# --- item 11: compare -----------------------------------------------------------------------------------------------

COMPARE = ["compare", "--data", "synthetic:200", "--batch-sizes", "16,64", "--epochs", "2", "--threads", "1"]


def compare_runs(folder: Path) -> list[dict]:
    report = strict_json((folder / "compare.json").read_text())
    return [{key: value for key, value in run.items() if not key.startswith("wall_time")}
            for run in report["seed_runs"]]


def test_an_interrupted_compare_keeps_its_runs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*COMPARE, "--quiet", "--out", str(tmp_path / "whole")]) == 0
    # 2 epochs of 10 steps at batch 16: the signal comes in the fifth run (LARS, SGD: 3 seeds each).
    original = Progress.step
    steps = []

    def count_then_signal(self: Progress, loss: float, accuracy: float, samples: int) -> None:
        original(self, loss, accuracy, samples)
        steps.append(1)
        if len(steps) == 4 * 20 + 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "step", count_then_signal)
    assert main([*COMPARE, "--quiet", "--out", str(tmp_path / "stopped")]) == 130
    assert len(compare_runs(tmp_path / "stopped")) == 4
    assert "--resume" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["compare", "--out", str(tmp_path / "stopped"), "--resume", "--quiet"]) == 0
    assert compare_runs(tmp_path / "stopped") == compare_runs(tmp_path / "whole")
    report = strict_json((tmp_path / "stopped" / "compare.json").read_text())
    assert report["complete"] is True and len(report["runs"]) == 4
    assert all(len(curve) == 2 for run in report["runs"] for curve in run["test_accuracy_per_epoch_per_seed"])
    capsys.readouterr()
    assert main(["compare", "--out", str(tmp_path / "stopped"), "--resume", "--epochs", "3"]) == 2
    assert "--epochs 3 differs" in error_line(capsys)


def test_compare_quiet_prints_only_the_final_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*COMPARE, "--quiet", "--out", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"outputs in {tmp_path / 'c'}"]


def test_compare_refuses_repeated_batch_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--batch-sizes", "64,128,64", "--out", str(tmp_path / "c")]) == 2
    assert "64 given more than once" in error_line(capsys)


# --- item 12: gradient accumulation -----------------------------------------------------------------------------------

def test_accumulation_trains_like_the_full_batch(tmp_path: Path) -> None:
    assert train(tmp_path / "full") == 0
    assert train(tmp_path / "micro", "--accumulate", "4") == 0
    full, micro = metrics_without_time(tmp_path / "full"), metrics_without_time(tmp_path / "micro")
    for row_full, row_micro in zip(full, micro, strict=True):
        assert row_micro == pytest.approx(row_full, rel=1e-4, abs=1e-6)
    for name, value in checkpoint(tmp_path / "full")["model"].items():
        torch.testing.assert_close(checkpoint(tmp_path / "micro")["model"][name], value, rtol=1e-4, atol=1e-6)


# --- item 13: the user's own model and images ---------------------------------------------------------------------------

def test_a_model_of_the_users_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import math
        from torch import nn

        def small(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

        def not_a_model(input_shape, num_classes):
            return "a string"
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    assert train(tmp_path / "run", "--model", "mymodels:small") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model_parameters"] == 64 * 10 + 10
    for spec, word in (("mymodels:not_a_model", "not a torch.nn.Module"), ("mymodels:missing", "no attribute"),
                       ("nomodule:make", "cannot import nomodule"), ("my-models", "module:callable")):
        assert train(tmp_path / "bad", "--model", spec) == 2
        assert word in error_line(capsys)
        assert not (tmp_path / "bad").exists()


def write_images(folder: Path, split: bool) -> Path:
    from PIL import Image

    generator = np.random.default_rng(0)
    for part, count in ((("train", 12), ("test", 4)) if split else (("", 15),)):
        for label, colour in enumerate(("red", "blue", "green")):
            (folder / part / colour).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = generator.integers(0, 80, size=(10 + index, 14, 3), dtype=np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels).save(folder / part / colour / f"{index}.png")
    return folder


@pytest.mark.parametrize("split", [False, True])
def test_imagefolder_trains_with_augmentation(tmp_path: Path, split: bool) -> None:
    root = write_images(tmp_path / "images", split)
    assert train(tmp_path / "run", "--data", f"imagefolder:{root}", "--image-size", "12", "--model", "cnn",
                 "--batch-size", "8") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["input_shape"] == [3, 12, 12] and summary["data"]["num_classes"] == 3
    counts = (36, 12) if split else (36, 9)
    assert (summary["data"]["train_samples"], summary["data"]["test_samples"]) == counts
    assert summary["config"]["augment"] is True
    assert summary["final_test_accuracy"] > 0.6  # the colour is easy


def test_augmented_runs_resume_exactly_and_no_augment_turns_it_off(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_cifar(tmp_path / "cifar", train_images=8)
    options = ["--data", f"cifar10:{root}", "--model", "cnn", "--batch-size", "10"]
    assert train(tmp_path / "whole", *options) == 0
    signal_at_step(monkeypatch, 7)
    assert train(tmp_path / "stopped", *options) == 130
    monkeypatch.undo()
    assert resume(tmp_path / "stopped") == 0
    assert metrics_without_time(tmp_path / "stopped") == metrics_without_time(tmp_path / "whole")
    assert_same_state(checkpoint(tmp_path / "stopped"), checkpoint(tmp_path / "whole"))
    assert train(tmp_path / "plain", *options, "--no-augment") == 0
    assert checkpoint(tmp_path / "plain")["config"]["augment"] is False
    assert metrics_without_time(tmp_path / "plain") != metrics_without_time(tmp_path / "whole")


def test_imagefolder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert train(tmp_path / "run", "--data", f"imagefolder:{tmp_path / 'empty'}") == 2
    assert "class sub-folders" in error_line(capsys)
    root = write_images(tmp_path / "images", split=False)
    (root / "red" / "9.png").write_bytes(b"not a png")
    assert train(tmp_path / "run", "--data", f"imagefolder:{root}") == 2
    assert "cannot decode" in error_line(capsys)
    assert train(tmp_path / "run", "--image-size", "16") == 2
    assert "only imagefolder data is resized" in error_line(capsys)
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert train(tmp_path / "run", "--data", f"imagefolder:{root}") == 2
    assert "needs Pillow" in error_line(capsys)
    assert not (tmp_path / "run").exists()


# --- item 16: the documentation matches the commands -----------------------------------------------------------------------

def test_docs_describe_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "docs" / "cli.md").read_text()
    for command in ("train", "compare"):
        for spec in config_fields(command):
            assert f"`{flag_of(spec)}`" in text, flag_of(spec)
    for flag in ("--batch-sizes", "--optimizers", "--resume", "--overwrite", "--quiet", "--out"):
        assert f"`{flag}`" in text, flag
    optimizers = text.split("### The optimizers")[1].split("\n### ")[0]
    for name in OPTIMIZERS:
        assert f"| `{name}` |" in optimizers, name  # a row saying what the flags mean for it
    quick_start = (REPO / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    assert "python -m venv" in quick_start and "first run" in quick_start


# --- item 8: every built-in model trains with its defaults ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model,accuracy", [("mlp", 0.97), ("cnn", 0.95), ("resnet", 0.97)])
def test_each_model_trains_well_with_its_defaults(tmp_path: Path, model: str, accuracy: float) -> None:
    assert main(["train", "--model", model, "--quiet", "--threads", "1", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_test_accuracy"] >= accuracy
