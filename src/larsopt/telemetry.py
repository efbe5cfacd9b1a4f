"""What LARS did to each layer: norms, trust ratios, step sizes and why a ratio fell back, as data.

``LARS(..., telemetry=True)`` keeps, per param, the norms and trust ratio its step computed anyway
and derives the rest from them and the group's options: no extra pass over weights or gradients,
no host synchronisation, every value a tensor on the params' device.

* :meth:`larsopt.LARS.telemetry`: the last step, a :class:`Telemetry` with the :data:`COLUMNS`.
* :class:`Accumulator`: every step since the last read folded in on the device (running mean,
  min and max of the ratio and step size, fallback and clip counts); :meth:`Accumulator.read`
  returns them (:data:`ACCUMULATED_COLUMNS`) and starts over.
* :func:`to_tensorboard` and :func:`to_jsonl` write either out (one read-back each).

Warnings (:class:`TelemetryWarning`, each once per param and optimizer), evaluated where values are
read back anyway (:meth:`Telemetry.to_dict`, hence :func:`to_tensorboard` and :func:`to_jsonl`),
never in the step:

* a param that took the trust-ratio fallback at each of its last :data:`FALLBACK_WARNING_STEPS`
  steps with a step size ``lr * lam`` of at least :data:`LARGE_STEP_SIZE` (the last step's, or the
  largest of an accumulator's window): its update is then ``lr`` times its gradient, as for a
  zero-initialised norm scale under a LARS lr of 10;
* a param whose trust ratio the LARC clip (``trust_clip``) capped at each of its last
  :data:`CLIP_WARNING_STEPS` steps: LARC is then plain SGD at the group's lr for it.

Turn them off with ``warnings.filterwarnings("ignore", category=larsopt.telemetry.TelemetryWarning)``.

What the three values of the step (|w|, |g|, lam) cannot show: with ``trust_norm="update"`` and
weight decay, the step also falls back where |g + wd * w| alone is 0 or not finite (g = -wd * w
exactly, or an overflow); that norm is not kept, so such a step is not flagged. The values are
float32: the norms of a float64 param beyond float32's range read inf, and below it 0.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import Tensor

from larsopt.options import LarsOptions

#: The columns of a step's :attr:`Telemetry.values`, per param:
#:
#: * ``w_norm``, ``g_norm``, ``trust_ratio``: |w|, |g| (the gradient the step used: after AMP
#:   unscaling, ``maximize`` and ``rescale_grad``) and lam after the LARC clip, as the step computed
#:   them; a group with ``lars=False`` has no norms (nan) and lam = 1.
#: * ``step_size``: ``lr * lam``, the factor of the update ``g + wd * w`` in the step.
#: * ``fallback``: 1 where the ratio was not taken (lam = 1 instead, clipped too under ``trust_clip``
#:   with ``fallback="ratio_one"``), and why, exactly one of:
#:   ``fallback_not_finite`` (|w| or |g| is inf or nan), ``fallback_zero_w`` (|w| = 0),
#:   ``fallback_zero_g`` (|g| = 0; with ``fallback_on="zero_denominator"``, the denominator
#:   without epsilon).
#: * ``clipped``: 1 where the ratio was taken and the LARC clip capped it (lam = 1 after the clip).
#: * ``skipped``: 1 where AMP skipped the step (``found_inf``); the other columns are what the step
#:   computed before discarding it (the fused CPU kernel computes nothing then: nan norms and ratio).
#: * ``fallback_streak``, ``clip_streak``: how many of the param's steps in a row, up to this one,
#:   fell back or were clipped (steps AMP skipped leave them as they were).
COLUMNS = ("w_norm", "g_norm", "trust_ratio", "step_size", "fallback", "clipped", "fallback_zero_w",
           "fallback_zero_g", "fallback_not_finite", "skipped", "fallback_streak", "clip_streak")

#: The columns of :meth:`Accumulator.read`, per param, over the steps since the last read:
#: ``steps`` counted (the param stepped, AMP did not skip), ``skipped`` by AMP; the mean, min and
#: max of the trust ratio and step size over the counted steps (nan without any); how many of them
#: fell back (and why) or were clipped; the streaks now.
ACCUMULATED_COLUMNS = ("steps", "skipped", "trust_ratio_mean", "trust_ratio_min", "trust_ratio_max",
                       "step_size_mean", "step_size_min", "step_size_max", "fallback", "clipped",
                       "fallback_zero_w", "fallback_zero_g", "fallback_not_finite", "fallback_streak",
                       "clip_streak")

#: Steps in a row on the fallback, at a large step size, before :class:`TelemetryWarning`.
FALLBACK_WARNING_STEPS = 100
#: A fallback step size ``lr * lam`` from which the plain gradient step is a hazard: plain SGD is
#: rarely stable above lr 1, LARS recipes run at 1 to 30.
LARGE_STEP_SIZE = 1.0
#: Steps in a row clipped by LARC before :class:`TelemetryWarning`.
CLIP_WARNING_STEPS = 100

# The Python type of each column in Telemetry.to_dict: flags bool, counts int, the rest float.
_KINDS = {COLUMNS: [float] * 4 + [bool] * 6 + [int] * 2, ACCUMULATED_COLUMNS: [int] * 2 + [float] * 6 + [int] * 7}
_ZERO_HINT = ("A tensor initialised to zero whose gradient is zero too stays there; exclude it from the trust "
              "ratio (a lars=False group, larsopt.param_groups) or initialise it otherwise.")
_REASONS = (("fallback_zero_w", "|w| = 0", _ZERO_HINT), ("fallback_zero_g", "|g| = 0", _ZERO_HINT),
            ("fallback_not_finite", "a norm not finite", "The weights or gradients hold inf or nan: the run has "
             "diverged, or inf gradients reach the step without AMP's skip (torch.amp.GradScaler)."))
# Column positions the step and the accumulator read.
_SUMMED = slice(COLUMNS.index("trust_ratio"), COLUMNS.index("fallback_not_finite") + 1)  # ratio .. reasons
_RANGED = slice(COLUMNS.index("trust_ratio"), COLUMNS.index("step_size") + 1)
_SKIPPED = COLUMNS.index("skipped")


class TelemetryWarning(UserWarning):
    """A param that LARS's trust ratio does not serve (see the module docstring)."""


