"""Fuse sibling linears — the Q, K and V projections of one normed input — into one GEMM.

Pattern (a single block, after dedupe_nodes made the three input views one node):
    %t_2 = aten.t(%attn_to_q_weight);  %addmm_2 = aten.addmm(%attn_to_q_bias, %view_2, %t_2)   [M, N]
    %t_3 = aten.t(%attn_to_k_weight);  %addmm_3 = aten.addmm(%attn_to_k_bias, %view_2, %t_3)   [M, N]
    %t_4 = aten.t(%attn_to_v_weight);  %addmm_4 = aten.addmm(%attn_to_v_bias, %view_2, %t_4)   [M, N]
Rewrite:
    %cat0_attn_to_q_weight_attn_to_k_weight_attn_to_v_weight: [3N, K] = input   (made at build time)
    %addmm = aten.addmm(%cat0_..._bias, %view_2, aten.t(%cat0_..._weight))                 [M, 3N]
    %slice = aten.slice(%addmm, 1, 0, N) ... (the members' uses read strided column slices)
Any group of linears (addmm, or mm without bias) that read the same input node and take their weights
straight from weight inputs is fused: Q/K/V in every block, the text stream's added Q/K/V, and the two
AdaLN modulation projections of a double block. A member whose output feeds a GELU is left out: it gets
the GELU in its own GEMM's epilogue (fuse_epilogues), which measured faster on the H200 than one wider
GEMM plus a separate GELU pass (0.825 vs 0.790 + ~0.06 ms at FLUX's single-block shape);
`recipe.qkv_with_mlp` fuses it here instead.
Pre:  pure graph, shared inputs deduplicated.  Post: counts["groups"] fused GEMMs replacing
counts["linears"] linears; the replaced weights leave the graph's inputs.
Numerics: within numerics.REWRITE_TOLERANCE (exact on the CPU). Each output column is the same dot
product over K; only cuBLAS's kernel choice for the wider shape may change the summation order.
"""

import torch

from fluxc.ir import WeightSource
from fluxc.passes.base import (VIEWS, NoMatch, PassContext, PassResult, Rejection, add_weight, aten, call,
                               drop_unused_weights, is_aten)
from fluxc.passes.linear import linear_parts


def feeds_gelu(node: torch.fx.Node) -> bool:
    return any(is_aten(u, aten.gelu.default) or (is_aten(u, *VIEWS) and feeds_gelu(u)) for u in node.users)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    rejected = []
    for node in gm.graph.nodes:
        try:
            x, _, _ = linear_parts(node)
        except NoMatch as e:
            if e.rejection.depth:
                rejected.append(e.rejection)
            continue
        if feeds_gelu(node) and not ctx.recipe.qkv_with_mlp:
            rejected.append(Rejection(node.name, "feeds a GELU: fuse_epilogues puts that in its own GEMM "
                                                 "(recipe.qkv_with_mlp fuses it here instead)", 2))
            continue
        groups.setdefault(x, []).append(node)
    counts = {"groups": 0, "linears": 0}
    for x, members in groups.items():
        if len(members) < 2:
            rejected.append(Rejection(members[0].name, f"no other linear reads its input {x.name}", 1))
        elif len({linear_parts(m)[2] is None for m in members}) > 1:
            rejected.append(Rejection(members[0].name, "siblings mix linears with and without bias", 3))
        else:
            _fuse(gm, x, members)
            counts["groups"] += 1
            counts["linears"] += len(members)
    gm.graph.eliminate_dead_code()
    drop_unused_weights(gm)
    gm.recompile()
    return PassResult(gm, counts, rejected)


def _fuse(gm: torch.fx.GraphModule, x: torch.fx.Node, members: list[torch.fx.Node]) -> None:
    parts = [linear_parts(m) for m in members]
    fake_mode = torch._guards.detect_fake_mode([x.meta["val"]])

    def concat(nodes):
        with fake_mode:
            like = torch.cat([n.meta["val"] for n in nodes])
        return add_weight(gm, WeightSource.cat([n.meta["weight"] for n in nodes]), like)

    weight = concat([w for _, w, _ in parts])
    bias = concat([b for _, _, b in parts]) if parts[0][2] is not None else None
    with gm.graph.inserting_before(members[0]):
        wt = call(gm.graph, aten.t.default, weight)
        fused = call(gm.graph, aten.addmm.default, bias, x, wt) if bias else call(gm.graph, aten.mm.default, x, wt)
        start = 0
        for m in members:
            n = m.meta["val"].shape[1]
            m.replace_all_uses_with(call(gm.graph, aten.slice.Tensor, fused, 1, start, start + n))
            start += n
