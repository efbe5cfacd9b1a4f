"""``larsopt train``'s telemetry outputs: ``--tensorboard DIR`` and the per-param fallback and clip
counts of summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from larsopt.cli import main, optimizers, training
from larsopt.cli.training import TELEMETRY_COUNTS
from larsopt.telemetry import Accumulator
from test_cli import QUICK, checkpoint, metrics_without_time, train
from test_cli_cluster import error_line, resume, signal_at_step

REPO = Path(__file__).resolve().parents[1]
# LARC at a small lr on the resnet with every tensor adapted: its batch-norm biases start at 0 (the
# |w| = 0 fallback at their first step) and the clip caps many ratios, so both counts are not 0.
COUNTED = ("--optimizer", "larc", "--lr", "0.01", "--model", "resnet", "--exclude", "none")


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def counts(folder: Path) -> dict[str, dict]:
    return summary(folder)["telemetry"]["params"]


def test_summary_counts_equal_an_accumulator_fed_the_same_run(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """summary.json's counts are an Accumulator's over the whole run; a run stopped inside an
    epoch and resumed ends with the same counts."""
    kept: list[Accumulator] = []
    build = optimizers.build

    def build_and_watch(*args: object) -> torch.optim.Optimizer:
        optimizer = build(*args)
        kept.append(Accumulator(optimizer))
        return optimizer

    monkeypatch.setattr(training.optimizers, "build", build_and_watch)
    assert train(tmp_path / "whole", *COUNTED) == 0
    monkeypatch.undo()
    expected = kept[0].read().to_dict()
    written = counts(tmp_path / "whole")
    assert summary(tmp_path / "whole")["telemetry"]["counted_from_step"] == 0
    assert written.keys() == expected.keys()
    for name, row in expected.items():
        assert {column: written[name][column] for column in TELEMETRY_COUNTS} == \
            {column: row[column] for column in TELEMETRY_COUNTS}, name
        assert written[name]["steps"] == 15 and written[name]["adapted"] is True
        assert row["fallback"] == row["fallback_zero_w"] + row["fallback_zero_g"] + row["fallback_not_finite"]
    assert sum(row["fallback_zero_w"] for row in written.values()) > 0
    assert sum(row["clipped"] for row in written.values()) > 0

    signal_at_step(monkeypatch, 7)  # inside epoch 2: the checkpoint holds the counts of steps 1-7
    assert train(tmp_path / "stopped", *COUNTED) == 130
    assert checkpoint(tmp_path / "stopped")["telemetry_counts"]["stem.1.bias"]["steps"] == 7
    monkeypatch.undo()
    torch.set_num_threads(1)
    assert resume(tmp_path / "stopped") == 0
    assert counts(tmp_path / "stopped") == written


def test_sgd_and_lars_groups_without_a_ratio(tmp_path: Path) -> None:
    """SGD has no telemetry; a LARS run lists its lars=False params with zero counts."""
    assert train(tmp_path / "sgd", "--optimizer", "sgd", "--epochs", "1") == 0
    assert summary(tmp_path / "sgd")["telemetry"] is None
    assert train(tmp_path / "lars", "--epochs", "1") == 0
    written = counts(tmp_path / "lars")
    assert written["fc1.bias"]["adapted"] is False
    assert written["fc1.bias"]["fallback"] == written["fc1.bias"]["clipped"] == 0
    assert written["fc1.weight"]["adapted"] is True and written["fc1.weight"]["steps"] == 5


def read_events(folder: Path) -> object:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_tensorboard_event_files_are_written_and_readable(tmp_path: Path) -> None:
    """Per epoch: the loss, accuracy and lr, each layer's telemetry over the epoch (whose fallback
    and clip counts add up to summary.json's) and the ratio histogram; --resume may add or change
    --tensorboard, and its events continue from the checkpoint."""
    pytest.importorskip("tensorboard")
    board = tmp_path / "board"
    assert train(tmp_path / "run", *COUNTED, "--epochs", "2", "--tensorboard", str(board)) == 0
    events = read_events(board)
    tags = events.Tags()
    for tag in ("loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr"):
        assert [event.step for event in events.Scalars(tag)] == [5, 10], tag
    rows = metrics_without_time(tmp_path / "run")
    assert [event.value for event in events.Scalars("accuracy/test")] == pytest.approx(
        [row["test_accuracy"] for row in rows])
    assert [event.value for event in events.Scalars("lr")] == pytest.approx([row["lr"] for row in rows])
    written = counts(tmp_path / "run")
    for name, row in written.items():
        for column in ("steps", "fallback", "fallback_zero_w", "clipped"):
            per_epoch = events.Scalars(f"lars_{column}/{name}")
            assert [event.step for event in per_epoch] == [5, 10]
            assert sum(event.value for event in per_epoch) == row[column], (column, name)
        assert f"lars_trust_ratio_mean/{name}" in tags["scalars"]
    assert [event.step for event in events.Histograms("lars_trust_ratio")] == [5, 10]
    assert summary(tmp_path / "run")["config"]["tensorboard"] == str(board)

    # The saved folder is kept on --resume; another may be given (it does not change the numbers).
    assert resume(tmp_path / "run", "--epochs", "3") == 0
    assert [event.step for event in read_events(board).Scalars("lr")] == [5, 10, 15]
    other = tmp_path / "other"
    assert resume(tmp_path / "run", "--epochs", "4", "--tensorboard", str(other)) == 0
    assert [event.step for event in read_events(other).Scalars("lr")] == [20]
    assert summary(tmp_path / "run")["config"]["tensorboard"] == str(other)


def test_tensorboard_of_an_sgd_run_has_the_scalars_only(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    assert train(tmp_path / "run", "--optimizer", "sgd", "--epochs", "1", "--tensorboard", str(tmp_path / "tb")) == 0
    tags = read_events(tmp_path / "tb").Tags()
    assert sorted(tags["scalars"]) == ["accuracy/test", "accuracy/train", "loss/test", "loss/train", "lr"]
    assert not tags["histograms"]


# Blocks TensorBoard as if it were not installed, then runs the command line.
WITHOUT_TENSORBOARD = textwrap.dedent("""
    import sys
    sys.modules["tensorboard"] = None  # (an import of it raises ImportError)
    sys.modules["torch.utils.tensorboard"] = None
    from larsopt.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_tensorboard_without_tensorboard_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-c", WITHOUT_TENSORBOARD, "train", *QUICK, "--out", str(out),
               "--tensorboard", str(tmp_path / "tb")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("larsopt: error: --tensorboard"), lines
    assert 'pip install "larsopt[tensorboard]"' in lines[0]
    assert not out.exists() and not (tmp_path / "tb").exists()


def test_nothing_imports_tensorboard_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train(tmp_path / "run", "--epochs", "1") == 0


def test_tensorboard_onto_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard")
    (tmp_path / "tb").write_text("")
    assert train(tmp_path / "run", "--tensorboard", str(tmp_path / "tb")) == 2
    assert "a file of that name exists" in error_line(capsys)
    assert not (tmp_path / "run").exists()
