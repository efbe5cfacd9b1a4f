"""``larsopt train`` under torchrun (2 gloo processes): the same training as one process with the
same global batch, exact resume, and bad input that is one line from rank 0.

The default tests start their ranks from the test session's fork server (``distributed_utils``:
torch is imported once, a process group already joined, torchrun's environment variables set by
hand); the slow ones go through torchrun itself (its start-up alone takes 10-20 s here).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed_utils
from distributed_utils import run_processes
from larsopt.cli import main
from test_cli import QUICK, checkpoint, metrics_without_time

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# The command's own imports (scikit-learn, matplotlib, the CLI), once in the fork server rather than
# in every process: 8-10 s each on a busy two-core machine. (Only where this module is the first to
# start the server in a session.)
distributed_utils._PRELOAD.extend(["sklearn.datasets", "sklearn.model_selection", "matplotlib.figure",
                                   "matplotlib.colors", "larsopt.cli.train", "test_cli", "test_cli_distributed"])

# Float32 sums in another order (the gradient all-reduce, the sharded norms' all-reduce): the
# 2-process weights differ from the 1-process ones by a few 1e-7 relative (measured: 3.5e-7 ddp,
# 4.2e-7 fsdp after 15 steps).
WEIGHTS_RTOL = 1e-5
COMPARED = ("epoch", "step", "lr", "test_accuracy", "train_accuracy")


def torchrun_environment(rank: int, world: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}


def _rank_main(rank: int, world: int, arguments: list[str], patches: dict[int, str]) -> tuple[int, str, str]:
    """``main(arguments)`` as rank ``rank`` of a torchrun job; returns (exit code, stdout, stderr)."""
    os.environ.update(torchrun_environment(rank, world))
    if rank in patches:
        PATCHES[patches[rank]]()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(arguments)
    return code, stdout.getvalue(), stderr.getvalue()


def _signal_after_step_4() -> None:
    from larsopt.cli.progress import Progress

    original = Progress.step

    def step_then_signal(self: Progress, loss: float, accuracy: float, samples: int) -> None:
        original(self, loss, accuracy, samples)
        if self.done_steps == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    Progress.step = step_then_signal


def _sees_a_gpu() -> None:
    from larsopt.cli import train

    train.resolve_device = lambda name: "cuda"
    torch.cuda.device_count = lambda: 2
    torch.cuda.set_device = lambda index: None


def _cannot_import_the_model() -> None:
    from larsopt.cli import models
    from larsopt.cli.errors import UsageError

    def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
        raise UsageError(f"--model {name}: cannot import it on this node")

    models.build = build


PATCHES = {"signal after step 4": _signal_after_step_4, "sees a gpu": _sees_a_gpu,
           "cannot import the model": _cannot_import_the_model}


def ranks(*arguments: str, patches: dict[int, str] | None = None) -> list[tuple[int, str, str]]:
    """``larsopt train`` on 2 processes of the fork server; each rank's (exit code, stdout, stderr)."""
    return run_processes(2, _rank_main, ["train", *arguments], patches or {})


