"""``larsopt train --optimizer NAME`` for every preset and ``larsopt compare --optimizers``: the run's
settings on each preset's own arguments, the exclusion rule through each peer's own mechanism,
exact resumption, and bad names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import larsopt
from larsopt.cli import main, optimizers, plots
from larsopt.cli.config import OPTIMIZERS, PRESETS, RunConfig
from larsopt.cli.errors import UsageError
from larsopt.cli.models import ResNet
from larsopt.cli.progress import Progress

pytest.importorskip("sklearn")
matplotlib_image = pytest.importorskip("matplotlib.image")

TIME_KEYS = {"epoch_time_s", "samples_per_s", "elapsed_s"}
# 160 synthetic training samples at batch 32: 5 steps per epoch, 10 in all.
TINY = ["--data", "synthetic:200", "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--quiet",
        "--threads", "1"]


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIME_KEYS} for row in rows]


def saved(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("larsopt: error: "), lines
    return lines[0]


def test_every_preset_is_an_optimizer_name() -> None:
    assert set(PRESETS) == set(larsopt.presets.__all__)
    assert OPTIMIZERS == ("lars", "sgd", *PRESETS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   name: str) -> None:
    """A tiny run with each optimizer; Ctrl-C at step 7 of 10 (inside epoch 2), then --resume ends
    with the weights, optimizer state and metrics of the run never stopped."""
    # The pictures take most of a tiny run's time; other tests draw them.
    monkeypatch.setattr(plots, "curves", lambda *args: None)
    monkeypatch.setattr(plots, "trust_heatmap", lambda *args: None)
    assert main(["train", *TINY, "--optimizer", name, "--out", str(tmp_path / "whole")]) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["config"]["optimizer"] == name
    assert summary["config"]["peak_lr"] == pytest.approx(0.1 * 32 / 256 if name == "sgd" else 10)
    assert summary["final_test_accuracy"] > 0.2  # 10 classes: it learns something in 10 steps

    original_step = Progress.step

    def step_then_ctrl_c(self: Progress, loss: float, accuracy: float, samples: int) -> None:
        original_step(self, loss, accuracy, samples)
        if self.done_steps == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "step", step_then_ctrl_c)
    stopped = tmp_path / "stopped"
    assert main(["train", *TINY, "--optimizer", name, "--out", str(stopped)]) == 130
    assert (saved(stopped)["epoch"], saved(stopped)["batch"]) == (1, 2)
    monkeypatch.setattr(Progress, "step", original_step)
    assert main(["train", "--out", str(stopped), "--resume", "--quiet"]) == 0

    assert metrics(stopped) == metrics(tmp_path / "whole")
    whole, resumed = saved(tmp_path / "whole"), saved(stopped)
    for key in whole["model"]:
        assert torch.equal(whole["model"][key], resumed["model"][key]), key
    assert whole["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for index, state in whole["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][key]) if isinstance(value, torch.Tensor) \
                else value == resumed["optimizer"]["state"][index][key]
    assert whole["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    # trust.png's ratios: the MLP's three weights (LARC adapts its biases too), every one finite.
    assert [len(row) for row in whole["trust_history"]] == [6 if name == "larc" else 3] * 2
    assert all(math.isfinite(ratio) and ratio > 0 for row in whole["trust_history"] for ratio in row)


def built(name: str, exclude: str, **settings: object) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    torch.manual_seed(0)
    model = ResNet(1, 10)
    config = RunConfig(optimizer=name, exclude=exclude, **settings).resolved(device="cpu", threads=1)
    return optimizers.build(config, model), model


def adapted_and_decayed(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """The torch names of the params that get a trust ratio and those that get weight decay."""
    name_of = {param: name for name, param in model.named_parameters()}
    adapted = {name_of[param] for _, param, _ in optimizers.trust_layers(optimizer)}
    decayed = {name_of[param] for group in optimizer.param_groups if group["weight_decay"] > 0
               for param in group["params"]}
    return adapted, decayed


def norm_or_bias(model: torch.nn.Module) -> set[str]:
    modules = dict(model.named_modules())
    return {name for name, _ in model.named_parameters()
            if name.endswith("bias") or isinstance(modules[name.rpartition(".")[0]], torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("exclude", ["norm_and_bias", "ndim", "mxnet", "none"])
@pytest.mark.parametrize("name", [name for name in OPTIMIZERS if name != "sgd"])
def test_the_exclusion_rule_through_each_peers_own_mechanism(name: str, exclude: str) -> None:
    """Which tensors of a ResNet (batch norm, a bias only in the classifier) get the trust ratio and
    weight decay under each preset and --exclude rule: the rule where the peer can say it, the
    peer's own rule where it cannot (docs/cli.md, "--optimizer")."""
    optimizer, model = built(name, exclude)
    assert isinstance(optimizer, larsopt.LARS)
    names = {param_name for param_name, _ in model.named_parameters()}
    one_d = {param_name for param_name, param in model.named_parameters() if param.ndim == 1}
    norms = norm_or_bias(model)
    assert norms == one_d  # in this model the rules' sets coincide: the peers' rules are told apart below
    no_trust = {"norm_and_bias": norms, "ndim": one_d, "mxnet": {n for n in names if n.endswith("bias")},
                "none": set()}[exclude]
    no_decay = set() if exclude in ("mxnet", "none") else no_trust
    adapted, decayed = adapted_and_decayed(optimizer, model)
    expected = {
        "lars": (names - no_trust, names - no_decay),
        "optax": (names - no_trust, names - no_decay),
        "ssl": (names - no_trust, names - no_decay),
        "timm": (names - no_decay, names - no_decay),
        "bolts": (names - no_decay, names - no_decay),
        "pytorch_optimizer": (names - one_d, names - one_d - no_decay),
        "larc": (names, names - no_decay),
        "mlperf": (names - no_trust, names - no_trust),
        "mxnet": (names - norms, names - no_decay),
    }[name]
    assert (adapted, decayed) == expected
    groups = optimizer.param_groups
    assert all(group["telemetry"] for group in groups)
    assert {group["lr"] for group in groups} == {10.0} and {group["momentum"] for group in groups} == {0.9}
    assert {group["eta"] for group in groups} == {0.001}
    assert {group["weight_decay"] for group in groups} <= {0.0, 5e-4}


