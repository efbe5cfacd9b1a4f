"""Every LarsOptions field once, for the tests: values to try it at and values it must refuse.

A new option added to ``larsopt.options.LarsOptions`` must be listed here (``test_options`` fails
until it is); the impl-vs-reference walk, the combination sweep and the validation tests read it.
Which paths implement which values is not repeated here: it is each path's ``SUPPORTED`` table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptionCase:
    #: values other than the default that the walk runs every impl at (each on top of ``base``)
    values: tuple
    #: values the front-ends refuse with a ValueError naming the option
    bad: tuple
    #: other options the walk sets along with it (e.g. nesterov needs momentum)
    base: tuple = ()
    #: the values the combination sweep of test_impl crosses with every other option's
    sweep: tuple = ()
    #: what the walk steps, so that the option matters: "dense" float32 tensors, "master" (bfloat16
    #: params with float32 masters), "bf16" (bfloat16 params), "sparse" (a row-sparse gradient),
    #: "first_step" (no momentum buffers yet), "previous_lr" (the lr of a previous step is known)
    inputs: str = "dense"


OPTIONS: dict[str, OptionCase] = {
    "lr": OptionCase(values=(0.0, 2.0, torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64)),
                     bad=(-0.1, float("nan"), float("inf"), "0.1", torch.tensor([0.1]), torch.tensor(-1.0))),
    "momentum": OptionCase(values=(0.5, 0.9), bad=(-0.1, 1.0, 1.5, "0.9", None), sweep=(0.0, 0.9)),
    "eta": OptionCase(values=(0.0, 0.02, 1.0), bad=(-1.0, float("inf"), None)),
    "epsilon": OptionCase(values=(0.5,), bad=(-1e-8, float("nan"))),
    "weight_decay": OptionCase(values=(0.1,), bad=(-0.1, float("inf"), "0"), sweep=(0.0, 0.1)),
    "adapt": OptionCase(values=(False,), bad=("yes", 1, None), sweep=(True, False)),
    "nesterov": OptionCase(values=(True,), bad=("yes", 1), base=(("momentum", 0.9),), sweep=(False, True)),
    "momentum_form": OptionCase(values=("torch",), bad=("sgd", None), base=(("momentum", 0.9),),
                                sweep=("paper", "torch")),
    "trust_norm": OptionCase(values=("update",), bad=("l2", None), base=(("weight_decay", 0.1),),
                             sweep=("sum", "update")),
    "trust_clip": OptionCase(values=(True,), bad=("yes", 0), sweep=(False, True)),
    "rescale_grad": OptionCase(values=(2.0, -0.5, 0.0), bad=(float("nan"), "1", None), base=(("weight_decay", 0.1),),
                               sweep=(1.0, 2.0)),
    "clip_gradient": OptionCase(values=(0.8, 0.0), bad=(-1.0, "1", float("nan")), sweep=(None, 0.8)),
    "maximize": OptionCase(values=(True,), bad=("yes", None), sweep=(False, True)),
    "norm_source": OptionCase(values=("param",), bad=("grad", None), inputs="master"),
    "math_dtype": OptionCase(values=(torch.float64, torch.float16), bad=(torch.int32, "float32")),
    "lazy_update": OptionCase(values=(False,), bad=("yes", None), base=(("momentum", 0.9),), inputs="sparse"),
    "stochastic_rounding": OptionCase(values=(True,), bad=("yes", None), inputs="bf16"),
    "dampening": OptionCase(values=(0.3, 1.0), bad=(-0.1, 1.5, "0"), base=(("momentum", 0.9),)),
    "buffer_start": OptionCase(values=("zeros",), bad=("ones", None), base=(("momentum", 0.9), ("dampening", 0.3)),
                               inputs="first_step"),
    "adapt_when": OptionCase(values=("weight_decay",), bad=("never", None)),
    "fallback": OptionCase(values=("plain_step",), bad=("skip", None),
                           base=(("trust_clip", True), ("weight_decay", 0.1))),
    "fallback_on": OptionCase(values=("zero_denominator",), bad=("never", None), base=(("weight_decay", 0.1),)),
    "momentum_correction": OptionCase(values=(True,), bad=("yes", None), base=(("momentum", 0.9),),
                                      inputs="previous_lr"),
}


def sweep_names_and_values() -> tuple[tuple[str, ...], tuple[tuple, ...]]:
    """The options the combination sweep crosses, and their values (defaults first)."""
    names = tuple(name for name, case in OPTIONS.items() if case.sweep)
    return names, tuple(OPTIONS[name].sweep for name in names)
