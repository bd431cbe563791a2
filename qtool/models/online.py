"""Online rotations: transforms a rotated model still applies at run time.

``OnlineRotation`` right-multiplies the last dimension by a fixed orthogonal matrix ``M``:

* ``kind="hadamard"``: ``M = H_n^T / sqrt(n)`` applied with the fast transform
  (O(n log n) for the power-of-two part), never as a dense matmul;
* ``kind="matrix"``: a stored dense orthogonal matrix (the fallback where no Hadamard order
  exists, e.g. 9 heads, or ``random_orthogonal`` rotations);
* ``heads=h``: the transform acts *across heads*: the last dim is viewed as ``[h, d]`` and the
  ``h x h`` rotation mixes heads for every coordinate (QuaRot's head mixing before ``o_proj``).

``dense()`` returns the matrix ``M`` itself so offline fusion and the online path share one
definition.
"""

from __future__ import annotations

import torch
from torch import nn

from qtool.algorithms.hadamard import fast_hadamard_transform, has_hadamard, random_orthogonal


class OnlineRotation(nn.Module):
    def __init__(self, n: int, kind: str = "hadamard", heads: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.n, self.heads, self.seed = n, heads, seed
        order = heads if heads is not None else n
        if kind == "hadamard" and not has_hadamard(order):
            kind = "matrix"  # no Hadamard matrix of this order: a seeded random orthogonal one
        self.kind = kind
        if kind == "matrix":
            self.register_buffer("matrix", random_orthogonal(order, seed).float().t().contiguous())
        elif kind != "hadamard":
            raise ValueError(f"unknown online rotation kind {kind!r}; use hadamard or matrix")

    @property
    def fallback(self) -> bool:
        return self.kind == "matrix"

    def _apply_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hadamard":
            return fast_hadamard_transform(x)
        m = self.matrix.double() if x.dtype == torch.float64 else self.matrix
        return (x.to(m.dtype) @ m).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads is None:
            return self._apply_last(x)
        shape = x.shape
        z = x.reshape(*shape[:-1], self.heads, shape[-1] // self.heads).transpose(-1, -2)
        return self._apply_last(z).transpose(-1, -2).reshape(shape)

    def dense(self) -> torch.Tensor:
        """The float64 ``n x n`` matrix ``M`` with ``forward(x) == x @ M``."""
        return self.forward(torch.eye(self.n, dtype=torch.float64))

    def extra_repr(self) -> str:
        across = f", across {self.heads} heads" if self.heads else ""
        return f"n={self.n}, kind={self.kind}{across}"