class Telemetry:
    """Per-param values: ``values[i]`` is the row of ``names[i]``, one entry per ``columns``
    (:data:`COLUMNS` for a step, :data:`ACCUMULATED_COLUMNS` for an accumulator).

    The values stay tensors on the params' device; :meth:`to_dict` reads them back (one sync).
    ``adapted[i]``: whether ``names[i]``'s group takes the trust ratio (not ``lars=False``).
    """

    def __init__(self, names: list[str], values: Tensor, columns: tuple[str, ...] = COLUMNS, *,
                 adapted: list[bool] | None = None, warnings_from: _Recorder | None = None) -> None:
        self.names = names
        self.values = values
        self.columns = columns
        self.adapted = adapted if adapted is not None else [True] * len(names)
        self._recorder = warnings_from

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> Tensor:
        """The row of param ``name``."""
        try:
            return self.values[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no telemetry for param {name!r}; it has {self.names}") from None

    def column(self, name: str) -> Tensor:
        """One column for every param, as a vector."""
        return self.values[:, self.columns.index(name)]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{param name: {column: value}}`` as Python values (flags bool, counts int, else float):
        the one read-back. The warnings of the module docstring are evaluated here."""
        rows = self.values.tolist()
        kinds = _KINDS.get(self.columns, [float] * len(self.columns))
        values = {name: {column: kind(value) for column, kind, value in zip(self.columns, kinds, row)}
                  for name, row in zip(self.names, rows)}
        if self._recorder is not None:
            self._recorder.warn(values)
        return values


def recorder_of(optimizer: Any) -> _Recorder:
    """The telemetry kept between steps of a ``larsopt.LARS`` (made on first use; not part of its
    ``state_dict``, nor of a copy or pickle of it)."""
    recorder = optimizer.__dict__.get("_telemetry_recorder")
    if recorder is None:
        recorder = optimizer._telemetry_recorder = _Recorder(optimizer)
    return recorder


@dataclass
class _Part:
    """One telemetry group's share of a step, as recorded."""

    number: int  # the group's
    stepped: list[int] | None  # positions in the group of the params stepped (None: all)
    stats: Tensor  # (|w|, |g|, lam) per param stepped
    options: LarsOptions
    lr: float | Tensor  # (a tensor copied: a schedule may change the group's in place before a read)
    streaked: Tensor  # (fallback, clipped) per param stepped, float


class _Recorder:
    """One optimizer's telemetry: the last step, the streaks, its accumulators, the warnings given.
    Params have fixed slots: the params of the groups with telemetry, in group order.

    A step does only what the streaks need (whether each param fell back or was clipped); the rest
    of its table is derived when it is read, or in the step where an accumulator folds it in."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.layout: tuple[tuple[int, int], ...] = ()  # (group number, param count) of the telemetry groups
        self.offsets: dict[int, int] = {}  # group number -> its first slot
        self.slot_names: list[str] = []
        self.streaks: Tensor | None = None  # (slots, 2): fallback, clip
        self.accumulators: weakref.WeakSet[Accumulator] = weakref.WeakSet()
        self.warned: set[tuple[str, str]] = set()
        self._parts: list[_Part] = []  # the last step's
        self._skip: Tensor | None = None  # the last step's AMP skip flag (0-d bool)
        self._streak_rows: Tensor | None = None  # the streaks of the last step's rows, after it
        self._names: tuple[list[str], list[bool]] | None = None  # the last step's names and adapted, once read
        self._slot_index: tuple[tuple[int, ...], Tensor] | None = None
        # group number -> whether it took the trust ratio at its last step (for reads after the
        # optimizer is gone: an accumulator may outlive it)
        self._last_adapt: dict[int, bool] = {}

    def record(self, parts: list[tuple[int, list[int] | None, Tensor]], found_inf: Tensor | None) -> None:
        """Keep one step from each telemetry group's ``(group number, positions of the params stepped
        (None: all), stats)``; update the streaks and accumulators. Device ops only."""
        optimizer = self._optimizer()
        groups = optimizer.param_groups
        layout = tuple((number, len(group["params"])) for number, group in enumerate(groups) if group["telemetry"])
        device = parts[0][2].device
        if layout != self.layout or self.streaks is None or self.streaks.device != device:
            self._lay_out(optimizer, layout, device)
        self._skip = None if found_inf is None else found_inf.to(device) > 0
        self._parts = []
        for number, stepped, stats in parts:
            options = LarsOptions.from_group(groups[number]).effective()
            stats = stats.to(device)
            lr = options.lr.clone() if isinstance(options.lr, Tensor) else options.lr
            self._parts.append(_Part(number, stepped, stats, options, lr, _streaked(stats, options)))
            self._last_adapt[number] = options.adapt
        streaked = torch.cat([part.streaked for part in self._parts]) if len(parts) > 1 else self._parts[0].streaked
        slots = self._slots(parts, device)
        previous = self.streaks if slots is None else self.streaks[slots]
        streaks = (previous + 1) * streaked
        if self._skip is not None:
            streaks = torch.where(self._skip, previous, streaks)
        if slots is None:
            self.streaks.copy_(streaks)
        else:
            self.streaks[slots] = streaks
        self._streak_rows = streaks
        self._names = None
        if self.accumulators:
            table = self.table()
            for accumulator in self.accumulators:
                accumulator._fold(table, slots, self._skip, len(self.slot_names), device)

    def table(self) -> Tensor:
        """The last step's rows of :data:`COLUMNS`, derived from what the step kept. (Anew at each
        read: a replayed CUDA graph rewrites what the step kept without running this code.)"""
        device = self._streak_rows.device
        skipped = torch.zeros((), device=device) if self._skip is None else self._skip.to(torch.float32)
        rows = [_step_rows(part, skipped) for part in self._parts]
        return torch.cat([torch.cat(rows) if len(rows) > 1 else rows[0], self._streak_rows], 1)

    def last_step(self) -> Telemetry:
        """The last recorded step as a :class:`Telemetry` (its names looked up on read, not in the step)."""
        if not self._parts:
            return Telemetry([], torch.zeros(0, len(COLUMNS)), warnings_from=self)
        if self._names is None:
            names: list[str] = []
            adapted: list[bool] = []
            for part in self._parts:
                first = self.offsets[part.number]
                group_names = self.slot_names[first:first + dict(self.layout)[part.number]]
                group_names = group_names if part.stepped is None else [group_names[i] for i in part.stepped]
                names += group_names
                adapted += [part.options.adapt] * len(group_names)
            self._names = (names, adapted)
        names, adapted = self._names
        return Telemetry(list(names), self.table(), adapted=list(adapted), warnings_from=self)

    def _lay_out(self, optimizer: Any, layout: tuple[tuple[int, int], ...], device: torch.device) -> None:
        """(Re)assign slots: on the first step, and where groups were added or moved device."""
        self.layout = layout
        self.offsets, self.slot_names = {}, []
        for number, count in layout:
            self.offsets[number] = len(self.slot_names)
            group = optimizer.param_groups[number]
            self.slot_names += [optimizer._param_name(group, number, index) for index in range(count)]
            self._last_adapt[number] = LarsOptions.from_group(group).effective().adapt
        self.streaks = torch.zeros(len(self.slot_names), 2, device=device)
        self._slot_index = None

    def _slots(self, parts: list[tuple[int, list[int] | None, Tensor]], device: torch.device) -> Tensor | None:
        """The slots of the step's rows (None: every slot, in order)."""
        if len(parts) == len(self.layout) and all(stepped is None for _, stepped, _ in parts):
            return None
        slots = tuple(self.offsets[number] + index for number, stepped, stats in parts
                      for index in (range(len(stats)) if stepped is None else stepped))
        if self._slot_index is None or self._slot_index[0] != slots:
            # (non_blocking: an accelerator takes the copy without waiting for its queue)
            self._slot_index = (slots, torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True))
        return self._slot_index[1]

    def adapted_slots(self) -> list[bool]:
        """Per slot, whether its group takes the trust ratio now (once the optimizer is gone: at its
        last step)."""
        optimizer = self._optimizer()
        if optimizer is None:
            adapt = self._last_adapt
        else:
            adapt = {number: LarsOptions.from_group(optimizer.param_groups[number]).effective().adapt
                     for number, _ in self.layout}
        return [adapt[number] for number, count in self.layout for _ in range(count)]

    def warn(self, values: dict[str, dict[str, Any]]) -> None:
        """Give the warnings of the module docstring that ``values`` (read-back rows) call for."""
        for name, row in values.items():
            step_size = row["step_size"] if "step_size" in row else row["step_size_max"]
            if (row["fallback_streak"] >= FALLBACK_WARNING_STEPS and step_size >= LARGE_STEP_SIZE
                    and ("fallback", name) not in self.warned):
                self.warned.add(("fallback", name))
                reasons = [(label, hint) for column, label, hint in _REASONS if row[column]]
                warnings.warn(
                    f"LARS param {name!r} took the trust-ratio fallback (lam = 1: "
                    f"{', '.join(label for label, _ in reasons)}) at each of its last {row['fallback_streak']} "
                    f"steps, at step size lr * lam = {step_size:g}: its update is the plain gradient step at that "
                    f"size. {' '.join(dict.fromkeys(hint for _, hint in reasons))}", TelemetryWarning, stacklevel=3)
            if row["clip_streak"] >= CLIP_WARNING_STEPS and ("clip", name) not in self.warned:
                self.warned.add(("clip", name))
                warnings.warn(
                    f"LARS param {name!r} had its trust ratio capped by the LARC clip (trust_clip) at each of its "
                    f"last {row['clip_streak']} steps: it is stepped by plain SGD at the group's lr, the trust "
                    "ratio never applies to it.", TelemetryWarning, stacklevel=3)


