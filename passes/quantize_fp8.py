"""Quantize linears to FP8: e4m3 weights with per-output-channel scales, activations per token at run time.

Pattern (any linear whose weight is a weight input: addmm, mm, and fuse_epilogues' fluxc.linear_gelu):
    %addmm = aten.addmm(%bias, %x, aten.t(%weight))                                       [M, N] bf16
Rewrite:
    %fp8(weight): f8e4m3[N, K] = input;  %fp8_scale(weight): f32[N, 1] = input            (made at build time)
    %scale = aten.div(aten.clamp_min(aten._to_copy(aten.amax(aten.abs(%x), [-1], True), f32), 1e-12), 448)
    %xq = aten._to_copy(aten.div(%x, %scale), f8e4m3)                                     [M, K], [M, 1]
    %addmm = aten._scaled_mm(%xq, aten.t(%fp8(weight)), %scale, aten.t(%fp8_scale(weight)), %bias, None, bf16)
    (fluxc.linear_gelu: the same, then aten.gelu(tanh); an addmm accumulating onto C: _scaled_mm, then + C)
The activation is quantized inside the kernel that produces it:
    %x = view(fluxc.adaln(...))  ->  %xq, %scale = view(fluxc.adaln_fp8(...))     (the AdaLN norms)
    %x = aten.gelu(%y, tanh)     ->  %xq, %scale = fluxc.gelu_fp8(%y)             (the MLP's GELU epilogue)
and otherwise as the aten ops above, which Inductor fuses into the kernel that produces the activation
where that kernel is its own (a LayerNorm after a residual add, the attention output's layout copy).
Which layers stay bf16 is recipe.quant_exclude: patterns over "segment kind:weight name" (default:
the embedders and time embedding in the head, the final norm and projection in the tail, the text
encoders and the VAE); recipe.quant_weight_only keeps a linear's math in bf16 on its e4m3 weight,
dequantized in the graph (default: the AdaLN modulation GEMMs, which hoist_schedule runs once per
generation). The manifest lists all three sets (pass_reports).
Built with --calibrate, each input is quantized on a static per-tensor scale stored per layer (weight
op "act_scale": the calibrated amax / 448; x / scale saturates at 448) instead of per-token scales.
With recipe.fp8_attention, quantize_fp8_attention (the pass before) made attention fluxc.attention_fp8; the
output projections read its e4m3 output through the layout ops between.
Pre:  fusion passes ran (a fused QKV weight quantizes as one tensor; its channel scales are per row anyway).
Post: counts["quantized"] linears call _scaled_mm on counts["inputs"] distinct quantized activations,
counts["fused_inputs"] of them quantized by their producer (2 AdaLN + 2 GELU per double block, 1 + 1 per
single block, + the attention outputs with fp8_attention), counts["static_inputs"] on calibrated scales
(every input, when built with --calibrate); counts["weight_only"] and counts["excluded"]
as the recipe says.
Numerics: per-output-channel weight and per-token activation scales, amax / 448 (e4m3's largest finite
value, so nothing saturates): each quantized linear at or above numerics.FP8_LINEAR_SQNR_DB against
float64 math, a segment's output at or above numerics.FP8_SEGMENT_SQNR_DB against its bf16 graph.
"""

import operator

import torch

from fluxc.ir import E4M3_MAX, WeightSource
from fluxc.passes.base import VIEWS, PassContext, PassResult, add_weight, aten, call, is_aten
from fluxc.passes.linear import (linear_operands, quantize_by_amax, quantized_result, recipe_linears, replace_linear,
                                 replace_weight)


