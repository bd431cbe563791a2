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
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qtool import dist
from qtool.log import track, trim_heap
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
            starts = range(0, ids.shape[0], batch_size)
            rows = [min(batch_size, ids.shape[0] - i) for i in starts]
            self.inputs = block(rows, (ids.shape[1], self.model.config.hidden_size), dtype, self.store)
            for x, i in zip(self.inputs, starts, strict=True):
                x.copy_(emb(ids[i : i + batch_size].to(self.device)))
        self.fp_inputs = [x.clone() for x in self.inputs] if fp_stream else None
        self._staged: StagedPass | None = None  # the last layer's finished staged pass
        self._scratch: torch.Tensor | None = None  # StagedPass's b, then d: reused layer after layer
        seq = ids.shape[1]
        pos = torch.arange(seq, device=self.device)[None]
        rotary = self.adapter.rotary(self.model).to(self.device)
        with torch.no_grad():
            self.position_embeddings = rotary(torch.zeros(1, seq, 1, device=self.device, dtype=dtype), pos)

    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def scratch(self, rows: list[int], shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        """Like :func:`block`, in one buffer the runner keeps from layer to layer (grown when too
        small): a new mapping per stage and layer would be faulted in page by page each time. Its
        views are valid until the next call, so a stage's values go here only when the previous
        user's are dead (StagedPass: ``b`` is used up before ``d`` is written)."""
        numel = sum(rows) * math.prod(shape)
        buf = self._scratch
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._scratch = buf = None  # the old one is freed before the new one is mapped
            self._scratch = buf = torch.empty(numel, dtype=dtype, device=self.store)
        return list(buf[:numel].view(sum(rows), *shape).split(rows))

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

    def staged(self, layer: nn.Module, groups) -> StagedPass | None:
        """A :class:`StagedPass` over ``layer`` when ``groups`` are the adapter's four
        true-sequential groups of a Llama-structure decoder layer, else None (use
        :meth:`forward_all` with :func:`capture_inputs`)."""
        if tuple(tuple(g) for g in groups) != STAGED_GROUPS or type(layer).__name__ not in STAGED_LAYERS:
            return None
        return StagedPass(self, layer)

    @torch.no_grad()
    def advance(self, layer: nn.Module, fp_layer: nn.Module | None = None) -> None:
        """Replace the stored inputs by ``layer``'s outputs (and the fp stream's by ``fp_layer``'s);
        a finished :class:`StagedPass` over ``layer`` hands over the outputs it already computed."""
        staged, self._staged = self._staged, None
        if staged is not None and staged.layer is layer and staged.stage == len(STAGED_GROUPS):
            self.inputs = staged.outputs()
        else:
            self.inputs = [self.run_layer(layer, x).to(self.store) for x in self.inputs]
        trim_heap()
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


STAGED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# decoder layers whose forward is exactly: h1 = x + attn(norm1(x)); out = h1 + mlp(norm2(h1)),
# mlp(c) = down(act(gate(c)) * up(c)) (transformers' Llama, Mistral, Qwen2)
STAGED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
# the down_proj inputs of a layer are kept for the final step when they take at most this share of
# the available host memory; otherwise they are recomputed from the gate/up stage (same values)
KEEP_DOWN_INPUTS_SHARE = 0.25


class StagedPass:
    """A decoder layer's calibration passes, one true-sequential group at a time, each part of the
    layer computed once.

    The classic passes (:meth:`LayerwiseRunner.forward_all` with a stopping
    :func:`capture_inputs`) re-run the layer from its input for every group and once more to
    advance: about 2.4 layer forwards for a Llama layer. Here each stage starts from what the stage
    before kept, computed with the group before it already quantized:

    * ``q/k/v``: ``a = norm1(x)`` (not kept: a norm is cheap);
    * ``o``: ``b`` = the attention output entering ``o_proj`` (kept);
    * ``gate/up``: ``h1 = x + o_proj(b)`` (kept), ``c = norm2(h1)``;
    * ``down``: ``d = act(gate(c)) * up(c)`` (kept when it fits :data:`KEEP_DOWN_INPUTS_SHARE` of
      the available memory, else recomputed at the end);
    * outputs ``h1 + down_proj(d)``, computed by :meth:`LayerwiseRunner.advance` once down_proj
      is quantized.

    The same modules run the same operations on the same tensors as the layer's own forward, so
    every Hessian, code and output is bit-identical to the classic passes (tested); about one
    layer forward in all (1.4 when ``d`` is recomputed). Memory, for every window: the layer's
    inputs block (``h1`` and then the outputs are written into it, each batch once its input is
    used up), and the runner's scratch block, which holds ``b`` and then ``d`` (intermediate size,
    when kept); no per-batch allocations outlive a batch (see :func:`block`).
    """

    def __init__(self, runner: LayerwiseRunner, layer: nn.Module) -> None:
        self.runner, self.layer, self.stage = runner, layer, 0
        self.batches = len(runner.inputs)
        self.attn, self.mlp = layer.self_attn, layer.mlp
        self.kept: list[torch.Tensor] | None = None  # b, then h1
        self.down_in: list[torch.Tensor] | None = None

    @torch.no_grad()
    def capture(self, group: int, fn: Callable[[str, torch.Tensor], None] | None, names=()) -> None:
        """Compute stage ``group`` (0-3, in order) for every batch; ``fn(name, x)`` gets the input of
        each linear in ``names`` (the group's linears still to quantize)."""
        if group != self.stage:
            raise RuntimeError(f"stages run in order: expected {self.stage}, got {group}")
        r, dev = self.runner, self.runner.device
        layer, attn, mlp = self.layer, self.attn, self.mlp
        src = r.inputs if group < 3 else self.kept  # this stage's per-batch inputs
        rows, seq = [x.shape[0] for x in src], src[0].shape[1]
        new: list[torch.Tensor] | None = None
        if group == 1:  # b: the attention output entering o_proj (o_proj's input width)
            new = r.scratch(rows, (seq, attn.o_proj.in_features), r.inputs[0].dtype)
        elif group == 2:  # h1 goes where the layer's inputs were (they are used up once h1 exists)
            new = r.inputs
        elif group == 3 and self._keep_down(sum(rows) * seq * mlp.down_proj.in_features, self.kept[0]):
            new = r.scratch(rows, (seq, mlp.down_proj.in_features), self.kept[0].dtype)  # b is used up
        for k in range(self.batches):
            x = r.inputs[k].to(dev) if group < 3 else None
            if group == 0:
                out = layer.input_layernorm(x)
            elif group == 1:
                got: list[torch.Tensor] = []
                hook = attn.o_proj.register_forward_pre_hook(lambda m, a, got=got: _stop(got, a[0]))
                try:
                    attn(
                        hidden_states=layer.input_layernorm(x),
                        position_embeddings=r.position_embeddings,
                        attention_mask=None,
                    )
                except StopForward:
                    pass
                finally:
                    hook.remove()
                out = got[0]
                new[k].copy_(out)
            elif group == 2:
                h1 = x + attn.o_proj(self.kept[k].to(dev))
                self.kept[k] = None  # b of this batch is used up
                out = layer.post_attention_layernorm(h1)
                new[k].copy_(h1)
            else:
                c = layer.post_attention_layernorm(self.kept[k].to(dev))
                out = _gated(mlp, c)
                if new is not None:
                    new[k].copy_(out)
            if fn is not None:
                for name in names:
                    fn(name, out)
        if group == 1 or group == 2:
            self.kept = new
        if group == 2:  # the layer's inputs are used up: h1 replaces them (same block)
            r.inputs = []
        elif group == 3:
            self.down_in = new
        self.stage += 1
        if group == 3:
            r._staged = self  # advance() finishes the layer from here, once down_proj is quantized

    def _keep_down(self, numel: int, like: torch.Tensor) -> bool:
        return numel * like.element_size() <= KEEP_DOWN_INPUTS_SHARE * _available_bytes(self.runner.store)

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs ``h1 + down_proj(d)`` (down_proj as it is now: quantized)."""
        dev, mlp = self.runner.device, self.mlp
        out = self.kept  # each output goes where its h1 was
        for k in range(self.batches):
            h1 = out[k].to(dev)
            if self.down_in is not None:
                d, self.down_in[k] = self.down_in[k].to(dev), None
            else:
                c = self.layer.post_attention_layernorm(h1)
                d = _gated(mlp, c)
            out[k].copy_(h1.add_(mlp.down_proj(d)))  # h1 is out[k] itself on the CPU: no copy
        self.kept = self.down_in = None
        return out


def block(
    rows: list[int], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Per-batch activations (``rows[k]`` windows of ``shape``) as views of one allocation.

    One block per stage instead of one allocation per batch: a block of the usual calibration
    sizes (tens of MB and more) is above glibc's largest mmap threshold (32 MB), so it is mapped on
    its own and given back whole when freed, while per-batch blocks (a few MB each) sat in the heap
    between the layer's short-lived temporaries and kept the holes those left resident. The views
    are contiguous and hold the same values, so nothing computed from them changes."""
    buf = torch.empty((sum(rows), *shape), dtype=dtype, device=device)
    return list(buf.split(rows))


def _gated(mlp: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """``act(gate(c)) * up(c)``, the product written over the activation (a new tensor): the same
    values as the MLP's own expression, one temporary of intermediate size fewer."""
    return mlp.act_fn(mlp.gate_proj(c)).mul_(mlp.up_proj(c))


def _stop(got: list, x: torch.Tensor):
    got.append(x)
    raise StopForward


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def share_key(name: str, lin, group: tuple[str, ...], lins: dict) -> str:
    """Linears of one group read the same tensor; share statistics when they see it alike."""
    first = next(n for n in group if n in lins)
    ref = lins[first]
    same = lin.input_transform is None and ref.input_transform is None and lin.act_spec == ref.act_spec
    return first if same else name


def calibrate_groups(ctx, runner: LayerwiseRunner, layer: nn.Module, true_sequential: bool, new_stats, add):
    """The inputs of ``layer``'s linears, one true-sequential group at a time, for a solve step.

    For each group with linears still to quantize, one statistics object per distinct input
    (``new_stats(width, device)``; linears reading the same input alike share it, :func:`share_key`) is fed by
    ``add(lin, stats, x)`` through the :class:`StagedPass` (or the classic passes for other layers);
    then ``(lins, stats)`` is yielded, ``stats[name]`` being linear ``name``'s object, and the caller
    solves the group before the next one is captured."""
    groups = ctx.sequential_groups(true_sequential)
    stages = runner.staged(layer, groups)  # each part of the layer computed once (bit-identical)
    for g, group in enumerate(groups):
        lins = ctx.pending({n: runner.adapter.linear(layer, n) for n in group})
        if not lins:
            if stages is not None:
                stages.capture(g, None)
            continue
        keys = {n: share_key(n, m, group, lins) for n, m in lins.items()}
        # allocated now, in the group's order, before the stage's temporaries: created by the first
        # batch, a statistics matrix would sit above that batch's freed temporaries in the heap
        own = {key: new_stats(lins[key].in_features, runner.device) for key in dict.fromkeys(keys.values())}

        def fn(name, x, keys=keys, own=own, lins=lins):
            if keys[name] == name:  # the others share this linear's statistics
                add(lins[name], own[name], x)

        if stages is not None:
            stages.capture(g, fn, list(lins))
        else:
            with capture_inputs(lins, fn, stop=True):
                runner.forward_all(layer)
        # the stage's per-batch temporaries (tens of MB each) are freed in the heap between
        # longer-lived tensors; given back here, the next stage does not start above them (measured:
        # SmolLM2 W4A4 rotate + GPTQ peaks 1.42-1.51 GiB a layer with it, 1.45-1.79 GiB without,
        # depending on the run; no slower)
        trim_heap()
        yield lins, {n: own[keys[n]] for n in lins}


def apply_layerwise(step, ctx) -> None:
    """``apply`` of a calibrated step that streams (``gptq``, ``lowrank``): ``stream_start``, each
    decoder layer of the in-memory model through a data-parallel :class:`LayerwiseRunner`
    (``stream_layer``, progress lines with the step's ``layer_summary``), ``stream_end``."""
    name = type(step).step_name
    step.stream_start(ctx)
    runner = LayerwiseRunner(ctx, step.batch_size, step.offload, shard=True)
    ctx.record(name, {"ranks": dist.world(), "windows_this_rank": sum(x.shape[0] for x in runner.inputs)})
    runner.run(
        lambda i, layer: step.stream_layer(ctx, runner, i, layer),
        name,
        detail=lambda: step.layer_summary(ctx),
    )
    step.stream_end(ctx)


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
