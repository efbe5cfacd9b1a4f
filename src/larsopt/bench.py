"""``larsopt bench``: optimizer-step time of every larsopt path against torch SGD and other LARS.

Method (the same as the measurements in ``docs/performance.md``):

* Parameter sets with random gradients: ResNet-50 (torchvision's 161 tensor shapes, 25,557,032
  params), BERT-base (199 tensors, 109,482,240 params) and "small" (2,000 tensors x 1,024).
* Every row steps its own params (fresh optimizer state) with the same gradients. The first
  step of each row is timed on its own ("first ms": kernel builds, compiles).
* Every set, BERT-base included, times ``--steps`` steps per row (default 60), after 3 warm-up
  steps. Timing interleaves blocks of 5 consecutive steps per row and rotates the order every
  round, so the drift of a shared machine hits all rows alike. The table gives the median and the
  25-75th percentiles; ratios are taken against torch SGD ``fused=True`` from the same run.
* The 1-minute load average is sampled after every round; each set reports its min, median and
  max, with a warning when it exceeded the CPU count: other programs then competed for the CPUs,
  so the absolute times are unreliable (the ratios between the interleaved rows much less so).
* "eff. GB/s" uses the minimal traffic: SGD with momentum 20 bytes/param (read w, g, b; write w, b),
  LARS 28 (w and g read twice), 24 with ``carry_weight_norms`` (g read twice); the probe ``a.add_(b)`` on one
  flat tensor moves 12.
* "faults/step" are the minor page faults of the process per step (``getrusage``): a step that
  allocates fresh memory proportional to the model shows thousands.
* Hyper-parameters: lr 0.1, momentum 0.9, weight decay 5e-5, trust coefficient 0.001, eps 1e-8.

Peers that are not installed are listed with a note instead of numbers: pytorch-optimizer
(``pip install pytorch-optimizer``) and timm's LARS, loaded from ``timm/optim/lars.py`` as a
standalone module because ``import timm`` needs torchvision.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from larsopt import LARS, functional
from larsopt._impl import fused_cpu

LR, MOMENTUM, WEIGHT_DECAY, TRUST, EPS = 0.1, 0.9, 5e-5, 0.001, 1e-8
PARAM_SETS = ("resnet50", "bert", "small")
DTYPES = ("float32", "bfloat16")
BLOCK_STEPS = 5  # consecutive timed steps of one row per round
WARMUP_STEPS = 3


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision resnet50's parameter shapes, in ``named_parameters()`` order (161 tensors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if block == 0:
                shapes += [(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)]
            inplanes = width * 4
    return shapes + [(1000, 2048), (1000,)]


def bert_base_shapes() -> list[tuple[int, ...]]:
    """BERT-base (uncased) parameter shapes with the pooler (199 tensors)."""
    hidden, ffn = 768, 3072
    shapes: list[tuple[int, ...]] = [(30522, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(12):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,)]
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    return shapes + [(hidden, hidden), (hidden,)]


def param_set_shapes(name: str) -> list[tuple[int, ...]]:
    if name == "resnet50":
        return resnet50_shapes()
    if name == "bert":
        return bert_base_shapes()
    return [(1024,)] * 2000


@dataclass
class Row:
    """One implementation under test: ``step()`` advances it by one optimizer step."""

    name: str
    bytes_per_param: int
    step: Callable[[], Any] | None = None
    note: str = ""
    first_ms: float = math.nan
    times_ms: list[float] = field(default_factory=list)
    faults: int = 0


def _load_timm_lars() -> tuple[type | None, str]:
    """timm's ``Lars`` class loaded from its file (``import timm`` needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.submodule_search_locations is None:
        return None, "timm not installed (pip install --no-deps timm)"
    optim_dir = Path(list(spec.submodule_search_locations)[0]) / "optim"
    package = types.ModuleType("_larsopt_bench_timm_optim")
    package.__path__ = [str(optim_dir)]
    sys.modules[package.__name__] = package
    try:
        for module in ("_helpers", "lars"):
            file_spec = importlib.util.spec_from_file_location(f"{package.__name__}.{module}", optim_dir / f"{module}.py")
            loaded = importlib.util.module_from_spec(file_spec)
            sys.modules[file_spec.name] = loaded
            file_spec.loader.exec_module(loaded)
        return sys.modules[f"{package.__name__}.lars"].Lars, ""
    except Exception as error:  # a timm version whose lars.py imports more than _helpers
        return None, f"timm's lars.py does not load standalone: {type(error).__name__}: {error}"


def _load_pto_lars() -> tuple[type | None, str]:
    try:
        from pytorch_optimizer import LARS as PtoLARS
    except ImportError:
        return None, "pytorch-optimizer not installed (pip install pytorch-optimizer)"
    return PtoLARS, ""


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh params (same values for every row: seeded) with ``.grad`` set to the shared grads."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape, grad in zip(shapes, grads):
        param = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.05).to(dtype))
        param.grad = grad
        params.append(param)
    return params


