"""Engine weights: every tensor the rewritten segments read, per layer, made from the checkpoint (or a plan's
weights) by the WeightSources the passes left on the graphs' weight inputs (fluxc.passes.weight_formats)."""

import torch

from fluxc import ir
from fluxc.passes.weight_formats import FORMATS
from fluxc.runtime.core.errors import FluxcError


def engine_weights(segments, tensors: dict[str, torch.Tensor], release: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor the rewritten segments read, per layer: checkpoint tensors, and the ones passes made
    from them (fused QKV, split projections, quantized forms), from `tensors` (the checkpoint, or a plan's
    weights). Refreshes each segment's weight names from its graph.
    release: `tensors` is handed over: each layer's entries are deleted from it once that layer's weights are made,
    so that a build whose checkpoint holds the only references frees a layer's bf16 sources as their quantized forms
    are made (a FLUX.2-dev fp8 build then peaks at its 64-GB checkpoint, not 64 + 32 GB of fp8 copies). The top
    level's tensors ("" prefix) are made first and kept."""
    by_kind, by_layer = {}, {"": {}}
    for seg in segments:
        sources = [n.meta["weight"] for n in ir.weight_placeholders(seg.graph)]
        seg.weight_names = [src.name for src in sources]
        if by_kind.setdefault(seg.kind, seg.weight_names) != seg.weight_names:  # the runtime shares them by kind
            raise ir.IRError(f"{seg.name}: the passes gave its weights another layout than another {seg.kind} profile's")
        for layer in seg.layers:
            wanted = by_layer.setdefault(f"{layer}." if layer else "", {})
            for src in sources:
                wanted.setdefault(src.name, src)
    weights = {}
    for prefix, sources in by_layer.items():
        for name, src in sources.items():
            try:
                made = src.make(_Prefixed(tensors, prefix), FORMATS)
            except ValueError as e:  # a weight the format cannot hold (NaN / Inf for NVFP4)
                raise FluxcError(f"Cannot make {prefix}{name}: {e}.",
                                 "Check the checkpoint (it holds values no quantized format can store), or "
                                 "build --precision bf16.") from None
            weights[prefix + name] = made.detach().contiguous()
        if release and prefix:
            for key in [k for k in tensors if k.startswith(prefix)]:
                del tensors[key]
    return weights


class _Prefixed:
    """One layer's view of a flat tensor dict: name -> tensors[prefix + name]."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.prefix + name]


def layer_inputs(seg, weights, layer) -> list[torch.Tensor]:
    prefix = f"{layer}." if layer else ""
    return [weights[prefix + w] for w in seg.weight_names] + [seg.example[n] for n in seg.inputs]


def call_graph(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Call a (possibly rewritten) graph on checkpoint tensors: its weights made from their sources as the build makes
    them, its activation inputs by placeholder name."""
    args = [n.meta["weight"].make(tensors, FORMATS) if "weight" in n.meta else tensors[n.name]
            for n in gm.graph.nodes if n.op == "placeholder"]
    return gm(*args)


def one_linear_graph(weight: torch.Tensor, bias: torch.Tensor, rows: int, layer: str) -> torch.fx.GraphModule:
    """The IR of one linear `layer` (weight input `{layer}.weight`, bias `{layer}.bias`, input x_1 [rows, K]): the unit
    the quantization passes' per-layer SQNR floors are measured on."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda w, b, x: [torch.addmm(b, x, w.t())], tracing_mode="fake")(
        weight, bias, weight.new_empty(rows, weight.shape[1]))
    for node, name, t in zip(gm.graph.nodes, ("weight", "bias"), (weight, bias)):
        node.meta["weight"] = ir.WeightSource(f"{layer}.{name}", shape=tuple(t.shape))
    gm.graph.output_node().meta["names"] = ["y"]
    return gm