def _streaked(stats: Tensor, options: LarsOptions) -> Tensor:
    """(fallback, clipped) of a group's rows, from their (|w|, |g|, lam) ``stats``, as float: by the
    rules of ``_impl/reference.ratio_valid`` and ``clip_trust_ratio``."""
    if not options.adapt:
        return stats.new_zeros(len(stats), 2)
    norms = stats[:, :2]
    taken = (torch.isfinite(norms) & (norms > 0)).all(1) if options.fallback_on == "zero_norm" else \
        torch.isfinite(norms).all(1) & (norms[:, 0] > 0) & _zero_denominator_taken(norms, options)
    clipped = taken & (stats[:, 2] == 1) if options.trust_clip else torch.zeros_like(taken)
    return torch.stack([~taken, clipped], 1).to(torch.float32)


def _zero_denominator_taken(norms: Tensor, options: LarsOptions) -> Tensor | bool:
    """Where ``fallback_on="zero_denominator"`` takes the ratio of a finite |w| > 0: where the
    denominator without epsilon is not 0."""
    weight_decay = options.weight_decay
    if options.trust_norm == "sum":
        return norms[:, 1] + weight_decay * norms[:, 0] > 0
    # "update": the denominator is |g + wd * w|, which is |g| without weight decay; with it, it is not
    # kept (see the module docstring).
    if isinstance(weight_decay, Tensor):
        return (norms[:, 1] > 0) | (weight_decay != 0)
    return norms[:, 1] > 0 if weight_decay == 0 else True