def _optimizer_row(name: str, bytes_per_param: int, make: Callable[[list[torch.Tensor]], Any],
                   shapes: list[tuple[int, ...]], dtype: torch.dtype, grads: list[torch.Tensor],
                   own_grads: bool = False, note: str = "") -> Row:
    if own_grads:  # the optimizer writes into p.grad: give it a copy so the other rows are unaffected
        grads = [g.clone() for g in grads]
    optimizer = make(_params(shapes, dtype, grads))
    return Row(name, bytes_per_param, optimizer.step, note)


def build_rows(set_name: str, dtype: torch.dtype) -> list[Row]:
    """Every row for one parameter set and dtype (peers not installed get a note, no step)."""
    shapes = param_set_shapes(set_name)
    generator = torch.Generator().manual_seed(1)
    grads = [(torch.randn(shape, generator=generator) * 0.01).to(dtype) for shape in shapes]
    numel = sum(math.prod(shape) for shape in shapes)
    probe_a = torch.zeros(numel, dtype=dtype)
    probe_b = torch.ones(numel, dtype=dtype)
    rows = [Row("probe: a.add_(b) in place, one flat tensor", 12, lambda: probe_a.add_(probe_b))]

    def sgd(**flags: bool) -> Callable[[list[torch.Tensor]], Any]:
        return lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **flags)

    rows.append(_optimizer_row("torch SGD fused=True", 20, sgd(fused=True), shapes, dtype, grads))
    rows.append(_optimizer_row("torch SGD foreach=True", 20, sgd(foreach=True), shapes, dtype, grads))
    rows.append(_optimizer_row("torch SGD for-loop (foreach=False)", 20, sgd(foreach=False), shapes, dtype, grads))
    lars_options = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=TRUST, epsilon=EPS)
    for impl in functional.IMPLS:
        label = f"larsopt impl={impl}" + (f" (= {functional.resolve_impl(impl)})" if impl == "auto" else "")
        rows.append(_optimizer_row(label, 28, lambda params, impl=impl: LARS(params, impl=impl, **lars_options),
                                   shapes, dtype, grads))
    # (24 bytes/param: the norm pass reads the gradient only)
    rows.append(_optimizer_row("larsopt carry_weight_norms=True", 24,
                               lambda params: LARS(params, carry_weight_norms=True, **lars_options), shapes, dtype, grads,
                               note="opt-in: the sum of w^2 carried from the previous update"))

    timm_lars, why = _load_timm_lars()
    for foreach in (False, True):
        name = f"timm Lars foreach={foreach}"
        if timm_lars is None:
            rows.append(Row(name, 28, note=why))
            continue
        rows.append(_optimizer_row(
            name, 28, lambda params, foreach=foreach: timm_lars(params, lr=LR, momentum=MOMENTUM,
                                                                weight_decay=WEIGHT_DECAY, trust_coeff=TRUST,
                                                                eps=EPS, foreach=foreach),
            shapes, dtype, grads))
    pto_lars, why = _load_pto_lars()
    for foreach in (False, True):
        name = f"pytorch-optimizer LARS foreach={foreach}"
        if pto_lars is None:
            rows.append(Row(name, 28, note=why))
            continue
        rows.append(_optimizer_row(
            name, 28, lambda params, foreach=foreach: pto_lars(params, lr=LR, momentum=MOMENTUM,
                                                               weight_decay=WEIGHT_DECAY, trust_coefficient=TRUST,
                                                               foreach=foreach),
            shapes, dtype, grads, own_grads=True, note="no LARS/wd on 1-D params; writes into p.grad"))
    return rows


