"""Linears and their quantization: the helpers fuse_qkv, fuse_epilogues, quantize_fp8, quantize_fp8_attention and
quantize_nvfp4 share (no pass imports another pass). A linear in the IR is `addmm(bias, x, t(weight))`,
`mm(x, t(weight))` or fuse_epilogues' `fluxc.linear_gelu(x, weight, bias)`, its weight a weight input.
"""

import fnmatch

import torch

from fluxc.ir import E4M3_MAX, WeightSource
from fluxc.passes.base import NoMatch, PassContext, PassResult, Rejection, aten, call, drop_unused_weights, is_aten


def linear_parts(node: torch.fx.Node):
    """(input, weight placeholder, bias placeholder | None) of `addmm(b, x, t(w))` / `mm(x, t(w))`, else NoMatch."""
    if is_aten(node, aten.addmm.default) and len(node.args) == 3 and not node.kwargs:
        bias, x, wt = node.args
    elif is_aten(node, aten.mm.default):
        bias, (x, wt) = None, node.args
    else:
        raise NoMatch(node, "not addmm or mm")
    if not is_aten(wt, aten.t.default) or "weight" not in wt.args[0].meta:
        raise NoMatch(node, "the weight operand is not t(weight input)", 1)
    if bias is not None and ("weight" not in bias.meta or bias.meta["val"].dim() != 1):
        raise NoMatch(node, "the bias is not a 1-D weight input", 1)
    return x, wt.args[0], bias


def linear_operands(node: torch.fx.Node):
    """(x, weight placeholder, bias | None, accumulate | None, gelu?) of a quantizable linear, else NoMatch.
    `accumulate`: the [M, N] C operand of an addmm that adds onto a partial product (fuse_epilogues'
    split output projection)."""
    if is_aten(node, torch.ops.fluxc.linear_gelu.default):
        x, weight, bias = node.args
        return x, weight, bias, None, True
    if is_aten(node, aten.addmm.default) and len(node.args) == 3 and node.args[0].meta["val"].dim() == 2:
        c, x, wt = node.args
        if is_aten(wt, aten.t.default) and "weight" in wt.args[0].meta:
            return x, wt.args[0], None, c, False
    x, weight, bias = linear_parts(node)
    return x, weight, bias, None, False


def quantize_by_amax(g: torch.fx.Graph, x: torch.fx.Node, dims: list[int]) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(x / scale in e4m3, scale) as aten ops, scale = amax of |x| over `dims` (kept) in f32 / 448."""
    amax = call(g, aten._to_copy.default, call(g, aten.amax.default, call(g, aten.abs.default, x), dims, True),
                dtype=torch.float32)
    scale = call(g, aten.div.Tensor, call(g, aten.clamp_min.default, amax, 1e-12), E4M3_MAX)
    return call(g, aten._to_copy.default, call(g, aten.div.Tensor, x, scale), dtype=torch.float8_e4m3fn), scale


def replace_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, matmul) -> None:
    """Replace the linear `node` (linear_operands) by matmul(graph), the new [M, N] product with its bias, followed
    by the linear's GELU epilogue and its accumulation onto C where it has them."""
    _, _, _, accumulate, gelu = linear_operands(node)
    g = gm.graph
    with g.inserting_before(node):
        out = matmul(g)
        if gelu:
            out = call(g, aten.gelu.default, out, approximate="tanh")
        if accumulate is not None:
            out = call(g, aten.add.Tensor, out, accumulate)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def replace_weight(gm: torch.fx.GraphModule, weight: torch.fx.Node, dequantize) -> None:
    """Weight-only quantization: every use of `weight` reads dequantize(graph) (f32 nodes, inserted before the
    weight's first user) rounded to the weight's dtype."""
    g = gm.graph
    first_user = next(n for n in g.nodes if n in weight.users)
    with g.inserting_before(first_user):
        weight.replace_all_uses_with(call(g, aten._to_copy.default, dequantize(g), dtype=weight.meta["val"].dtype))


def matches(ctx: PassContext, source: WeightSource, patterns) -> bool:
    """Whether a linear's weight is named by recipe patterns over "segment kind:checkpoint name"."""
    keys = [f"{ctx.segment_kind}:{n}" for n in source.checkpoint_names()]
    return any(fnmatch.fnmatchcase(k, p) for k in keys for p in patterns)


def recipe_linears(gm: torch.fx.GraphModule, ctx: PassContext, quantize_weight_only, check=None):
    """The recipe's linears, in graph order, sorted: the ones to quantize [(linear, weight name)]; the weight-only
    ones, rewritten here by quantize_weight_only(gm, weight), and the excluded ones, by weight name; and the
    rejections (near misses, and linears `check(linear, weight)` keeps out by returning a reason). Shared by
    quantize_fp8 and quantize_nvfp4."""
    linears, rejected = [], []
    for node in list(gm.graph.nodes):
        try:
            _, weight, *_ = linear_operands(node)
        except NoMatch as e:
            if e.rejection.depth:
                rejected.append(e.rejection)
            continue
        source = weight.meta["weight"]
        how = ("exclude" if matches(ctx, source, ctx.recipe.quant_exclude)
               else "weight_only" if matches(ctx, source, ctx.recipe.quant_weight_only) else "quantize")
        linears.append((node, weight, how))
    to_quantize, weight_only, excluded = [], [], []
    for node, weight, how in linears:
        name = weight.meta["weight"].name
        why = check(node, weight) if check is not None and how != "exclude" else None
        if why:
            rejected.append(Rejection(node.name, why, 2))
            how = "exclude"
        if how == "exclude":
            excluded.append(name)
        elif how == "weight_only":
            quantize_weight_only(gm, weight)
            weight_only.append(name)
        else:
            to_quantize.append((node, name))
    return to_quantize, weight_only, excluded, rejected


def quantized_result(gm: torch.fx.GraphModule, counts: dict, rejected: list, quantized: list[str],
                     weight_only: list[str], excluded: list[str]) -> PassResult:
    """The rewritten graph cleaned up, the counts, and the manifest's report of which layers went which way."""
    gm.graph.eliminate_dead_code()
    drop_unused_weights(gm)
    gm.recompile()
    counts = {"quantized": len(quantized), **counts, "weight_only": len(weight_only), "excluded": len(excluded)}
    return PassResult(gm, counts, rejected, report={"quantized": quantized, "weight_only": weight_only,
                                                        "excluded": excluded})
