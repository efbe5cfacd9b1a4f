"""What LARS did to each layer at the last step: |w|, |g| and the trust ratio, as data.

``LARS(..., telemetry=True)`` keeps, per param, the norms and ratio its step computed anyway (no
extra pass over weights or gradients, no host synchronisation); :meth:`larsopt.LARS.telemetry`
returns them as a :class:`Telemetry`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: The columns of :attr:`Telemetry.values`.
COLUMNS = ("w_norm", "g_norm", "trust_ratio")


class Telemetry:
    """Per-param values of one step: ``values[i]`` is (|w|, |g|, lam) of ``names[i]``.

    |g| is the norm of the gradient the step used (after AMP unscaling, ``maximize`` and
    ``rescale_grad``). Params of a group with ``lars=False`` have no norms (nan) and lam = 1.
    The values stay tensors on the params' device; :meth:`to_dict` reads them back (one sync).
    """

    def __init__(self, names: list[str], values: Tensor) -> None:
        self.names = names
        self.values = values

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> Tensor:
        """The (|w|, |g|, lam) row of param ``name``."""
        try:
            return self.values[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no telemetry for param {name!r}; the last step had {self.names}") from None

    def column(self, name: str) -> Tensor:
        """One column of :data:`COLUMNS` for every param, as a vector."""
        return self.values[:, COLUMNS.index(name)]

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{param name: {"w_norm": ..., "g_norm": ..., "trust_ratio": ...}}`` as Python floats."""
        rows = self.values.tolist()
        return {name: dict(zip(COLUMNS, row)) for name, row in zip(self.names, rows)}


def combined(parts: list[tuple[list[str], Tensor]]) -> Telemetry:
    """One :class:`Telemetry` from per-group (names, values) parts (values moved to the first's device)."""
    if not parts:
        return Telemetry([], torch.zeros(0, len(COLUMNS)))
    device = parts[0][1].device
    return Telemetry([name for names, _ in parts for name in names],
                     torch.cat([values.to(device) for _, values in parts]))