def _timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def run_set(set_name: str, dtype: torch.dtype, *, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure every row of one parameter set; returns the JSON-ready result."""
    rows = build_rows(set_name, dtype)
    active = [row for row in rows if row.step is not None]
    for row in active:
        row.first_ms = _timed(row.step)
        for _ in range(WARMUP_STEPS):
            row.step()
    rounds = math.ceil(steps / BLOCK_STEPS)
    load_samples = []  # 1-minute load average after each round: how busy the machine was while timing
    for round_index in range(rounds):
        shift = round_index % len(active)
        for row in active[shift:] + active[:shift]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(BLOCK_STEPS):
                row.times_ms.append(_timed(row.step))
            row.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        load_samples.append(os.getloadavg()[0])
        log(f"  {set_name} {dtype}: round {round_index + 1}/{rounds}, load average {load_samples[-1]:.2f}")
    shapes = param_set_shapes(set_name)
    numel = sum(math.prod(shape) for shape in shapes)
    element_size = torch.empty((), dtype=dtype).element_size()
    medians = {row.name: statistics.median(row.times_ms) for row in active}
    sgd_fused = medians.get("torch SGD fused=True")
    probe = medians.get(rows[0].name)
    results = []
    for row in rows:
        entry: dict[str, Any] = {"name": row.name, "note": row.note}
        if row.step is not None:
            q1, _, q3 = statistics.quantiles(row.times_ms, n=4)
            median = medians[row.name]
            # Traffic model in float32 bytes; scaled for other element sizes.
            gigabytes = row.bytes_per_param * element_size / 4 * numel / 1e9
            entry.update(
                median_ms=median, min_ms=min(row.times_ms), p25_ms=q1, p75_ms=q3, first_ms=row.first_ms,
                vs_sgd_fused=median / sgd_fused if sgd_fused else None,
                effective_gbps=gigabytes / (median / 1e3),
                percent_of_probe=100 * (probe / median) * (row.bytes_per_param / 12) if probe else None,
                faults_per_step=row.faults / len(row.times_ms),
                steps=len(row.times_ms),
            )
        results.append(entry)
    return {"set": set_name, "dtype": str(dtype).removeprefix("torch."), "tensors": len(shapes), "params": numel,
            "load_average": {"min": min(load_samples), "median": statistics.median(load_samples),
                             "max": max(load_samples), "samples": load_samples},
            "rows": results}


def format_table(result: dict[str, Any], cpus: int) -> str:
    """A Markdown table of one parameter set, with the load average it ran under."""
    load = result["load_average"]
    lines = [
        f"### {result['set']}: {result['tensors']} tensors, {result['params']:,} {result['dtype']} params",
        "",
        f"Load average (1 min) after each round ({len(load['samples'])}): min {load['min']:.2f}, "
        f"median {load['median']:.2f}, max {load['max']:.2f} on {cpus} CPUs.",
        "",
        "| step | median ms | min ms | p25-p75 ms | vs SGD fused | first ms | eff. GB/s | % of probe | faults/step | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        if "median_ms" not in row:
            lines.append(f"| {row['name']} | - | - | - | - | - | - | - | - | skipped: {row['note']} |")
            continue
        lines.append(
            f"| {row['name']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | {row['p25_ms']:.2f}-{row['p75_ms']:.2f} | "
            f"{row['vs_sgd_fused']:.2f}x | {row['first_ms']:.1f} | {row['effective_gbps']:.1f} | "
            f"{row['percent_of_probe']:.0f}% | {row['faults_per_step']:.0f} | {row['note']} |"
        )
    if load["max"] > cpus:
        lines += ["", f"Warning: the load average reached {load['max']:.2f} on {cpus} CPUs: other programs competed "
                      "for them, so the absolute times are unreliable (ratios between the interleaved rows remain "
                      "comparable)."]
    return "\n".join(lines)


def _json_path(text: str) -> Path:
    """``--json FILE``: checked before the benchmark runs, so that minutes of measurement are
    not lost to a typo in the folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {path.parent} is not writable")
    return path


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected comma-separated names among {', '.join(allowed)}, "
                                             f"got {text!r}")
        return names

    return parse


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """``larsopt bench``'s options: one-line errors, names typed in full (as ``larsopt train``)."""
    from larsopt.cli.options import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="larsopt bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=_names(PARAM_SETS), default=list(PARAM_SETS),
                        help=f"comma-separated parameter sets among {', '.join(PARAM_SETS)} (default: all)")
    parser.add_argument("--dtypes", type=_names(DTYPES), default=["float32"],
                        help=f"comma-separated among {', '.join(DTYPES)} (default: float32)")
    parser.add_argument("--steps", type=_at_least(4), default=60,
                        help=f"timed steps per row of every set, at least 4, rounded up to whole blocks of "
                             f"{BLOCK_STEPS} (default 60)")
    parser.add_argument("--threads", type=_at_least(1), default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", type=_json_path, help="also write the results as JSON to FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print one table per parameter set. Returns the exit status (2 for
    bad arguments, with one line on stderr)."""
    from larsopt.cli import outputs
    from larsopt.cli.errors import USAGE_EXIT_CODE, UsageError

    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"larsopt: error: {error}", file=sys.stderr)
        return USAGE_EXIT_CODE
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # Other programs on a shared machine slow every row alike (the rows are interleaved), but the
    # absolute times with them: the load before, during (per set) and after says how busy it was.
    cpus = os.cpu_count()
    load_before = os.getloadavg()
    print(f"{cpus} CPUs, {torch.get_num_threads()} torch threads; load average (1 min) {load_before[0]:.2f}",
          flush=True)
    start = time.perf_counter()
    kernel = fused_cpu.load()
    kernel_note = (f"fused CPU kernel ready in {time.perf_counter() - start:.2f} s (built, or loaded from the disk cache)"
                   if kernel is not None else f"fused CPU kernel unavailable: {fused_cpu.unavailable_reason()}")
    print(kernel_note + "\n", flush=True)
    results = []
    with torch.no_grad():
        for set_name in args.sets:
            for dtype_name in args.dtypes:
                result = run_set(set_name, getattr(torch, dtype_name), steps=args.steps, log=log)
                results.append(result)
                print(format_table(result, cpus) + "\n", flush=True)
    load_after = os.getloadavg()
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after", flush=True)
    if args.json:
        outputs.write_json(args.json, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "fused_kernel": kernel_note, "cpus": cpus,
                                       "load_average": {"before": list(load_before), "after": list(load_after)},
                                       "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
