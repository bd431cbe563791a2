"""Data-parallel calibration over processes and machines, with PyTorch's own ``torch.distributed``.

A run launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process group:
``gloo`` on CPU, ``nccl`` on CUDA with each rank on ``cuda:LOCAL_RANK``. Each rank pushes its own
disjoint share of the calibration windows (window ``i`` belongs to rank ``i % world``) through the
layers; the statistics a solve needs are summed over ranks in float64 before the solve. A linear's
solve runs on an owner rank that broadcasts the result (:func:`solve_on_owner`); a solve whose
output rows are independent given the statistics (GPTQ: each row of ``W`` is quantized on its own
under the shared Hessian) can instead be split by rows over every rank (:func:`solve_rows`), which
GPTQ does for a group with fewer linears than ranks (``o_proj``, ``down_proj`` alone), so no rank
idles there. Rank 0 alone writes the checkpoint and logs. With one process everything here is a
no-op, so a single-process run computes exactly what it did before.

What can differ with the number of ranks: the order in which the float64 statistics are summed
(a few ulps of the Hessian), which can flip the rounding of a weight sitting on a grid midpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as td

from qtool.errors import QtoolError


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def world() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; returns this rank's device."""
    if env_world() <= 1 or active():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise QtoolError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices here")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        td.init_process_group("nccl", device_id=device)
    else:
        td.init_process_group("gloo")
    return device


def shard(n: int) -> list[int]:
    """This rank's calibration windows out of ``n``: ``i % world == rank`` (deterministic)."""
    return [i for i in range(n) if i % world() == rank()]


def _reduced(t: torch.Tensor, op) -> torch.Tensor:
    out = t.clone()
    td.all_reduce(out, op=op)
    return out


def sum_(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks, in float64 (``t`` itself when alone)."""
    return _reduced(t.to(torch.float64), td.ReduceOp.SUM) if active() else t


def min_(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``t`` over ranks (exact: no summation order)."""
    return _reduced(t, td.ReduceOp.MIN) if active() else t


def max_(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``t`` over ranks (exact)."""
    return _reduced(t, td.ReduceOp.MAX) if active() else t


def owner(index: int) -> int:
    """The rank that solves work item ``index`` (round robin)."""
    return index % world()


def broadcast(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Copy ``tensors`` (same shapes and dtypes on every rank) from rank ``src`` to all, in place."""
    if not active():
        return
    for t in tensors:
        td.broadcast(t, src)


def solve_on_owner(
    src: int,
    solve: Callable[[], Sequence[torch.Tensor]],
    like: Sequence[tuple[tuple[int, ...], torch.dtype]],
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Run ``solve`` on rank ``src`` only and give its tensors to every rank. ``like``: the
    ``(shape, dtype)`` of each result, known beforehand on every rank. Alone: ``solve()``."""
    if not active():
        return list(solve())
    if rank() == src:
        out = [t.to(device=device, dtype=dt).contiguous() for t, (_, dt) in zip(solve(), like, strict=True)]
    else:
        out = [torch.empty(shape, dtype=dt, device=device) for shape, dt in like]
    broadcast(out, src)
    return out


def row_bounds(m: int) -> list[int]:
    """Row boundaries of a row-split solve: rank ``r`` owns rows ``[b[r], b[r + 1])``."""
    return [m * r // world() for r in range(world() + 1)]


def solve_rows(
    m: int,
    solve: Callable[[int, int], Sequence[torch.Tensor]],
    like: Sequence[tuple[tuple[int, ...], torch.dtype]],
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Split a solve with ``m`` independent output rows over ranks and give every rank all rows.

    ``solve(r0, r1)`` returns tensors whose first dimension is ``r1 - r0`` (rows ``r0:r1``);
    ``like`` gives each result's ``(trailing shape, dtype)``. Alone: ``solve(0, m)``. A solve that
    is row-independent computes the same rows whichever rank computes them (GPTQ's are bit-identical:
    ``tests/unit/test_gptq.py::test_rows_solve_independently``)."""
    if not active():
        return list(solve(0, m))
    b = row_bounds(m)
    out = [torch.empty((m, *tail), dtype=dt, device=device) for tail, dt in like]
    r0, r1 = b[rank()], b[rank() + 1]
    if r1 > r0:
        for o, t in zip(out, solve(r0, r1), strict=True):
            o[r0:r1].copy_(t)
    for src in range(world()):
        if b[src + 1] > b[src]:
            broadcast([o[b[src] : b[src + 1]] for o in out], src)  # row slices: contiguous views
    return out


def barrier() -> None:
    if active():
        td.barrier()


def shutdown() -> None:
    if active():
        td.destroy_process_group()