def _step_rows(part: _Part, skipped: Tensor) -> Tensor:
    """A group's rows of :data:`COLUMNS` but the streaks."""
    stats, count = part.stats, len(part.stats)
    step_size = stats[:, 2:3] * part.lr
    skipped = skipped.expand(count, 1)
    if not part.options.adapt:
        return torch.cat([stats, step_size, stats.new_zeros(count, 5), skipped], 1)
    norms = stats[:, :2]
    finite = torch.isfinite(norms).all(1)
    positive_w = norms[:, 0] > 0
    fallback = part.streaked[:, 0] > 0
    reasons = torch.stack([finite & ~positive_w, fallback & finite & positive_w, ~finite], 1)
    return torch.cat([stats, step_size, part.streaked, reasons.to(torch.float32), skipped], 1)


class Accumulator:
    """Every step of ``optimizer`` since the last :meth:`read`, folded in per param on the device: for
    logging every N steps at the cost of a few small device ops per step and one read-back per log.

    ``optimizer`` is a ``larsopt.LARS`` with telemetry on. Steps are folded in while the
    accumulator is referenced (drop it to stop); a new param group starts it over.
    """

    def __init__(self, optimizer: Any) -> None:
        if not any(group["telemetry"] for group in optimizer.param_groups):
            raise RuntimeError("Accumulator needs LARS(..., telemetry=True) (or telemetry=True in a param group)")
        self._recorder = recorder_of(optimizer)
        self._recorder.accumulators.add(self)
        self._sums: Tensor | None = None  # (slots, 9): steps, skipped, ratio, step size, fallback, clip, reasons
        self._lows: Tensor | None = None  # (slots, 2): ratio, step size
        self._highs: Tensor | None = None

    def _fold(self, table: Tensor, slots: Tensor | None, skip: Tensor | None, count: int,
              device: torch.device) -> None:
        if self._sums is None or len(self._sums) != count or self._sums.device != device:
            self._sums = torch.zeros(count, 9, device=device)
            self._lows = torch.full((count, 2), math.inf, device=device)
            self._highs = torch.full((count, 2), -math.inf, device=device)
        skipped = table[:, _SKIPPED:_SKIPPED + 1]
        summed = table[:, _SUMMED] if skip is None else torch.where(skip, 0.0, table[:, _SUMMED])  # (may be nan)
        sums = torch.cat([1 - skipped, skipped, summed], 1)
        lows = highs = table[:, _RANGED]
        if skip is not None:
            lows, highs = torch.where(skip, math.inf, lows), torch.where(skip, -math.inf, highs)
        if slots is None:
            self._sums.add_(sums)
            torch.minimum(self._lows, lows, out=self._lows)
            torch.maximum(self._highs, highs, out=self._highs)
        else:
            self._sums.index_add_(0, slots, sums)
            self._lows[slots] = torch.minimum(self._lows[slots], lows)
            self._highs[slots] = torch.maximum(self._highs[slots], highs)

    def read(self) -> Telemetry:
        """The :data:`ACCUMULATED_COLUMNS` of every telemetry param since the last read (tensors: no
        sync until :meth:`Telemetry.to_dict`), and start over."""
        recorder = self._recorder
        if self._sums is None:
            return Telemetry([], torch.zeros(0, len(ACCUMULATED_COLUMNS)), ACCUMULATED_COLUMNS, warnings_from=recorder)
        steps = self._sums[:, :1]
        counted = steps > 0
        means = torch.where(counted, self._sums[:, 2:4] / steps, math.nan)
        lows, highs = torch.where(counted, self._lows, math.nan), torch.where(counted, self._highs, math.nan)
        values = torch.cat([self._sums[:, :2], means[:, :1], lows[:, :1], highs[:, :1], means[:, 1:], lows[:, 1:],
                            highs[:, 1:], self._sums[:, 4:], recorder.streaks], 1)
        self._sums.zero_()
        self._lows.fill_(math.inf)
        self._highs.fill_(-math.inf)
        return Telemetry(list(recorder.slot_names), values, ACCUMULATED_COLUMNS, adapted=recorder.adapted_slots(),
                         warnings_from=recorder)


