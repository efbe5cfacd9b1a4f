"""The ``larsopt`` command line: runs, files, bad input, reproducibility, Ctrl-C/kill and resume."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import larsopt
from larsopt._impl import reference
from larsopt.cli import main, outputs
from larsopt.cli.progress import Progress
from larsopt.cli.training import WarmupThenDecay, trust_ratios

pytest.importorskip("sklearn")
matplotlib_image = pytest.importorskip("matplotlib.image")

TIME_KEYS = {"epoch_time_s", "samples_per_s", "elapsed_s"}
# A small, quick run: 160 synthetic training samples, 5 steps per epoch. One thread: models this
# small gain nothing from two, and a second busy process on the machine can slow two-thread
# OpenMP regions a hundredfold.
QUICK = ["--data", "synthetic:200", "--batch-size", "32", "--epochs", "3", "--warmup-epochs", "1", "--quiet",
         "--threads", "1"]


def train(out: Path, *options: str) -> int:
    return main(["train", *QUICK, "--out", str(out), *options])


def metrics_without_time(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIME_KEYS} for row in rows]


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def assert_same_state(first: dict, second: dict) -> None:
    assert first["model"].keys() == second["model"].keys()
    for name in first["model"]:
        assert torch.equal(first["model"][name], second["model"][name]), name
    for key, state in first["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["optimizer"]["state"][key][name])
    assert first["scheduler"]["last_epoch"] == second["scheduler"]["last_epoch"]


def assert_run_files(folder: Path, epochs: int) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "samples_per_s"} <= row.keys()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert {"config", "best_test_accuracy", "wall_time_s", "samples_per_s", "versions"} <= summary.keys()
    for picture in ("curves.png", "trust.png"):
        image = matplotlib_image.imread(folder / picture)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert checkpoint(folder)["epoch"] == epochs
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]
    return summary


def test_short_default_run_writes_valid_files(tmp_path: Path) -> None:
    """The default recipe (digits, MLP, LARS, batch 512) for a few epochs: every file is valid."""
    out = tmp_path / "run"
    assert main(["train", "--epochs", "6", "--warmup-epochs", "2", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    summary = assert_run_files(out, epochs=6)
    assert summary["config"]["data"] == "digits" and summary["config"]["batch_size"] == 512
    assert summary["data"]["train_samples"] == 1437 and summary["data"]["test_samples"] == 360
    assert summary["final_test_accuracy"] > 0.8


@pytest.mark.slow
def test_default_run_reaches_95_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``larsopt train`` with no options: >= 0.95 test accuracy on digits."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert assert_run_files(folder, epochs=40)["final_test_accuracy"] >= 0.95


def test_subprocess_run_and_plain_progress_lines(tmp_path: Path) -> None:
    out = tmp_path / "run"
    quick = [option for option in QUICK if option != "--quiet"]
    done = subprocess.run([sys.executable, "-m", "larsopt", "train", *quick, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["1/3", "2/3", "3/3"]  # "epoch k/3 ..." (not a TTY)
    assert lines[-1].startswith("test accuracy ") and lines[-1].endswith(f"outputs in {out}")
    assert_run_files(out, epochs=3)


def test_default_out_folder_is_new_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", *QUICK, "--epochs", "1"]) == 0
    assert main(["train", *QUICK, "--epochs", "1"]) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    assert str(Path("runs") / folders[1].name) in capsys.readouterr().out


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train(tmp_path / name, "--seed", seed) == 0
    assert metrics_without_time(tmp_path / "a") == metrics_without_time(tmp_path / "b")
    assert_same_state(checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b"))
    assert metrics_without_time(tmp_path / "a") != metrics_without_time(tmp_path / "c")


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_ctrl_c_saves_and_resume_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      model: str) -> None:
    """Ctrl-C in the middle of epoch 2 (step 7 of 15): checkpoint, exit 130; --resume then ends
    with exactly the weights, optimizer state and metrics of a run never stopped."""
    options = ("--model", model, "--checkpoint-every", "2")
    assert train(tmp_path / "whole", *options) == 0

    original_step = Progress.step

    def step_then_ctrl_c(self: Progress, loss: float, accuracy: float, batch_size: int) -> None:
        original_step(self, loss, accuracy, batch_size)
        if self.done_steps == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "step", step_then_ctrl_c)
    stopped = tmp_path / "stopped"
    assert train(stopped, *options) == 130
    saved = checkpoint(stopped)
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    assert len(metrics_without_time(stopped)) == 1
    monkeypatch.setattr(Progress, "step", original_step)

    assert main(["train", "--out", str(stopped), "--resume", "--quiet", "--threads", "1"]) == 0
    assert metrics_without_time(stopped) == metrics_without_time(tmp_path / "whole")
    assert_same_state(checkpoint(stopped), checkpoint(tmp_path / "whole"))
    assert_run_files(stopped, epochs=3)


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL a subprocess after its first checkpoint, rows logged after the checkpoint are
    dropped, and --resume finishes exactly like an uninterrupted run."""
    options = ["--data", "synthetic:2000", "--batch-size", "16", "--epochs", "6", "--warmup-epochs", "1",
               "--checkpoint-every", "2", "--quiet", "--threads", "1"]
    assert main(["train", *options, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "larsopt", "train", *options, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint(killed)["epoch"] < 6
    assert main(["train", "--out", str(killed), "--resume", "--quiet", "--threads", "1"]) == 0
    assert metrics_without_time(killed) == metrics_without_time(tmp_path / "whole")
    assert_same_state(checkpoint(killed), checkpoint(tmp_path / "whole"))


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    assert train(tmp_path / "run") == 0
    before = checkpoint(tmp_path / "run")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet", "--threads", "1"]) == 0
    assert_same_state(before, checkpoint(tmp_path / "run"))


def test_overwrite_replaces_an_earlier_run(tmp_path: Path) -> None:
    assert train(tmp_path / "run", "--epochs", "2") == 0
    assert train(tmp_path / "run", "--overwrite") == 0
    assert_run_files(tmp_path / "run", epochs=3)


def write_npz(path: Path, shape: tuple[int, ...], **overrides: np.ndarray | None) -> Path:
    """A 3-class npz data set; an override of None leaves that array out."""
    generator = np.random.default_rng(0)
    arrays = {
        "x_train": generator.normal(size=(40, *shape)).astype(np.float32),
        "y_train": np.arange(40) % 3,
        "x_test": generator.normal(size=(12, *shape)).astype(np.float32),
        "y_test": np.arange(12) % 3,
    }
    arrays.update(overrides)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def write_cifar(folder: Path, train_images: int = 30, test_images: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    names = [(f"data_batch_{index}", train_images) for index in range(1, 6)] + [("test_batch", test_images)]
    for name, count in names:
        batch = {b"data": generator.integers(0, 256, size=(count, 3072), dtype=np.uint8),
                 b"labels": [int(label) for label in generator.integers(0, 10, size=count)]}
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file)
    return folder


@pytest.mark.parametrize("shape,model", [((20,), "mlp"), ((6, 6), "cnn"), ((3, 5, 5), "resnet")])
def test_npz_loader_trains(tmp_path: Path, shape: tuple[int, ...], model: str) -> None:
    path = write_npz(tmp_path / "data.npz", shape)
    out = tmp_path / "run"
    assert main(["train", "--data", f"npz:{path}", "--model", model, "--batch-size", "16", "--epochs", "1",
                 "--quiet", "--threads", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected_shape = list(shape) if len(shape) != 2 else [1, *shape]
    assert summary["data"] == {"name": "npz:data.npz", "train_samples": 40, "test_samples": 12,
                               "input_shape": expected_shape, "num_classes": 3}


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_loader_trains(tmp_path: Path, nested: bool) -> None:
    root = tmp_path / "cifar"
    write_cifar(root / "cifar-10-batches-py" if nested else root)
    out = tmp_path / "run"
    assert main(["train", "--data", f"cifar10:{root}", "--model", "cnn", "--batch-size", "32", "--epochs", "1",
                 "--quiet", "--threads", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["input_shape"] == [3, 32, 32]
    assert (summary["data"]["train_samples"], summary["data"]["test_samples"]) == (150, 10)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs(tmp_path: Path, precision: str) -> None:
    assert train(tmp_path / "run", "--precision", precision, "--epochs", "2") == 0
    rows = metrics_without_time(tmp_path / "run")
    assert len(rows) == 2 and all(np.isfinite(row["train_loss"]) for row in rows)


@pytest.mark.parametrize("optimizer,schedule,exclude,model", [
    ("sgd", "cosine", "ndim", "resnet"), ("lars", "constant", "mxnet", "cnn"), ("lars", "poly", "none", "mlp")])
def test_optimizer_schedule_exclude_model_options(tmp_path: Path, optimizer: str, schedule: str, exclude: str,
                                                  model: str) -> None:
    assert train(tmp_path / "run", "--optimizer", optimizer, "--schedule", schedule, "--exclude", exclude,
                 "--model", model, "--epochs", "1") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["optimizer"] == optimizer
    expected_peak = 0.1 * 32 / 256 if optimizer == "sgd" else 10.0
    assert summary["config"]["peak_lr"] == pytest.approx(expected_peak)


def test_schedule_factors() -> None:
    poly = WarmupThenDecay("poly", warmup_steps=4, total_steps=14)
    assert [poly(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert poly(4) == 1.0 and poly(9) == pytest.approx(0.25) and poly(13) == pytest.approx(0.01)
    cosine = WarmupThenDecay("cosine", warmup_steps=0, total_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5)
    assert WarmupThenDecay("constant", warmup_steps=2, total_steps=10)(7) == 1.0


def test_logged_trust_ratio_is_the_optimizers() -> None:
    """The trust ratio in trust.png is the one larsopt's reference step computes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model(torch.randn(8, 5)).square().sum().backward()
    with torch.no_grad():
        model[2].weight.grad.zero_()  # |g| == 0 falls back to 1 in both
    groups = larsopt.param_groups(model, weight_decay=0.01, exclude="ndim")
    layers = [(name, param, group["weight_decay"]) for group in groups if group["lars"]
              for name, param in zip(group["param_names"], group["params"])]
    logged = trust_ratios(layers, eta=0.02, grad_scale=1.0)
    expected = [reference.trust_ratio(torch.linalg.vector_norm(param), param.grad, param, weight_decay=decay,
                                      eta=0.02, epsilon=1e-8, trust_norm="sum").item()
                for _, param, decay in layers]
    assert logged == pytest.approx(expected, rel=1e-6)
    assert logged[-1] == 1.0


def test_trust_ratios_of_a_lars_run_are_the_ones_its_steps_applied(monkeypatch: pytest.MonkeyPatch,
                                                                    single_thread: None) -> None:
    """With trust_norm="update" and a large epsilon the logged ratios are the optimizer's own
    (opt.telemetry()): trust.png once recomputed them with the "sum" norm and epsilon 1e-8."""
    from larsopt.cli import data
    from larsopt.cli.config import RunConfig
    from larsopt.cli.training import Trainer

    lars = larsopt.LARS
    monkeypatch.setattr(larsopt, "LARS", lambda *args, **kwargs: lars(
        *args, **{**kwargs, "trust_norm": "update", "epsilon": 0.05}))
    config = RunConfig(data="synthetic:200", batch_size=32, epochs=1, threads=1).resolved(device="cpu", threads=1)
    trainer = Trainer(config, data.load(config.data, config.image_size))
    assert trainer.optimizer.param_groups[0]["trust_norm"] == "update"
    trainer.train_step()
    telemetry = trainer.optimizer.telemetry()
    assert trainer.totals.trust_sum == [telemetry[name][2].item() for name in trainer.trust_names]
    assert len(trainer.trust_names) == 3 and all(0 < ratio < 0.5 for ratio in trainer.totals.trust_sum)


def test_compare_writes_table_json_and_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three optimizers (a preset among them) on two batch sizes: a table line, a compare.json
    point and a line of compare.png each."""
    out = tmp_path / "compare"
    assert main(["compare", "--data", "synthetic:200", "--batch-sizes", "16,64", "--epochs", "2",
                 "--optimizers", "lars,optax,sgd", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["optimizers"] == ["lars", "optax", "sgd"] and report["complete"] is True
    assert [(run["optimizer"], run["batch_size"]) for run in report["runs"]] == [
        ("lars", 16), ("optax", 16), ("sgd", 16), ("lars", 64), ("optax", 64), ("sgd", 64)]
    sgd_64 = next(run for run in report["runs"] if run["optimizer"] == "sgd" and run["batch_size"] == 64)
    assert sgd_64["peak_lr"] == pytest.approx(0.1 * 64 / 256)
    assert report["lr"] == {"lars": 10.0, "optax": 10.0, "sgd_per_256": 0.1}
    image = matplotlib_image.imread(out / "compare.png")
    assert image.ndim == 3 and image.shape[1] > 500
    lines = capsys.readouterr().out.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:3] == ["batch", "steps", "optimizer"])
    table = [line.split() for line in lines[header + 2:header + 8]]
    assert [(row[0], row[2]) for row in table] == [("16", "lars"), ("16", "optax"), ("16", "sgd"), ("64", "lars"),
                                                   ("64", "optax"), ("64", "sgd")]
    for row, run in zip(table, report["runs"]):
        assert float(row[3]) == pytest.approx(run["final_test_accuracy"], abs=5e-5)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    outputs.save_checkpoint(target, {"format": 1, "value": torch.ones(3)})

    def torn_write(file: object) -> None:
        file.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError):
        outputs.atomic_write(target, torn_write)
    assert torch.equal(outputs.load_checkpoint(target)["value"], torch.ones(3))
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_bench_delegates_to_larsopt_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    received = []
    fake = types.ModuleType("larsopt.bench")
    fake.main = lambda argv: received.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "larsopt.bench", fake)
    monkeypatch.setattr(larsopt, "bench", fake, raising=False)
    assert main(["bench", "--quick", "x"]) == 0
    assert received == [["--quick", "x"]]


def test_bench_without_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "larsopt.bench", None)  # import of larsopt.bench fails
    monkeypatch.delattr(larsopt, "bench", raising=False)
    assert main(["bench"]) == 2
    assert "no larsopt.bench module" in capsys.readouterr().err


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a word the error line must contain)."""
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    empty_cifar = tmp_path / "empty_cifar"
    empty_cifar.mkdir()
    broken_cifar = write_cifar(tmp_path / "broken_cifar")
    (broken_cifar / "test_batch").write_bytes(b"\x80\x04 not a pickle")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    flat = write_npz(tmp_path / "flat.npz", (7,))
    return {
        "missing npz": (["--data", f"npz:{tmp_path / 'nope.npz'}"], "no such file"),
        "malformed npz": (["--data", f"npz:{garbage}"], "not a readable .npz"),
        "npz without y_test": (["--data", f"npz:{write_npz(tmp_path / 'k.npz', (4,), y_test=None)}"], "y_test"),
        "npz labels mismatch": (["--data", f"npz:{write_npz(tmp_path / 'm.npz', (4,), y_test=np.arange(3))}"],
                                "y_test"),
        "missing cifar folder": (["--data", f"cifar10:{tmp_path / 'nope'}"], "no such folder"),
        "empty cifar folder": (["--data", f"cifar10:{empty_cifar}"], "no CIFAR-10 batches"),
        "broken cifar batch": (["--data", f"cifar10:{broken_cifar}"], "not a CIFAR-10 python batch"),
        "unknown data kind": (["--data", "mnist"], "--data"),
        "bad synthetic count": (["--data", "synthetic:lots"], "integer"),
        "zero batch size": (["--batch-size", "0"], "--batch-size"),
        "negative batch size": (["--batch-size", "-8"], "--batch-size"),
        "zero epochs": (["--epochs", "0"], "--epochs"),
        "negative lr": (["--lr", "-0.1"], "--lr"),
        "text lr": (["--lr", "fast"], "--lr"),
        "momentum 1": (["--momentum", "1"], "--momentum"),
        "unknown model": (["--model", "vgg"], "--model"),
        "unknown optimizer": (["--optimizer", "adam"], "--optimizer"),
        "unknown option": (["--learning-rate", "1"], "--learning-rate"),
        "cnn on feature vectors": (["--data", f"npz:{flat}", "--model", "cnn"], "--model cnn"),
        "out is a file": (["--out", str(a_file)], "is a file"),
        "out not empty": (["--out", str(full)], "not empty"),
        "resume without checkpoint": (["--out", str(full), "--resume"], "no checkpoint.pt"),
        "resume without out": (["--resume"], "--resume needs --out"),
    }


BAD_INPUT_NAMES = [
    "missing npz", "malformed npz", "npz without y_test", "npz labels mismatch", "missing cifar folder",
    "empty cifar folder", "broken cifar batch", "unknown data kind", "bad synthetic count", "zero batch size",
    "negative batch size", "zero epochs", "negative lr", "text lr", "momentum 1", "unknown model",
    "unknown optimizer", "unknown option", "cnn on feature vectors", "out is a file", "out not empty",
    "resume without checkpoint", "resume without out"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str) -> None:
    cases = bad_inputs(tmp_path)
    assert sorted(cases) == sorted(BAD_INPUT_NAMES)
    arguments, word = cases[name]
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    if "--out" not in arguments and "--resume" not in arguments:
        arguments = [*arguments, "--out", str(tmp_path / "new")]
    assert main(["train", *arguments]) == 2
    captured = capsys.readouterr()
    error_lines = captured.err.splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("larsopt: error: "), captured.err
    assert word in error_lines[0]
    assert snapshot(tmp_path) == before  # nothing written, overwritten or deleted
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_changed_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "--epochs", "1") == 0
    before = snapshot(tmp_path / "run")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "3"]) == 2
    assert "--lr 3.0 differs from the checkpoint's 10.0" in capsys.readouterr().err
    assert snapshot(tmp_path / "run") == before


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "larsopt", "train", "--data", f"cifar10:{tmp_path / 'none'}",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"larsopt: error: --data cifar10:{tmp_path / 'none'}: no such folder"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_without_a_gpu_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "--device", "cuda") == 2
    assert "--device cuda" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_help_lists_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--resume" in text and "--precision" in text