def _producer(x: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The node that computes x through views, and those views (x's own last); each view before x has one user."""
    views, node = [], x
    while is_aten(node, *VIEWS) and (node is x or len(node.users) == 1):
        views.insert(0, node)
        node = node.args[0]
    return node, views


# Ops that only move elements: replayed on an e4m3 tensor they give the e4m3 form of their bf16 result.
LAYOUT = (*VIEWS, aten.permute.default, aten.transpose.int, aten.slice.Tensor, aten.split_with_sizes.default,
          aten.split.Tensor, aten.clone.default, operator.getitem)


def _attention_output(x: torch.fx.Node):
    """(e4m3 attention output, its scale, the layout ops from it to x) when x is a fluxc.attention_fp8 output
    dequantized (quantize_fp8_attention) and then only moved, else None."""
    chain = []
    while is_aten(x, *LAYOUT):
        chain.insert(0, x)
        x = x.args[0]
    if (is_aten(x, aten.mul.Tensor) and is_aten(x.args[0], aten._to_copy.default)
            and is_aten(x.args[0].args[0], torch.ops.fluxc.attention_fp8.default)):
        return x.args[0].args[0], x.args[1], chain
    return None


def _quantize_input(g: torch.fx.Graph, x: torch.fx.Node, readers: int) -> tuple[torch.fx.Node, torch.fx.Node, bool]:
    """(x in e4m3, its per-token scales [M, 1] f32, fused?) for `readers` linears on x: quantized by x's producer
    where a fluxc kernel does both and nothing else reads x, else by aten ops."""
    attention = _attention_output(x)
    if attention is not None:
        xq, scale, chain = attention
        for node in chain:
            xq = call(g, node.target, xq, *node.args[1:], **node.kwargs)
        return xq, _per_row(g, call(g, aten.view.default, scale, [1, 1]), x), True
    producer, views = _producer(x)
    sole = len(x.users) == readers and (producer is x or len(producer.users) == 1)
    fused = None
    if sole and is_aten(producer, torch.ops.fluxc.adaln.default):
        fused = call(g, torch.ops.fluxc.adaln_fp8.default, *producer.args)
    elif sole and is_aten(producer, aten.gelu.default) and producer.kwargs.get("approximate") == "tanh":
        fused = call(g, torch.ops.fluxc.gelu_fp8.default, producer.args[0])
    if fused is not None:
        xq, scale = (call(g, operator.getitem, fused, i) for i in (0, 1))
        for view in views:  # x's views, applied to the fp8 tensor and (all but the last dim) to its scales
            shape = list(view.args[1])
            xq = call(g, view.target, xq, shape)
            scale = call(g, view.target, scale, shape[:-1] + [1])
        return xq, scale, True
    return (*quantize_by_amax(g, x, [-1]), False)


def _per_row(g: torch.fx.Graph, scale: torch.fx.Node, x: torch.fx.Node) -> torch.fx.Node:
    """A per-tensor scale [1, 1] as _scaled_mm's rowwise scales of x: [M, 1], contiguous."""
    rows = call(g, aten.expand.default, scale, [x.meta["val"].shape[0], 1])
    return call(g, aten.clone.default, rows, memory_format=torch.contiguous_format)


def _static_input(gm: torch.fx.GraphModule, x: torch.fx.Node, linears) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(x in e4m3 on its calibrated per-tensor scale, saturating at 448; that scale as rows [M, 1])."""
    sources = tuple(linear_operands(n)[1].meta["weight"] for n in linears)
    scale = add_weight(gm, WeightSource(f"act_scale({','.join(s.name for s in sources)})", "act_scale", sources),
                       x.meta["val"].new_empty(1, 1, dtype=torch.float32))
    g = gm.graph
    with g.inserting_before(linears[0]):
        xs = call(g, aten.clamp.default, call(g, aten.div.Tensor, x, scale), -E4M3_MAX, E4M3_MAX)
        return call(g, aten._to_copy.default, xs, dtype=torch.float8_e4m3fn), _per_row(g, scale, x)


def quantize(gm: torch.fx.GraphModule, linears: list[torch.fx.Node], calibrated: bool) -> str:
    """Rewrite linears that share one input (in graph order), quantizing that input once. Returns how:
    "fused" into the kernel that produces it, "static" on its calibrated scale (every input but the FP8
    attention output, which keeps v's scale), or "aten" (per-token scales by aten ops)."""
    g = gm.graph
    x = linear_operands(linears[0])[0]  # read now: rewriting an earlier linear may have replaced x's producer
    if calibrated and _attention_output(x) is None:
        (xq, scale), fused = _static_input(gm, x, linears), "static"
    else:
        with g.inserting_before(linears[0]):
            xq, scale, by_producer = _quantize_input(g, x, len(linears))
        fused = "fused" if by_producer else "aten"
    for node in linears:
        _, weight, bias, *_ = linear_operands(node)
        w_fp8, w_scale = _fp8_weights(gm, weight)
        replace_linear(gm, node, lambda g: call(g, aten._scaled_mm.default, xq, call(g, aten.t.default, w_fp8), scale,
                                                call(g, aten.t.default, w_scale), bias, None, x.meta["val"].dtype))
    return fused


def _fp8_weights(gm: torch.fx.GraphModule, weight: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """New weight inputs: `weight` [N, K] in e4m3 and its per-output-channel scales [N, 1] f32."""
    source, val = weight.meta["weight"], weight.meta["val"]
    return (add_weight(gm, WeightSource(f"fp8({source.name})", "fp8", (source,)),
                       val.new_empty(val.shape, dtype=torch.float8_e4m3fn)),
            add_weight(gm, WeightSource(f"fp8_scale({source.name})", "fp8_scale", (source,)),
                       val.new_empty(val.shape[0], 1, dtype=torch.float32)))


def quantize_weight_only(gm: torch.fx.GraphModule, weight: torch.fx.Node) -> None:
    """The linear keeps its bf16 math on the e4m3 weight dequantized in the graph (w8 * scale, rounded to bf16)."""
    w8, scale = _fp8_weights(gm, weight)
    replace_weight(gm, weight, lambda g: call(g, aten.mul.Tensor,
                                              call(g, aten._to_copy.default, w8, dtype=torch.float32), scale))


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    to_quantize, weight_only, excluded, near_misses = recipe_linears(gm, ctx, quantize_weight_only)
    by_input: dict[torch.fx.Node, list[torch.fx.Node]] = {}  # linear input -> the linears quantized on it
    for node, _ in to_quantize:
        by_input.setdefault(linear_operands(node)[0], []).append(node)
    input_ways = [quantize(gm, group, ctx.calibrated) for group in by_input.values()]  # "fused" | "static" | "aten"
    counts = {"inputs": len(by_input), "fused_inputs": input_ways.count("fused"),
              "static_inputs": input_ways.count("static")}
    return quantized_result(gm, counts, near_misses, [name for _, name in to_quantize], weight_only, excluded)