def _telemetry_of(source: Any) -> Telemetry:
    """``source`` as a :class:`Telemetry`: itself, an accumulator's read, or an optimizer's last step."""
    if isinstance(source, Telemetry):
        return source
    if isinstance(source, Accumulator):
        return source.read()
    return source.telemetry()


def to_tensorboard(writer: Any, source: Any, step: int) -> None:
    """Write ``source`` (a ``larsopt.LARS``: its last step; an :class:`Accumulator`: read, so reset;
    or a :class:`Telemetry`) to ``writer``, a ``torch.utils.tensorboard.SummaryWriter``: a scalar
    ``lars_<column>/<param name>`` per column and param, and the histogram ``lars_trust_ratio`` of
    the params whose group takes the trust ratio (their mean ratio for an accumulator). One read-back."""
    telemetry = _telemetry_of(source)
    values = telemetry.to_dict()
    for name, row in values.items():
        for column, value in row.items():
            writer.add_scalar(f"lars_{column}/{name}", float(value), step)
    ratio = "trust_ratio" if "trust_ratio" in telemetry.columns else "trust_ratio_mean"
    ratios = [row[ratio] for row, adapted in zip(values.values(), telemetry.adapted)
              if adapted and math.isfinite(row[ratio])]
    if ratios:
        import numpy  # (a dependency of larsopt; add_histogram takes an array)
        writer.add_histogram("lars_trust_ratio", numpy.array(ratios), step)


def to_jsonl(file: str | os.PathLike[str] | IO[str], source: Any, step: int) -> None:
    """Append one JSON line ``{"step": step, "params": {name: {column: value}}}`` for ``source`` (as
    :func:`to_tensorboard` takes it) to ``file`` (a path or a text file). Values that are not
    finite (the norms of ``lars=False`` groups, a norm that overflowed) are written as null, so
    that the line is strict JSON. One read-back."""
    values = _telemetry_of(source).to_dict()
    params = {name: {column: value if not isinstance(value, float) or math.isfinite(value) else None
                     for column, value in row.items()} for name, row in values.items()}
    line = json.dumps({"step": step, "params": params}, allow_nan=False) + "\n"
    if isinstance(file, (str, os.PathLike)):
        with open(file, "a", encoding="utf-8") as handle:
            handle.write(line)
    else:
        file.write(line)
