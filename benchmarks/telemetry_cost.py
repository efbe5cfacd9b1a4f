"""What ``LARS(..., telemetry=True)`` costs per step, on ResNet-50 and BERT-base shapes.

Three optimizers over the same shapes and gradients, each with its own params: telemetry off,
on, and on with a :class:`larsopt.telemetry.Accumulator` folding in every step. The params are
grouped as a LARS recipe groups them: matrices and kernels take the trust ratio, 1-D params
(biases, norm scales) are a ``lars=False`` group. Blocks of consecutive steps are interleaved and
their order rotated every round, so that a shared machine's drift hits all three alike; the
result is the median step time of each and the median over rounds of each one's ratio to "off"
in the same round. The telemetry's own work, the recording of one step, is also timed alone
(the same call on the same stats, many times), which no noise of the step hides.

    python benchmarks/telemetry_cost.py [--sets resnet50 bert] [--rounds 30] [--block 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from larsopt import LARS
from larsopt.bench import param_set_shapes
from larsopt.telemetry import Accumulator, recorder_of


def _optimizer(shapes: list[tuple[int, ...]], grads: list[torch.Tensor], telemetry: bool) -> LARS:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape, grad in zip(shapes, grads):
        param = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.05)
        param.grad = grad
        params.append(param)
    groups = [{"params": [p for p in params if p.dim() > 1]},
              {"params": [p for p in params if p.dim() <= 1], "lars": False, "weight_decay": 0.0}]
    return LARS(groups, lr=0.1, momentum=0.9, weight_decay=5e-5, eta=0.001, telemetry=telemetry)


def _timed_ms(step, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) * 1e3 / count


def measure(set_name: str, rounds: int, block: int) -> dict[str, float]:
    shapes = param_set_shapes(set_name)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=generator) * 0.01 for shape in shapes]
    optimizers = {"off": _optimizer(shapes, grads, False), "on": _optimizer(shapes, grads, True),
                  "on + accumulator": _optimizer(shapes, grads, True)}
    accumulator = Accumulator(optimizers["on + accumulator"])
    names = list(optimizers)
    for optimizer in optimizers.values():
        for _ in range(3):
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    for number in range(rounds):
        this_round = {}
        for name in names[number % len(names):] + names[:number % len(names)]:
            this_round[name] = _timed_ms(optimizers[name].step, block)
            times[name].append(this_round[name])
        for name in ratios:
            ratios[name].append(this_round[name] / this_round["off"])
        if number % 10 == 9:
            accumulator.read()  # (what a log every N steps does; not timed)
    result = {f"{name} ms": statistics.median(values) for name, values in times.items()}
    result.update({f"{name} / off (median of rounds)": statistics.median(values) for name, values in ratios.items()})

    optimizer = optimizers["on"]
    recorder = recorder_of(optimizer)
    parts = [(number, None, torch.rand(len(group["params"]), 3)) for number, group in enumerate(optimizer.param_groups)]
    repeat = 2000
    result["recording one step alone ms"] = min(_timed_ms(lambda: recorder.record(parts, None), repeat)
                                                for _ in range(3))
    recorder.accumulators.add(accumulator)
    result["recording with an accumulator ms"] = min(_timed_ms(lambda: recorder.record(parts, None), repeat)
                                                     for _ in range(3))
    recorder.accumulators.discard(accumulator)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["resnet50", "bert"], choices=["resnet50", "bert", "small"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=5, help="consecutive steps per timing")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for set_name in args.sets:
        result = measure(set_name, args.rounds, args.block)
        off = result["off ms"]
        print(f"\n{set_name} ({len(param_set_shapes(set_name))} tensors)")
        for key, value in result.items():
            extra = f"  ({value / off:.2%} of a step off)" if key.startswith("recording") else ""
            print(f"  {key:42s} {value:8.4f}{extra}")


if __name__ == "__main__":
    main()