def test_the_presets_keep_their_own_formulas_and_eps() -> None:
    """The run's settings reach the preset's arguments; everything else is the peer's own."""
    options = {name: built(name, "norm_and_bias", lr=3.0, momentum=0.8, weight_decay=1e-3, eta=0.02)[0]
               for name in PRESETS}
    for name, optimizer in options.items():
        for group in optimizer.param_groups:
            assert (group["lr"], group["momentum"], group["eta"]) == (3.0, 0.8, 0.02), name
            assert group["weight_decay"] in (0.0, 1e-3), name
    form = {name: optimizer.param_groups[0]["momentum_form"] for name, optimizer in options.items()}
    assert form == {"timm": "torch", "pytorch_optimizer": "torch", "bolts": "torch", "larc": "torch",
                    "optax": "paper", "mlperf": "paper", "ssl": "torch", "mxnet": "paper"}
    epsilon = {name: optimizer.param_groups[0]["epsilon"] for name, optimizer in options.items()}
    assert epsilon == {"timm": 1e-8, "pytorch_optimizer": 0.0, "bolts": 1e-8, "larc": 1e-8, "optax": 0.0,
                       "mlperf": 1e-7, "ssl": 0.0, "mxnet": 1e-8}
    assert all(group["trust_clip"] for group in options["larc"].param_groups)


def test_mxnet_sees_gluons_names() -> None:
    optimizer, _ = built("mxnet", "none")
    names = {name for group in optimizer.param_groups for name in group["param_names"]}
    assert {"stem.1.gamma", "stem.1.beta", "blocks.0.bn1.gamma", "fc.bias", "fc.weight"} <= names
    assert not any(name.endswith(("bn1.weight", "bn1.bias")) for name in names)


def test_an_mlperf_skip_list_that_would_match_a_kept_name_is_refused() -> None:
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.nn.Parameter(torch.ones(3))
            self.vw = torch.nn.Parameter(torch.ones(3, 3))

    config = RunConfig(optimizer="mlperf", exclude="ndim").resolved(device="cpu", threads=1)
    with pytest.raises(UsageError, match="excluded 'v' is part of 'vw'"):
        optimizers.build(config, Model())
    optimizers.build(dataclasses.replace(config, exclude="none"), Model())


@pytest.mark.parametrize("arguments", [["train", "--optimizer", "adam"], ["compare", "--optimizers", "lars,adam"],
                                       ["train", "--optimizer", "LARS"]])
def test_a_bad_optimizer_name_is_one_line_listing_the_names(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            arguments: list[str]) -> None:
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert f"expected one of {', '.join(OPTIMIZERS)}, got" in line
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_optimizer_given_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--optimizers", "lars,timm,pytorch-optimizer,pytorch_optimizer",
                 "--out", str(tmp_path / "c")]) == 2
    assert "pytorch_optimizer given more than once" in error_line(capsys)


def test_pytorch_optimizer_spelled_as_the_package_and_resume_refuses_another_optimizer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--warmup-epochs", "0.4", "--optimizer", "pytorch-optimizer",
                 "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["config"]["optimizer"] == "pytorch_optimizer"
    assert matplotlib_image.imread(run / "trust.png").ndim == 3  # the ratios the preset's steps applied
    assert main(["train", "--out", str(run), "--resume", "--optimizer", "pytorch_optimizer", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--optimizer", "timm"]) == 2
    assert "--optimizer timm differs from the checkpoint's pytorch_optimizer" in error_line(capsys)


def test_timm_without_weight_decay_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY, "--epochs", "1", "--warmup-epochs", "0.4", "--optimizer", "timm",
                 "--weight-decay", "0", "--out", str(tmp_path / "run")]) == 0
    assert "timm adapts only the param groups with weight decay" in capsys.readouterr().err
