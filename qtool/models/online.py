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
from qtool.models.adapters import get_adapter


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


def dims(config) -> tuple[int, int, int, int, int]:
    hq = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    return config.hidden_size, config.intermediate_size, hq, config.num_key_value_heads, d


# float64 bytes of one slice of a weight in :func:`map_rows` (the slice and ``fn``'s result)
SLICE_BYTES = 16 << 20


def map_rows(w: torch.Tensor, fn, device, rows: bool = True) -> torch.Tensor:
    """A new tensor like ``w`` holding ``fn(W)`` (``rows``: ``fn`` maps each row of ``W`` on its own,
    e.g. ``W M``) or ``fn(W^T)^T`` (``fn`` maps each column), computed in float64 on ``device``.

    It runs a slice of rows (columns) at a time: the float64 copies of a whole weight are 4x its
    float32 size (SmolLM2's 49,152 x 576 embedding: 0.45 GB of temporaries), a slice's are at most
    :data:`SLICE_BYTES`. Rows are independent, so the values are those of one call on the whole weight.
    """
    out = torch.empty_like(w)
    axis = 0 if rows else 1
    n, width = w.shape[axis], w.shape[1 - axis]
    step = max(1, SLICE_BYTES // (8 * width))
    for start in range(0, n, step):
        part = w.narrow(axis, start, min(step, n - start)).to(device, torch.float64)
        res = fn(part) if rows else fn(part.t()).t()
        out.narrow(axis, start, part.shape[axis]).copy_(res)  # the cast of ``.to(w.dtype)``
    return out


def transform_weight(lin, fn, device, rows: bool = True) -> None:
    """``W <- fn(W)`` (``rows``: ``fn`` acts on each row, i.e. ``W M``) or ``W <- fn(W^T)^T``,
    computed in float64 on ``device`` a slice at a time (:func:`map_rows`)."""
    lin.weight.data = map_rows(lin.weight.data, fn, device, rows)


def within_heads(rot: OnlineRotation, heads: int):
    """``x -> x blockdiag(M, ..., M)``: the rotation applied inside each of ``heads`` blocks."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return rot(x.reshape(*shape[:-1], heads, shape[-1] // heads)).reshape(shape)

    return fn


@torch.no_grad()
def install_online(model, entry: dict, fuse: bool, device: torch.device | str = "cpu") -> None:
    """Create the online rotations described by ``entry`` in every decoder layer (see
    :func:`install_online_layer`)."""
    for i, layer in enumerate(get_adapter(model.config).layers(model)):
        install_online_layer(model.config, i, layer, entry, fuse, device)


@torch.no_grad()
def install_online_layer(
    config, i: int, layer, entry: dict, fuse: bool, device: torch.device | str = "cpu"
) -> None:
    """Create decoder layer ``i``'s online rotations described by ``entry``; fuse their inverses
    into its weights when ``fuse``.

    Fusion right-multiplies weights by the rotation by applying the (fast) transform to their
    rows, in float64 on ``device``: no dense ``n x n`` matrix is formed for Hadamard kinds.
    """
    adapter = get_adapter(config)
    _, inter, hq, hkv, d = dims(config)
    kind, seed = entry["online_kind"], entry["seed"]
    if entry.get("down_proj"):
        down = adapter.linear(layer, "down_proj")
        rot = OnlineRotation(inter, kind, seed=seed + 1000 + i)
        down.input_transform = rot.to(down.weight.device)
        if fuse:
            transform_weight(down, rot.to(device), device)
            rot.to(down.weight.device)
    if entry.get("attention_vo"):
        o = adapter.linear(layer, "o_proj")
        # QuaRot mixes heads online before o_proj; without it o_proj reads the per-head rotated
        # values as they are (the per-head rotation of V cancels in o_proj's weight, nothing online)
        mix = (
            OnlineRotation(hq * d, kind, heads=hq, seed=seed + 3000 + i)
            if entry.get("head_mix", True)
            else None
        )
        o.input_transform = None if mix is None else mix.to(o.weight.device)
        if fuse:
            per_head = OnlineRotation(d, kind, seed=seed + 2000 + i).to(device)
            v = adapter.linear(layer, "v_proj")
            transform_weight(v, within_heads(per_head, hkv), device, rows=False)
            if v.bias is not None:
                v.bias.data = within_heads(per_head, hkv)(v.bias.data.to(device, torch.float64)).to(
                    v.bias.device, v.bias.dtype
                )
            if mix is None:
                transform_weight(o, lambda w, ph=per_head: within_heads(ph, hq)(w), device)
            else:
                mix.to(device)
                transform_weight(o, lambda w, m=mix, ph=per_head: m(within_heads(ph, hq)(w)), device)
                mix.to(o.weight.device)
    if entry.get("qk"):
        attn = adapter.attention(layer)
        attn.qtool.qk_rotate = OnlineRotation(d, kind, seed=seed + 4000 + i).to(attn.q_proj.weight.device)
