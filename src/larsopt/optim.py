"""``larsopt.LARS``: a ``torch.optim.Optimizer`` over the functional core."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from larsopt import functional as F
from larsopt._impl import sharded
from larsopt.telemetry import Telemetry, recorder_of
from larsopt.options import OPTIMIZER_SETTINGS, LarsOptions, check_group, group_defaults, plain_numbers, \
    group_keys_saved_since_first_release

_STATE_KEYS = ("momentum_buffer", "master_param")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OWN_SETTINGS = tuple(OPTIMIZER_SETTINGS)


def _one_edit_apart(key: str, name: str) -> bool:
    """Whether ``key`` is ``name`` or becomes it by one insertion, deletion, substitution or swap of
    neighbours."""
    if key == name:
        return True
    if len(key) == len(name):
        differ = [i for i, (a, b) in enumerate(zip(key, name)) if a != b]
        return len(differ) == 1 or (len(differ) == 2 and differ[1] == differ[0] + 1
                                    and key[differ[0]] == name[differ[1]] and key[differ[1]] == name[differ[0]])
    shorter, longer = sorted((key, name), key=len)
    return len(longer) - len(shorter) == 1 and any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer)))


def _capturing() -> bool:
    """Whether a CUDA graph capture is underway on the current stream (never while compiling:
    inductor makes its own graphs)."""
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


class LARS(Optimizer):
    r"""Layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017) as a ``torch.optim.Optimizer``.

    For every parameter tensor ``w`` with gradient ``g`` (see :mod:`larsopt.functional`):

    .. code-block:: text

        gr  = rescale_grad * g                         (-g first if maximize)
        lam = eta * |w| / (|gr| + wd * |w| + epsilon)  trust_norm="sum"
            = eta * |w| / (|gr + wd * w| + epsilon)    trust_norm="update"
            = 1 if |w| == 0, |gr| == 0, a norm is not finite, or lars=False
        lam = min(lam / lr, 1)                         if trust_clip (LARC)
        g'  = clip(gr, -clip_gradient, clip_gradient) + wd * w
        paper:  v = mu * v - lr * lam * g';  w += v    (nesterov: w += mu * v - lr * lam * g')
        torch:  b = mu * b + lam * g';       w -= lr * b   (nesterov: w -= lr * (lam * g' + mu * b))

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or dicts (param
            groups; see :func:`larsopt.param_groups`). Every argument below can be set per group;
            groups also take the key ``lars`` (default True): False turns the trust ratio off for
            that group (lam = 1) while its weight decay still applies.
        lr: learning rate (float or 0-d tensor; a tensor avoids recompiles under torch.compile).
        momentum: mu in [0, 1). The state ``momentum_buffer`` exists only when momentum != 0.
        eta: trust coefficient. epsilon: added to the trust-ratio denominator.
        weight_decay: L2 coefficient wd, added to the gradient (coupled, as in the paper).
        nesterov: Nesterov momentum (needs momentum > 0).
        momentum_form: ``"paper"`` (lr inside the buffer) or ``"torch"`` (lr outside).
        trust_norm: ``"sum"`` or ``"update"``, the trust-ratio denominator.
        trust_clip: LARC clip mode: the step size is min(lr * lam, lr).
        rescale_grad: gradient multiplier, inside the trust-ratio norm (MXNet).
        clip_gradient: element-wise clip of the rescaled gradient after the norm, before weight
            decay (``None``: off).
        maximize: maximise the objective instead of minimising it.
        impl: implementation, one of :data:`larsopt.functional.IMPLS`.
        multi_precision: keep a float32 master copy (state ``master_param``) and a float32
            ``momentum_buffer`` for float16/bfloat16 params; the update is done on the master and
            the param is written back rounded. float32/float64 params are not affected. Loading a
            state without masters rebuilds them from the params at the next step.
        norm_source: ``"master"`` (default) takes |w| from the master copy, ``"param"`` from the
            low-precision param as stored (MXNet's fused path).
        lazy_update: for sparse gradients (``nn.Embedding(sparse=True)``): True changes only the
            rows present (weight, momentum, weight decay), False gives exactly the dense result.
            The trust ratio uses |w| over all rows and |g| over the present rows either way.
        stochastic_rounding: bfloat16 params without a master copy are written back with
            unbiased stochastic rounding (drawn from ``generator`` when given).
        generator: ``torch.Generator`` for stochastic rounding (not saved in ``state_dict``; a copy,
            pickle or ``torch.save`` of the whole optimizer takes it along in its current state).
        telemetry: keep each param's |w|, |g|, trust ratio, step size and fallback and clip flags of
            the last step (:meth:`telemetry`, :mod:`larsopt.telemetry`).
        carry_weight_norms: the fused CPU kernel keeps each large param's |w|^2 from its update
            for the next step's norms, which then read only the gradient: the same numbers with
            a fifth less memory read (ResNet-50 and BERT-base steps 0-25% faster in the measured
            runs: docs/performance.md). Opt-in, because writes to a param through another tensor
            with a version counter of its own are not seen, and the next step would use the old
            |w|: in-place ops on ``p.data``, ``torch.distributed`` collectives into the param,
            writes through ``p.numpy()``/DLPack. In-place ops on the param or its views, model
            ``load_state_dict``, ``nn.init`` and ``p.data = other`` are detected
            (:class:`larsopt.functional.CarriedWeightNorms` lists both).
            Not used for DTensor params, under torch.compile or on other paths.
        dampening: torch SGD's momentum dampening d: the buffer takes (1 - d) of each update.
        buffer_start: a first step's buffer: ``"update"`` (the update itself, undampened: torch SGD)
            or ``"zeros"`` (dampened from the first step).
        adapt_when: ``"always"``, or ``"weight_decay"``: the trust ratio applies only while the group's
            weight_decay is not 0 (timm, Lightning Bolts).
        fallback: what a tensor whose ratio cannot be taken (a zero norm) gets: ``"ratio_one"``
            (lam = 1, clipped under trust_clip, weight decay kept) or ``"plain_step"`` (its raw
            gradient step: no weight decay, no clip; Bolts, apex LARC).
        fallback_on: ``"zero_norm"`` (|w| or |g| is 0; MXNet) or ``"zero_denominator"`` (|w| or the
            denominator without epsilon is 0; pytorch-optimizer, optax, FAIR SSL).
        momentum_correction: scale the momentum by lr / the previous step's lr (MXNet 1.x, the MLPerf
            MXNet reference); the previous lr is kept in the group as ``previous_lr``.
        The peers' own signatures over these options are in :mod:`larsopt.presets`.
        capturable: the step will be captured in a CUDA graph (``torch.cuda.graph``). Needs ``lr``
            as a 0-d tensor, on the params' device when the graph is captured (change it in place
            between replays; LR schedulers do), and CUDA params. State is created by eager
            warm-up steps before the capture (a capture that would create it raises). After a
            capture, ``load_state_dict`` copies into the existing lr and state tensors, so the
            graph keeps working, and refuses a state with other hyper-parameters. Without it,
            capturing the step raises.

    Without ``multi_precision``, float16/bfloat16 params are updated in float32 and rounded
    once; an update below half an ulp of the weight is lost (as in MXNet without
    ``multi_precision``). ``multi_precision`` or ``stochastic_rounding`` avoid that.

    ``p.grad`` is never modified. ``torch.amp.GradScaler`` is supported: ``scaler.step(opt)``
    passes the scale and the inf flag to the step, which unscales before the norms and skips the
    step on inf without a host synchronisation.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.1,
        momentum: float = 0.0,
        eta: float = 0.001,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        momentum_form: str = "paper",
        trust_norm: str = "sum",
        trust_clip: bool = False,
        rescale_grad: float = 1.0,
        clip_gradient: float | None = None,
        maximize: bool = False,
        impl: str = "auto",
        multi_precision: bool = False,
        norm_source: str = "master",
        lazy_update: bool = True,
        stochastic_rounding: bool = False,
        generator: torch.Generator | None = None,
        capturable: bool = False,
        telemetry: bool = False,
        carry_weight_norms: bool = False,
        dampening: float = 0.0,
        buffer_start: str = "update",
        adapt_when: str = "always",
        fallback: str = "ratio_one",
        fallback_on: str = "zero_norm",
        momentum_correction: bool = False,
    ) -> None:
        defaults = plain_numbers(group_defaults(
            lr=lr, momentum=momentum, eta=eta, epsilon=epsilon, weight_decay=weight_decay, nesterov=nesterov,
            momentum_form=momentum_form, trust_norm=trust_norm, trust_clip=trust_clip, rescale_grad=rescale_grad,
            clip_gradient=clip_gradient, maximize=maximize, impl=impl, multi_precision=multi_precision,
            norm_source=norm_source, lazy_update=lazy_update, stochastic_rounding=stochastic_rounding,
            capturable=capturable, telemetry=telemetry, carry_weight_norms=carry_weight_norms, dampening=dampening, buffer_start=buffer_start,
            adapt_when=adapt_when, fallback=fallback, fallback_on=fallback_on, momentum_correction=momentum_correction,
        ))
        check_group(defaults)
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, "
                            f"got a single tensor of shape {tuple(params.shape)}; wrap it in a list")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Invalid generator: {generator!r}; expected a torch.Generator or None")
        self.generator = generator
        self._carried_weight_norms = F.CarriedWeightNorms()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles defaults, state and param_groups only: a copy (deepcopy, pickle,
        # torch.save of the whole optimizer) also takes the generator, in its current state, so
        # that it draws the same stochastic rounding as the original.
        return {**super().__getstate__(), "generator": self.generator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("generator", None)  # pickled before the generator was kept
        self._carried_weight_norms = F.CarriedWeightNorms()  # (of the original's params: a copy starts without)
        for key, default in group_defaults().items():  # pickled before the option or setting existed
            self.defaults.setdefault(key, default)
            for group in self.param_groups:
                group.setdefault(key, default)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer.add_param_group``). Keys other than the LARS
        settings are kept as they are, as torch keeps them (the layer id or lr scale of layer-wise lr
        decay, ``initial_lr`` of a resumed scheduler); one a single edit away from a setting warns,
        as it is probably a typo."""
        param_group.update(plain_numbers({key: value for key, value in param_group.items() if key in self.defaults}))
        check_group({**self.defaults, **param_group})
        known = {*self.defaults, "params", "param_names", "previous_lr"}
        for key in param_group:
            if isinstance(key, str) and key not in known:
                close = next((name for name in sorted(known) if _one_edit_apart(key.lower(), name)), None)
                if close is not None:
                    warnings.warn(f"param group key {key!r} is not a LARS setting (kept as user metadata); did you "
                                  f"mean {close!r}?", UserWarning, stacklevel=2)
        try:
            super().add_param_group(param_group)
        except ValueError as error:
            if "more than one parameter group" not in str(error):
                raise
            raise ValueError(f"Invalid params: {self._shared_params_label(param_group)} appear(s) in more than one "
                             "param group; give each tensor to exactly one group") from None
        group = self.param_groups[-1]
        names = group.get("param_names")
        seen: set[Tensor] = set()
        for i, param in enumerate(group["params"]):
            label = f"param {names[i]!r}" if names else f"param #{i} of group {len(self.param_groups) - 1}"
            if param in seen:
                self.param_groups.pop()
                raise ValueError(f"{label} appears twice in the same param group; give each tensor once")
            seen.add(param)
            if not param.is_floating_point():
                self.param_groups.pop()
                raise ValueError(f"{label} has dtype {param.dtype}; LARS can only optimise floating-point "
                                 "tensors")

    def _shared_params_label(self, new_group: dict[str, Any]) -> str:
        """Names (or positions and shapes) of the params of ``new_group`` that a group already has."""
        taken = {p for group in self.param_groups for p in group["params"]}
        # torch has split (name, tensor) pairs into params and param_names by now
        return ", ".join(
            f"param {self._param_label(new_group, index)}"
            for index, param in enumerate(new_group["params"])
            if param in taken
        )

    def _param_label(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        return repr(names[index]) if names else f"#{index} (shape {tuple(group['params'][index].shape)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one LARS step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if _capturing():
            self._check_capture()
        telemetry: list[tuple[int, list[int] | None, Tensor]] = []  # (group number, params stepped (None: all), stats)
        # Every group is gathered, and checked, before any is stepped: a bad gradient in one group
        # raises with no tensor changed. (Masters are created, and stale ones dropped, only then.)
        gathered = []
        for number, group in enumerate(self.param_groups):
            params, grads, buffers, masters = [], [], [], []
            new_buffers: list[tuple[int, dict[str, Any]]] = []  # (position in buffers, state to keep it in)
            new_masters: list[tuple[int, Tensor, dict[str, Any]]] = []  # (position in masters, param, its state)
            stale_masters: list[dict[str, Any]] = []
            use_momentum = group["momentum"] != 0
            multi_precision, lazy_update = group["multi_precision"], group["lazy_update"]
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if lazy_update and grad.is_sparse and grad.sparse_dim() != 1:
                    raise RuntimeError(f"LARS got a sparse gradient with sparse_dim={grad.sparse_dim()} for param "
                                       f"{self._param_label(group, index)} of group {number}; lazy_update needs "
                                       "row-sparse gradients (sparse_dim == 1, as nn.Embedding(sparse=True) makes); "
                                       "set lazy_update=False for a dense update (no param was changed)")
                wants_master = multi_precision and param.dtype in _LOW_PRECISION
                state = self.state[param] if use_momentum or wants_master or param in self.state else {}
                master = None
                if wants_master:
                    master = state.get("master_param")
                    if master is None:
                        new_masters.append((len(masters), param, state))
                elif "master_param" in state:
                    stale_masters.append(state)  # the param itself is current when masters are off
                params.append(param)
                grads.append(grad)
                masters.append(master)
                buf = None
                if use_momentum:
                    buf = state.get("momentum_buffer")
                    buffer_dtype = torch.float32 if wants_master else param.dtype
                    if buf is None or buf.dtype != buffer_dtype:
                        new_buffers.append((len(buffers), state))
                        buf = None if buf is None else buf.to(buffer_dtype)
                buffers.append(buf)
            stats = None
            if group["telemetry"] and params:
                stats = torch.empty(len(params), 3, dtype=torch.float32, device=params[0].device)
                stepped = None if len(params) == len(group["params"]) else [
                    index for index, param in enumerate(group["params"]) if param.grad is not None]  # (as chosen above)
                telemetry.append((number, stepped, stats))
            names = None
            if group.get("param_names") and sharded.possible():  # (only for the errors of sharded params)
                names = [name for name, param in zip(group["param_names"], group["params"]) if param.grad is not None]
            gathered.append((group, params, grads, buffers, masters, new_buffers, new_masters, stale_masters, stats,
                             names))
        for group, params, grads, buffers, masters, new_buffers, new_masters, stale_masters, stats, names in gathered:
            for position, param, state in new_masters:
                masters[position] = state["master_param"] = param.detach().to(torch.float32, copy=True)
            for state in stale_masters:
                del state["master_param"]
            previous_lr = group.get("previous_lr") if group["momentum_correction"] else None
            F.lars(params, grads, buffers, LarsOptions.from_group(group), master_params=masters, grad_scale=grad_scale,
                   found_inf=found_inf, generator=self.generator, stats=stats, param_names=names,
                   previous_lr=previous_lr, impl=group["impl"],
                   carry=self._carried_weight_norms if group["carry_weight_norms"] else None)
            for index, state in new_buffers:  # (the core made first steps' buffers in the list)
                state["momentum_buffer"] = buffers[index]
            if group["momentum_correction"] and params:
                self._keep_previous_lr(group)
        if telemetry:
            recorder_of(self).record(telemetry, found_inf)
        return loss

    @staticmethod
    def _keep_previous_lr(group: dict[str, Any]) -> None:
        """Per-group state of momentum_correction: this step's lr, saved with the group by state_dict. A
        tensor lr is copied into a tensor of the group's own, in place after the first step (so a
        captured graph keeps reading the same tensor)."""
        lr = group["lr"]
        previous = group.get("previous_lr")
        if not isinstance(lr, Tensor):
            group["previous_lr"] = float(lr)
        elif isinstance(previous, Tensor) and previous.device == lr.device and previous.dtype == lr.dtype:
            previous.copy_(lr)
        else:
            group["previous_lr"] = lr.detach().clone()

    def telemetry(self) -> Telemetry:
        """What the last step did to each param (of the groups built with ``telemetry=True``): |w|,
        |g|, the trust ratio, the step size ``lr * lam`` and whether, and why, the ratio fell back,
        was clipped or the step skipped (:data:`larsopt.telemetry.COLUMNS`), keyed by param name:
        names from ``(name, tensor)`` pairs or :func:`larsopt.param_groups`, else
        ``"group<g>.<index>"``. Params without a gradient at that step are absent. The values are
        tensors on the params' device (no host sync until :meth:`Telemetry.to_dict`, which also
        gives the warnings of :mod:`larsopt.telemetry`); :class:`larsopt.telemetry.Accumulator`
        folds in every step."""
        if not any(group["telemetry"] for group in self.param_groups):
            raise RuntimeError("LARS.telemetry() needs LARS(..., telemetry=True) (or telemetry=True in a param group)")
        return recorder_of(self).last_step()

    def _param_name(self, group: dict[str, Any], number: int, index: int) -> str:
        names = group.get("param_names")
        return names[index] if names else f"group{number}.{index}"

    def _check_capture(self) -> None:
        """A CUDA graph is being captured: refuse, before any group steps, what a replay would get
        wrong. (Only then: eager steps of a capturable optimizer need nothing, and dynamo marks the
        groups it traces as capturable by itself.)"""
        for number, group in enumerate(self.param_groups):
            if not group["capturable"]:
                raise RuntimeError(f"LARS.step is being captured in a CUDA graph, but param group {number} has "
                                   "capturable=False; build LARS(..., capturable=True) with lr as a 0-d tensor on "
                                   "the params' device")
            lr = group["lr"]
            if not isinstance(lr, Tensor):
                raise ValueError(f"Invalid lr: {lr!r} in param group {number} while a CUDA graph is captured; the "
                                 "graph would keep it at its captured value: pass lr as a 0-d tensor on the params' "
                                 "device")
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                label = f"param {self._param_label(group, index)} of group {number}"
                state = self.state.get(param, {})
                master = group["multi_precision"] and param.dtype in _LOW_PRECISION
                needed = {"master_param": torch.float32} if master else {}
                if group["momentum"] != 0:
                    needed["momentum_buffer"] = torch.float32 if master else param.dtype
                for name, dtype in needed.items():
                    if name not in state:
                        raise RuntimeError(f"LARS: {name} of {label} would be created inside the CUDA graph "
                                           "being captured, and so reset at every replay; run eager warm-up "
                                           "steps before the capture (see torch.cuda.graphs)")
                    if state[name].dtype != dtype:
                        raise RuntimeError(f"LARS: {name} of {label} is {state[name].dtype} and the step needs "
                                           f"{dtype}; converting it inside the CUDA graph being captured would redo "
                                           "it from the old tensor at every replay; run an eager step before the "
                                           "capture")
                if param.device.type != "cuda":
                    raise ValueError(f"Invalid capturable: True for {label} on {param.device}; CUDA graphs need "
                                     "CUDA params")
                if lr.device != param.device:
                    raise ValueError(f"Invalid lr: a tensor on {lr.device} for {label} on {param.device}; a CUDA "
                                     f"graph cannot read a tensor on another device: put lr on {param.device}")
        self._graph_captured = True  # load_state_dict now keeps what the graph reads and writes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`. The load pre-hooks
        (``register_load_state_dict_pre_hook``) run first, on a shallow copy, and what they return
        is checked and loaded; the post-hooks run after the load. A state that does not fit this
        optimizer, or is not a state dict at all (a malformed one included), raises ``ValueError``
        and leaves the optimizer unchanged.

        Hyper-parameters come from the saved state, except ``multi_precision``, ``impl`` and
        ``capturable``, which stay as this optimizer was built. A tensor ``lr`` stays this
        optimizer's tensor (same object and device) and takes the saved value, so a compiled or
        captured step keeps reading it (groups sharing one lr tensor with different saved values
        get a tensor each). Masters missing from the state (e.g. saved without
        ``multi_precision``) are rebuilt from the params at the next step.

        Once a step of this optimizer has been captured in a CUDA graph (``capturable``), the
        graph holds the lr and state tensors and the other hyper-parameters as numbers: the
        state is copied into the existing tensors, and a saved state that lacks one of them,
        holds other hyper-parameters or per-group lrs for one shared lr tensor raises, leaving
        the optimizer unchanged (build a new optimizer and capture again)."""
        # torch runs the load pre-hooks on a shallow copy first, so that a hook can migrate an old
        # or foreign checkpoint: run them before checking, then load what they return.
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        params_by_id = self._checked_state_dict(state_dict)
        self._carried_weight_norms.clear()  # (cheap insurance: a resumed run may have loaded its weights too)
        saved_groups = state_dict["param_groups"]
        captured = getattr(self, "_graph_captured", False)
        if captured:
            self._check_captured_hyperparameters(saved_groups)
        own_lrs = self._own_lr_tensors(saved_groups, captured)
        captured_state = self._captured_state(state_dict["state"], params_by_id) if captured else {}
        # How this optimizer stores and computes (masters, implementation) is its own choice, not
        # a training hyper-parameter: keep it rather than taking the saved one.
        own = [{key: group[key] for key in _OWN_SETTINGS} for group in self.param_groups]
        before = self.state, self.param_groups
        try:
            self._load_checked(state_dict, params_by_id, own, own_lrs, captured_state)
        except Exception as error:  # anything the checks above did not foresee: nothing changes
            self.state, self.param_groups = before
            raise ValueError(f"Invalid state_dict: {type(error).__name__}: {error}") from error
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_checked(self, state_dict: dict[str, Any], params_by_id: dict[Any, Tensor], own: list[dict[str, Any]],
                      own_lrs: list[Tensor | None], captured_state: dict[Tensor, dict[str, Tensor]]) -> None:
        """The load of a checked state (the pre-hooks have run; the post-hooks run after it)."""
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        declared = group_defaults()
        for group, settings, lr in zip(self.param_groups, own, own_lrs):
            group.update(settings)
            for key, value in declared.items():  # saved before the option existed: what it did then
                group.setdefault(key, value)
            if lr is not None:
                group["lr"] = lr.fill_(float(group["lr"]))
        # torch casts every floating state tensor to the param's dtype; masters and their
        # momentum stay float32.
        for key, param_state in state_dict["state"].items():
            param = params_by_id[key]
            for name, value in param_state.items():
                if isinstance(value, Tensor) and value.dtype == torch.float32 and param.dtype in _LOW_PRECISION:
                    self.state[param][name] = value.to(device=param.device, copy=True)
        for param, previous in captured_state.items():
            for name, old in previous.items():
                self.state[param][name] = old.copy_(self.state[param][name])

    def _checked_state_dict(self, state_dict: Any) -> dict[Any, Tensor]:
        """Raise ``ValueError`` for a state that does not fit this optimizer; return its param ids'
        params."""
        def invalid(reason: str) -> ValueError:
            return ValueError(f"Invalid state_dict: {reason}")

        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise invalid("expected a dict with 'state' and 'param_groups' (as returned by LARS.state_dict()), got "
                          f"{type(state_dict).__name__}" + (f" with keys {sorted(map(str, state_dict))}"
                                                             if isinstance(state_dict, Mapping) else ""))
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        if not isinstance(saved_state, Mapping):
            raise invalid(f"'state' is a {type(saved_state).__name__}, expected a dict from param ids to their state")
        if not isinstance(saved_groups, (list, tuple)):
            raise invalid(f"'param_groups' is a {type(saved_groups).__name__}, expected a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise invalid(f"it has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        params_by_id: dict[Any, Tensor] = {}
        for number, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise invalid(f"param group {number} is not a dict with a list 'params' (got "
                              f"{type(saved).__name__}{' without params' if isinstance(saved, Mapping) else ''})")
            if len(saved["params"]) != len(group["params"]):
                raise invalid(f"param group {number} has {len(saved['params'])} params there and "
                              f"{len(group['params'])} here")
            # (torch's __setstate__, run by every load, adds "differentiable" to the defaults)
            # (options added after the first release take their default when a saved group lacks them)
            missing = sorted(group_keys_saved_since_first_release() - set(saved))
            if missing:
                raise invalid(f"param group {number} lacks the LARS settings {missing}; is it from a different "
                              "optimizer?")
            # (the saved values alone: this optimizer's own settings replace the saved ones below)
            try:
                check_group({**self.defaults, **{k: v for k, v in saved.items() if k in self.defaults},
                             "capturable": False})
            except (TypeError, ValueError) as error:
                raise invalid(f"param group {number}: {error}") from None
            for key, param in zip(saved["params"], group["params"]):
                try:
                    taken = key in params_by_id
                except TypeError:
                    raise invalid(f"param group {number} lists the param id {key!r}, which is not hashable") from None
                if taken:
                    raise invalid(f"param id {key!r} is listed twice")
                params_by_id[key] = param
        for key, param_state in saved_state.items():
            param = params_by_id.get(key)
            if param is None:
                raise invalid(f"state for param id {key!r}, which no param group lists")
            if not isinstance(param_state, Mapping):
                raise invalid(f"the state of param id {key!r} is a {type(param_state).__name__}, expected a dict")
            unknown = set(param_state) - set(_STATE_KEYS)
            if unknown:
                raise invalid(f"state keys {sorted(map(str, unknown))} are not LARS state (expected "
                              f"{list(_STATE_KEYS)}); is it from a different optimizer?")
            for name, value in param_state.items():
                if not isinstance(value, Tensor):
                    raise invalid(f"{name} of param id {key!r} is a {type(value).__name__}, expected a tensor")
                if value.is_meta:
                    raise invalid(f"{name} of param id {key!r} is on the meta device and holds no values")
                if value.layout != torch.strided or not value.is_floating_point():
                    raise invalid(f"{name} of param id {key!r} is a {value.layout} {value.dtype} tensor, expected a "
                                  "dense floating-point one")
                if value.shape != param.shape:
                    raise invalid(f"{name} of param id {key!r} has shape {tuple(value.shape)}, the param has shape "
                                  f"{tuple(param.shape)}")
        return params_by_id

    def _check_captured_hyperparameters(self, saved_groups: list[dict[str, Any]]) -> None:
        """A captured graph keeps the hyper-parameters (but lr) it was captured with."""
        fixed = set(self.defaults) - {"lr", "differentiable", *_OWN_SETTINGS}
        for number, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not group["capturable"]:
                continue
            for name in sorted(fixed):
                if saved.get(name, group[name]) != group[name]:
                    raise ValueError(f"Invalid state_dict: param group {number} was saved with {name}="
                                     f"{saved[name]!r}, and this optimizer's captured CUDA graph uses {name}="
                                     f"{group[name]!r}; build a new optimizer to load it, and capture again")

    def _own_lr_tensors(self, saved_groups: list[dict[str, Any]], captured: bool) -> list[Tensor | None]:
        """Per group, the lr tensor that takes the saved value (``None`` for a Python lr): this
        optimizer's own, or a new one on its device where groups sharing it were saved with
        different values (what a captured graph could not follow: raises then)."""
        values: dict[int, set[float]] = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if isinstance(group["lr"], Tensor):
                values.setdefault(id(group["lr"]), set()).add(float(saved["lr"]))
        tensors: list[Tensor | None] = []
        for number, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, Tensor) and len(values[id(lr)]) > 1:
                if captured and group["capturable"]:
                    raise ValueError(f"Invalid state_dict: param group {number} shares its lr tensor with other "
                                     f"groups, saved with different lrs {sorted(values[id(lr)])}; a captured graph "
                                     "reads one tensor for them: give each group its own lr tensor")
                lr = lr.clone()
            tensors.append(lr if isinstance(lr, Tensor) else None)
        return tensors

    def _captured_state(self, saved_state: dict[Any, dict[str, Any]],
                        params_by_id: dict[Any, Tensor]) -> dict[Tensor, dict[str, Tensor]]:
        """The state tensors of capturable groups, which the load overwrites in place after a
        capture; raises if the saved state lacks one (the graph would go on using the old tensor)."""
        saved_by_param = {params_by_id[key]: param_state for key, param_state in saved_state.items()}
        captured: dict[Tensor, dict[str, Tensor]] = {}
        for number, group in enumerate(self.param_groups):
            if not group["capturable"]:
                continue
            for index, param in enumerate(group["params"]):
                if param not in self.state:
                    continue
                missing = sorted(set(self.state[param]) - set(saved_by_param.get(param, {})))
                if missing:
                    raise ValueError(f"Invalid state_dict: param {self._param_label(group, index)} of group {number} "
                                     f"has {missing} here and not in the saved state; with capturable=True a "
                                     "captured graph would keep using the old tensors: build a new optimizer to "
                                     "load it, and capture again")
                captured[param] = dict(self.state[param])
        return captured