def full_weights(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model of a run's checkpoint, whole (a sharded checkpoint gathered into one file)."""
    state = checkpoint(folder)
    if "model" in state:
        return state["model"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / state["sharded_checkpoint"], scratch / "whole.pt")
    return torch.load(scratch / "whole.pt", weights_only=False)["model"]


def assert_same_training(one: Path, two: Path, scratch: Path) -> float:
    """Same metrics (losses to float32 rounding) and weights within WEIGHTS_RTOL; returns the largest
    relative weight difference."""
    rows_one, rows_two = metrics_without_time(one), metrics_without_time(two)
    assert [{key: row[key] for key in COMPARED} for row in rows_one] == \
        [{key: row[key] for key in COMPARED} for row in rows_two]
    for first, second in zip(rows_one, rows_two):
        assert second["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)
        assert second["test_loss"] == pytest.approx(first["test_loss"], rel=1e-5)
    weights_one, weights_two = full_weights(one, scratch), full_weights(two, scratch)
    assert weights_one.keys() == weights_two.keys()
    worst = 0.0
    for name, value in weights_one.items():
        scale = value.abs().max().clamp_min(1e-30)
        worst = max(worst, ((weights_two[name] - value).abs().max() / scale).item())
    assert worst <= WEIGHTS_RTOL
    trust_one, trust_two = checkpoint(one)["trust_history"], checkpoint(two)["trust_history"]
    assert torch.tensor(trust_two) == pytest.approx(torch.tensor(trust_one), rel=1e-4)
    return worst


# digits at batch 512: 3 steps per epoch, the last one of 413 samples (207 and 206 per rank), each
# rank's part in 2 micro-batches.
OPTIONS = ["--epochs", "2", "--warmup-epochs", "1", "--accumulate", "2", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run in one process, and on 2 processes with ddp and with fsdp (both print one line)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *OPTIONS, "--out", str(root / "one")]) == 0
    for parallel in ("ddp", "fsdp"):
        results = ranks(*OPTIONS, "--parallel", parallel, "--out", str(root / parallel))
        assert [code for code, _, _ in results] == [0, 0], results
        assert results[0][1].startswith("test accuracy ") and results[0][1].count("\n") == 1
        assert results[1][1:] == ("", "")
    return {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_like_one(tmp_path: Path, finished: dict[str, Path], parallel: str) -> None:
    assert_same_training(finished["one"], finished[parallel], tmp_path)
    summary = json.loads((finished[parallel] / "summary.json").read_text())
    assert summary["processes"] == {"parallel": parallel, "world_size": 2}
    assert summary["steps"] == 6 and summary["config"]["batch_size"] == 512
    assert (finished[parallel] / "checkpoint.dcp").is_dir() == (parallel == "fsdp")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_stop_on_one_rank_stops_both_and_resume_is_exact(tmp_path: Path, finished: dict[str, Path],
                                                           parallel: str) -> None:
    """SIGTERM reaches rank 0 only, during step 4: both ranks stop after step 5, the step at which
    they agree on it, and --resume ends exactly like the uninterrupted run."""
    stopped = tmp_path / "stopped"
    results = ranks(*OPTIONS, "--parallel", parallel, "--out", str(stopped), patches={0: "signal after step 4"})
    assert [code for code, _, _ in results] == [143, 143]
    assert "--resume" in results[0][1]
    assert (checkpoint(stopped)["epoch"], checkpoint(stopped)["batch"]) == (1, 2)
    assert [code for code, _, _ in ranks("--out", str(stopped), "--resume", "--quiet")] == [0, 0]
    assert metrics_without_time(stopped) == metrics_without_time(finished[parallel])
    whole = full_weights(finished[parallel], tmp_path)
    assert all(torch.equal(value, whole[name]) for name, value in full_weights(stopped, tmp_path).items())
    if parallel == "fsdp":
        assert len(list((stopped / "checkpoint.dcp").iterdir())) == 1


def test_a_ddp_run_resumes_in_one_process(tmp_path: Path, finished: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    results = ranks(*OPTIONS, "--out", str(tmp_path / "run"), patches={0: "signal after step 4"})
    assert [code for code, _, _ in results] == [143, 143]
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    assert "saved by 2 process(es) and continues on 1" in capsys.readouterr().err
    assert_same_training(finished["one"], tmp_path / "run", tmp_path)


def one_line_from_rank_0(results: list[tuple[int, str, str]], code: int = 2) -> str:
    assert [result[0] for result in results] == [code, code]
    assert results[1][1:] == ("", "")
    lines = results[0][2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("larsopt: error: "), lines
    return lines[0]


def test_an_indivisible_batch_is_one_line(tmp_path: Path) -> None:
    line = one_line_from_rank_0(ranks(*QUICK, "--batch-size", "33", "--out", str(tmp_path / "run")))
    assert "--batch-size 33" in line and "2 processes" in line and "multiple of 2" in line
    line = one_line_from_rank_0(ranks(*QUICK, "--accumulate", "4", "--batch-size", "36",
                                      "--out", str(tmp_path / "run")))
    assert "--accumulate 4" in line and "batch of 18" in line
    assert not (tmp_path / "run").exists()


def test_bad_input_of_one_rank_and_mixed_devices_are_one_line(tmp_path: Path) -> None:
    line = one_line_from_rank_0(ranks(*QUICK, "--out", str(tmp_path / "run"), patches={1: "sees a gpu"}))
    assert "rank 0: cpu, rank 1: cuda" in line and "--device auto" in line
    line = one_line_from_rank_0(ranks(*QUICK, "--out", str(tmp_path / "run"), patches={1: "cannot import the model"}))
    assert line == "larsopt: error: rank 1: --model mlp: cannot import it on this node"
    results = ranks(*QUICK, "--out", str(tmp_path / "run"), "--data", "synthetic:201", "--batch-size", "160")
    assert "last batch" in one_line_from_rank_0(results) and "161 mod 160 = 1" in results[0][2]
    assert not (tmp_path / "run").exists()


def test_resuming_across_ddp_and_fsdp_is_refused(finished: dict[str, Path], capsys: pytest.CaptureFixture[str]
                                                 ) -> None:
    line = one_line_from_rank_0(ranks("--out", str(finished["fsdp"]), "--resume", "--parallel", "ddp", "--epochs", "3"))
    assert "saved sharded" in line and "--parallel fsdp" in line
    assert main(["train", "--out", str(finished["fsdp"]), "--resume", "--epochs", "3"]) == 2
    assert "resume it under torchrun with --parallel fsdp" in capsys.readouterr().err
    line = one_line_from_rank_0(ranks("--out", str(finished["ddp"]), "--resume", "--parallel", "fsdp", "--epochs", "3"))
    assert "full checkpoint" in line and "--parallel ddp" in line


def test_parallel_without_torchrun_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for parallel in ("fsdp", "ddp"):
        assert main(["train", *QUICK, "--parallel", parallel, "--out", str(tmp_path / "run")]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and f"--parallel {parallel}: needs the processes torchrun starts" in lines[0]
    assert main(["train", "--parallel", "zero", "--out", str(tmp_path / "run")]) == 2
    assert "'zero'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compare_under_torchrun_is_one_line(tmp_path: Path) -> None:
    results = run_processes(2, _rank_main, ["compare", "--out", str(tmp_path / "compare")], {})
    assert "larsopt compare runs in one process" in one_line_from_rank_0(results)


# --- through torchrun itself ---------------------------------------------------------------------------

def torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "larsopt", "train", *arguments]


TORCHRUN_ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_torchrun_trains_like_one_process(tmp_path: Path, finished: dict[str, Path]) -> None:
    done = subprocess.run(torchrun(*OPTIONS, "--out", str(tmp_path / "two")), capture_output=True, text=True,
                          timeout=300, env=TORCHRUN_ENVIRONMENT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy ") == 1
    assert_same_training(finished["one"], tmp_path / "two", tmp_path)


def _kill_job(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and the workers it started (they run in sessions of their own)."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.kill()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_kill_under_torchrun_then_resume_is_exact(tmp_path: Path, parallel: str) -> None:
    options = ["--data", "synthetic:2000", "--batch-size", "16", "--epochs", "4", "--warmup-epochs", "1",
               "--quiet", "--threads", "1", "--parallel", parallel]
    whole = subprocess.run(torchrun(*options, "--out", str(tmp_path / "whole")), capture_output=True, text=True,
                           timeout=600, env=TORCHRUN_ENVIRONMENT)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen(torchrun(*options, "--out", str(killed)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=TORCHRUN_ENVIRONMENT)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_job(process)
    assert checkpoint(killed)["epoch"] < 4
    resumed = subprocess.run(torchrun("--out", str(killed), "--resume", "--quiet"), capture_output=True, text=True,
                             timeout=600, env=TORCHRUN_ENVIRONMENT)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_without_time(killed) == metrics_without_time(tmp_path / "whole")
    assert all(torch.equal(value, full_weights(tmp_path / "whole", tmp_path)[name])
               for name, value in full_weights(killed, tmp_path).items())
