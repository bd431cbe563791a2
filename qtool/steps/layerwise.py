"""Sequential layer-by-layer calibration (the GPTQ driver every later step reuses).

The calibration windows are embedded once; then, decoder layer by decoder layer, a step sees
the layer's inputs *as produced by the already quantized layers before it*, does its work on
that one layer (on the compute device), and the runner pushes the inputs through the finished
layer to get the next layer's inputs. Optionally a second, full-precision stream runs beside
it (for methods that match full-precision outputs: BiSup, IntactKV, WKVQuant).

Memory: one decoder layer on the compute device at a time; the activations of all windows are
kept on the CPU when ``offload`` is set, else on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qtool import dist
from qtool.log import track
from qtool.models.adapters import get_adapter

logger = logging.getLogger("qtool")


class LayerwiseRunner:
    def __init__(
        self, ctx, batch_size: int = 8, offload: bool = True, fp_stream: bool = False, shard: bool = False
    ) -> None:
        """``shard``: this process takes only its share of the calibration windows (data-parallel
        calibration over torchrun ranks, :mod:`qtool.dist`); the step then sums its statistics."""
        self.ctx = ctx
        self.model = ctx.model
        self.adapter = get_adapter(self.model.config)
        self.device = ctx.device
        self.batch_size = batch_size
        self.offload = offload
        ids = ctx.calibration()
        if shard and dist.world() > 1:
            ids = ids[dist.shard(ids.shape[0])]
        self.store = torch.device("cpu") if offload else self.device
        emb = self.adapter.embed(self.model)
        # the decoder layers' dtype (a streamed model may keep its embeddings in the checkpoint's)
        dtype = next(self.adapter.layers(self.model)[0].parameters()).dtype
        with torch.no_grad():
            self.inputs = [
                emb(ids[i : i + batch_size].to(self.device)).to(dtype).to(self.store)
                for i in range(0, ids.shape[0], batch_size)
            ]
        self.fp_inputs = [x.clone() for x in self.inputs] if fp_stream else None
        seq = ids.shape[1]
        pos = torch.arange(seq, device=self.device)[None]
        rotary = self.adapter.rotary(self.model).to(self.device)
        with torch.no_grad():
            self.position_embeddings = rotary(torch.zeros(1, seq, 1, device=self.device, dtype=dtype), pos)

    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x.to(self.device), position_embeddings=self.position_embeddings)

    def batches(self, fp: bool = False) -> Iterator[torch.Tensor]:
        for x in self.fp_inputs if fp else self.inputs:
            yield x.to(self.device)

    @torch.no_grad()
    def forward_all(self, layer: nn.Module, fp: bool = False) -> None:
        """Run every batch through ``layer`` (quantized stream, or the fp stream).

        A :func:`capture_inputs` hook with ``stop=True`` ends each forward early, once every
        module it watches has seen its input (the rest of the layer is not needed).
        """
        for x in self.batches(fp):
            try:
                self.run_layer(layer, x)
            except StopForward:
                pass

    @torch.no_grad()
    def advance(self, layer: nn.Module, fp_layer: nn.Module | None = None) -> None:
        """Replace the stored inputs by ``layer``'s outputs (and the fp stream's by ``fp_layer``'s)."""
        self.inputs = [self.run_layer(layer, x).to(self.store) for x in self.inputs]
        if self.fp_inputs is not None and fp_layer is not None:
            self.fp_inputs = [self.run_layer(fp_layer, x).to(self.store) for x in self.fp_inputs]

    def run(
        self,
        fn: Callable[[int, nn.Module], None],
        description: str,
        fp_layers: nn.ModuleList | None = None,
        detail: Callable[[], str] | None = None,
    ) -> None:
        """For each layer: move it to the device, ``fn(index, layer)``, advance the streams.
        ``detail()`` adds to each layer's progress line in logs (e.g. its quantization error)."""
        layers = self.layers()
        for i in track(range(len(layers)), description, detail=detail):
            layer = layers[i].to(self.device)
            fn(i, layer)
            fp_layer = None if fp_layers is None else fp_layers[i].to(self.device)
            self.advance(layer, fp_layer)
            if self.offload and self.device.type != "cpu":  # one decoder layer on the device at a time
                layers[i].to("cpu")
                if fp_layer is not None:
                    fp_layer.to("cpu")


class StopForward(Exception):
    """Raised by a capture hook to end a calibration forward once its inputs are captured."""


@contextmanager
def capture_inputs(
    modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None], stop: bool = False
):
    """Call ``fn(name, input)`` with the input of each module on every forward.

    ``stop``: raise :class:`StopForward` as soon as every module has been seen once in the
    current forward (use with :meth:`LayerwiseRunner.forward_all`, which catches it). In a
    true-sequential GPTQ pass this skips the part of the decoder layer after the group, which
    is most of the calibration time for the q/k/v and o groups.
    """
    seen: set[str] = set()

    def hook(mod, args, name):
        fn(name, args[0])
        if stop:
            seen.add(name)
            if len(seen) == len(modules):
                seen.clear()
                raise StopForward

    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
