"""Which route (compiled kernel or eager closed form) served each activation call: `record_routes`
collects a `Route` per forward and backward call while it is open; `fused.py` notes them."""

from __future__ import annotations

import contextlib
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Route:
    """Which route served one activation call: `record_routes` lists these."""

    activation: str  # "gem" or "velu"
    pass_: str  # "forward" or "backward"
    dtype: torch.dtype  # the input's
    numel: int  # the input's number of elements
    route: str  # "compiled" or "eager"
    reason: str  # compiled: the kernel that ran; eager: why the fast path stepped aside


_recorders: list = []  # the lists of the record_routes blocks now open (any thread)


@contextlib.contextmanager
def record_routes():
    """Record, per activation call inside the block, the route that served it (a list of Route).

    Forward and backward are separate entries, in the order they ran, from every thread (autograd
    may run backward on its own thread). Calls traced into a torch.compile'd model run in that
    graph and are not seen here.
    """
    calls: list = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _note(activation: str, pass_: str, x: torch.Tensor, route: str, reason: str) -> None:
    for calls in list(_recorders):
        calls.append(Route(activation, pass_, x.dtype, x.numel(), route, reason))
