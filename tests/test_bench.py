"""``larsopt bench`` on tiny parameter sets: the steps every set times and the load average it reports."""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from larsopt import bench


@pytest.fixture
def tiny_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter set, BERT-base's included, made of two small tensors: a run takes seconds."""
    monkeypatch.setattr(bench, "param_set_shapes", lambda name: [(16, 8), (8,)])


def run_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, dict[str, Any]]:
    """``larsopt bench ARGS --json FILE``: its stdout and the JSON."""
    assert bench.main([*args, "--json", str(tmp_path / "out.json")]) == 0
    return capsys.readouterr().out, json.loads((tmp_path / "out.json").read_text())


def test_bert_times_the_steps_asked_for(tiny_sets: None, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, report = run_bench(tmp_path, capsys, "--sets", "bert", "--steps", "10")
    [result] = report["results"]
    measured = [row for row in result["rows"] if "steps" in row]
    assert measured and all(row["steps"] == 10 for row in measured)  # not a quarter


def test_steps_are_rounded_up_to_whole_blocks(tiny_sets: None, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, report = run_bench(tmp_path, capsys, "--sets", "small", "--steps", "6")
    [result] = report["results"]
    assert {row["steps"] for row in result["rows"] if "steps" in row} == {2 * bench.BLOCK_STEPS}


def test_reports_the_load_average_of_each_set(tiny_sets: None, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, report = run_bench(tmp_path, capsys, "--sets", "resnet50,small", "--steps", "10")
    assert out.splitlines()[0].startswith(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    assert [result["set"] for result in report["results"]] == ["resnet50", "small"]
    for result in report["results"]:
        load = result["load_average"]
        assert len(load["samples"]) == 2  # one per round
        assert load["min"] <= load["median"] <= load["max"]
    assert out.count("Load average (1 min) after each round (2): min ") == 2
    assert set(report["load_average"]) == {"before", "after"}


@pytest.mark.parametrize("busy", [False, True])
def test_warns_when_the_load_exceeded_the_cpus(tiny_sets: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, busy: bool) -> None:
    load = os.cpu_count() + (0.5 if busy else 0.0)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    out, report = run_bench(tmp_path, capsys, "--sets", "small", "--steps", "5")
    [result] = report["results"]
    assert result["load_average"] == {"min": load, "median": load, "max": load, "samples": [load]}
    assert ("absolute times are unreliable" in out) == busy
