"""Fold the work around GEMMs into the GEMMs: bias + GELU into the epilogue, a concatenated input into two GEMMs.

Rule "bias_gelu" (every FLUX MLP input projection):
    %addmm_1 = aten.addmm(%proj_mlp_bias, %view, aten.t(%proj_mlp_weight))              [M, N]
    %gelu = aten.gelu(aten.view(%addmm_1, [B, S, N]), approximate='tanh')
  ->
    %gelu = aten.view(fluxc.linear_gelu(%view, %proj_mlp_weight, %proj_mlp_bias), [B, S, N])
  On CUDA that is cuBLASLt's bias+GELU epilogue: the [M, N] GEMM output (113 MB per single block at
  1024x1024) is written once instead of written, read and written again.

Rule "split_concat" (the single block's output projection over [attention, MLP]):
    %cat_1 = aten.cat([%view_15, %gelu], 2)                                            [B, S, Ka + Kb]
    %addmm_5 = aten.addmm(%proj_out_bias, aten.view(%cat_1, [M, Ka + Kb]), aten.t(%proj_out_weight))
  ->
    %part = aten.addmm(%proj_out_bias, aten.view(%gelu, [M, Kb]), aten.t(%proj_out_weight[1:Ka:Ka+Kb]))
    %addmm_5 = aten.addmm(%part, aten.view(%view_15, [M, Ka]), aten.t(%proj_out_weight[1:0:Ka]))
  The concatenation (a copy of both inputs) disappears; the second GEMM accumulates onto the first
  through its C operand. The partial GEMMs run in the order their inputs are computed: the MLP half (its GELU
  is traced before the attention) first, so that in a context-parallel engine it runs while attention's output
  is still on its way back from the other ranks (shard_attention's "overlap"). The weight's column blocks are
  split at build time. Only where the concatenation would be a pure copy: a pointwise input (a GELU left out
  of the epilogue by recipe.qkv_with_mlp) is written into it by the kernel that computes it anyway.

Gate * y + residual stays where Inductor puts it: fused into the next LayerNorm kernel inside a block
(`triton_red_fused_add_..._native_layer_norm`), a lone pointwise kernel at a block's end. cuBLASLt has
no epilogue for a per-column gate plus a residual, so there is no GEMM to fold it into here.
Pre:  pure graph; fuse_qkv ran (it leaves GELU-feeding linears alone for this pass).
Post: counts["bias_gelu"] == FLUX MLPs (2 per double block, 1 per single block); counts["split_concat"] ==
1 per single block.
Numerics: within numerics.REWRITE_TOLERANCE. bias_gelu is exact on the CPU (the op's reference is the
unfused math) and rounds once instead of twice on CUDA; split_concat rounds the first partial sum to the
activation dtype (bf16: relative error 2.9e-3 of the product at FLUX's shape on the H200).
"""

import torch

from fluxc.ir import WeightSource
from fluxc.passes.base import (VIEWS, NoMatch, PassContext, PassResult, add_weight, aten, call,
                               drop_unused_weights, expect, is_aten, rewrite_all)
from fluxc.passes.linear import linear_parts


def check_bias_gelu(gelu: torch.fx.Node):
    """(view or None, addmm) of `gelu(view(addmm(b, x, t(w))))`, else NoMatch."""
    if gelu.kwargs.get("approximate", "none") != "tanh":
        raise NoMatch(gelu, "exact GELU; cuBLASLt's epilogue computes the tanh form", 1)
    src = gelu.args[0]
    view = src if is_aten(src, *VIEWS) else None
    addmm = expect(view.args[0] if view else src, aten.addmm.default, depth=2, what="GELU input: expected")
    linear_parts(addmm)
    if len(addmm.users) > 1 or (view and len(view.users) > 1):
        raise NoMatch(addmm, "the GEMM output has other users besides the GELU", 3)
    return view, addmm


def fold_bias_gelu(gm, gelu: torch.fx.Node) -> None:
    view, addmm = check_bias_gelu(gelu)
    x, weight, bias = linear_parts(addmm)
    with gm.graph.inserting_before(gelu):
        out = call(gm.graph, torch.ops.fluxc.linear_gelu.default, x, weight, bias)
        if view is not None:
            out = call(gm.graph, view.target, out, *view.args[1:])
    gelu.replace_all_uses_with(out)


def check_split_concat(addmm: torch.fx.Node):
    """(cat, its inputs) of `addmm(b, view(cat([a, b], -1), [M, K]), t(w))`, else NoMatch."""
    flat, _, _ = linear_parts(addmm)
    cat = expect(flat.args[0] if is_aten(flat, *VIEWS) else flat, aten.cat.default, depth=1,
                 what="GEMM input: expected")
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if cat.meta["val"].dim() != 3:  # a profile-independent test: weight layouts must not vary with resolution
        raise NoMatch(cat, "not a concatenation of token sequences [B, S, K] (the timestep embedding's "
                           "[B, 256] sin/cos is a GEMV input, not worth a second GEMM launch)", 2)
    if dim not in (-1, cat.meta["val"].dim() - 1):
        raise NoMatch(cat, f"concatenates along dim {dim}, not the GEMM's K dimension", 3)
    if len(cat.users) > 1 or len(flat.users) > 1:
        raise NoMatch(cat, "the concatenation has other users", 4)
    for part in parts:
        src = part
        while is_aten(src, *VIEWS, aten.permute.default):
            src = src.args[0]
        if isinstance(src.target, torch._ops.OpOverload) and torch.Tag.pointwise in src.target.tags:
            raise NoMatch(cat, f"input {src.name} is pointwise: Inductor writes it straight into the concatenation", 5)
    return cat, parts


def split_concat(gm, addmm: torch.fx.Node) -> None:
    cat, parts = check_split_concat(addmm)
    _, weight, bias = linear_parts(addmm)
    m = addmm.meta["val"].shape[0]
    fake_mode = torch._guards.detect_fake_mode([weight.meta["val"]])
    starts = [sum(p.meta["val"].shape[-1] for p in parts[:i]) for i in range(len(parts))]  # K offsets
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    acc = bias
    with gm.graph.inserting_before(addmm):
        for i in sorted(range(len(parts)), key=lambda i: position[parts[i]]):  # the first computed first
            part, start, k = parts[i], starts[i], parts[i].meta["val"].shape[-1]
            with fake_mode:
                like = weight.meta["val"][:, start:start + k].contiguous()
            w = add_weight(gm, WeightSource.slice(weight.meta["weight"], 1, start, start + k), like)
            x = call(gm.graph, aten.view.default, part, [m, k])
            wt = call(gm.graph, aten.t.default, w)
            acc = (call(gm.graph, aten.addmm.default, acc, x, wt) if acc is not None
                   else call(gm.graph, aten.mm.default, x, wt))
    addmm.replace_all_uses_with(acc)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    gelus = [n for n in gm.graph.nodes if is_aten(n, aten.gelu.default)]
    n_gelu, rejected = rewrite_all(gelus, lambda n: fold_bias_gelu(gm, n))
    gm.graph.eliminate_dead_code()
    linears = [n for n in gm.graph.nodes if is_aten(n, aten.addmm.default, aten.mm.default)]
    n_split, rejected_split = rewrite_all(linears, lambda n: split_concat(gm, n))
    gm.graph.eliminate_dead_code()
    drop_unused_weights(gm)
    gm.recompile()
    return PassResult(gm, {"bias_gelu": n_gelu, "split_concat": n_split}, rejected + rejected_split)
