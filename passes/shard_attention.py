"""Context parallelism (`fluxc build --world-size N`): attention over every rank's tokens, Ulysses style.

The segments of an N-rank engine are traced for one rank's share of the tokens (Profile.local_*_tokens);
everything but attention is per token and stays as traced. Attention must see all tokens:
Pattern:  %sdpa = aten._scaled_dot_product_{flash_attention_for_cpu, flash_attention, efficient_attention,
                  cudnn_attention}(%q, %k, %v, ..., scale=s)      q, k, v [B, H, S_local, D]; no mask, not causal
          %out  = getitem(%sdpa, 0)                             (the only output used)
Rewrite:  attention in three steps (runtime/parallel.py: all-to-all over heads, attention over all tokens, all-to-all
          back), with the work that depends on neither side of it between them, so that it computes while the
          transfers run (rule "overlap": a single block, whose MLP does not depend on attention):
          %got  = fluxc.ulysses_send(%q, %k, %v)
          ...independent work traced before the attention (the MLP input GEMM; hides the q/k/v transfer)
          %back = fluxc.ulysses_attend(%got, [its GEMMs' outputs], s)
          ...independent work traced after it (the output projection's MLP half; hides the transfer back)
          %out  = fluxc.ulysses_receive(%back, [its GEMMs' outputs])
  Independent: neither an input of the attention nor a user of it. Each side's work stays in its traced order
  and moves as a whole, so every node still follows its inputs; the `after` lists pin it between the steps.
  A double block has no such work (every GEMM feeds or follows its attention): its steps follow each other.
Rule "qk_norm_rope": q and k straight from fluxc.qk_norm_rope (through the [B, S, H, D] -> [B, H, S, D] permute):
          %got  = fluxc.ulysses_send_qk(<qk_norm_rope's inputs>, %v)   its kernel writes the send buffer
Rule "e4m3" (Recipe.ulysses_e4m3, the FP8 recipes): the sends put q, k and v on the wire as e4m3 rows with their
          scales (runtime/ops/ulysses.py); attention dequantizes them.
Runs before select_attention (the op picks its kernel through torch's SDPA dispatch at run time).
Pre:  H divisible by the world size (build checks it); every attention unmasked (FLUX's joint attention).
Post: counts["ulysses"] == attention calls in the segment when world_size > 1, counts["overlap"] of them with a
GEMM between the steps, counts["qk_norm_rope"] of them sending qk_norm_rope's output, counts["e4m3"] of them
sending e4m3; nothing changes at 1.
Numerics: the same softmax attention over the same tokens (keys in another order); exact up to summation order,
except with e4m3 transfers: numerics.FP8_WIRE_SQNR_DB for the attention output.
"""

import operator

import torch

from fluxc.passes.base import ATTENTION, PassContext, PassResult, aten, call, is_aten, replace_with

# where each kernel takes its attention bias and is_causal (positions after q, k, v; the CPU kernel's mask is
# the keyword attn_mask, flash takes none)
_MASK_CAUSAL = {ATTENTION[0]: (None, 4), ATTENTION[1]: (None, 4), ATTENTION[2]: (3, 6), ATTENTION[3]: (3, 6)}


def check(node: torch.fx.Node) -> str | None:
    mask_at, causal_at = _MASK_CAUSAL[node.target]
    mask = node.args[mask_at] if mask_at is not None and len(node.args) > mask_at else node.kwargs.get("attn_mask")
    if mask is not None:
        return "has an attention mask"
    if len(node.args) > causal_at and node.args[causal_at]:
        return "is causal"
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return "uses an output other than the attention result"
    return None


GEMMS = (aten.mm.default, aten.addmm.default, aten._scaled_mm.default, torch.ops.fluxc.linear_gelu.default,
         torch.ops.fluxc.nvfp4_linear.default, torch.ops.fluxc.fp8_linear_gelu_fp8.default,
         torch.ops.fluxc.fp8_linear_gate_residual.default)


def is_gemm(node: torch.fx.Node) -> bool:
    return is_aten(node, *GEMMS)


def _closure(node: torch.fx.Node, step) -> set[torch.fx.Node]:
    """Every node reached from `node` by repeating `step` (its inputs, or its users)."""
    seen, todo = set(), [node]
    while todo:
        for n in step(todo.pop()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def split(graph: torch.fx.Graph, attention: torch.fx.Node, q, k, v, scale, e4m3: bool) -> bool:
    """Replace `attention` (an SDPA node) by the three steps, with the work that depends on neither side of it
    between them; returns whether that work holds a GEMM (what the overlap is for)."""
    related = _closure(attention, lambda n: n.all_input_nodes) | _closure(attention, lambda n: n.users)
    free = [n for n in graph.nodes if n.op == "call_function" and n is not attention and n not in related]
    position = {n: i for i, n in enumerate(graph.nodes)}
    before = [n for n in free if position[n] < position[attention]]
    after = [n for n in free if position[n] > position[attention]]
    with graph.inserting_before(attention):
        got = call(graph, torch.ops.fluxc.ulysses_send.default, q, k, v, e4m3)
    for n in before:
        attention.prepend(n)  # in their order, after the send
    with graph.inserting_before(attention):
        back = call(graph, torch.ops.fluxc.ulysses_attend.default, got, [n for n in before if is_gemm(n)], scale)
    for n in after:
        attention.prepend(n)  # in their order, after the attention step
    with graph.inserting_before(attention):
        out = call(graph, torch.ops.fluxc.ulysses_receive.default, back, [n for n in after if is_gemm(n)])
    for use in list(attention.users):  # getitem(attention, 0): the attention result
        replace_with(use, out)
    graph.erase_node(attention)
    fold_qk_norm_rope(graph, got)
    return any(is_gemm(n) for n in free)


def _norm_rope_source(x: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(the fluxc.qk_norm_rope node, output index) when x = permute(getitem(it, i), [0, 2, 1, 3]) used once."""
    if not (is_aten(x, aten.permute.default) and list(x.args[1]) == [0, 2, 1, 3] and len(x.users) == 1):
        return None
    item = x.args[0]
    if item.target is not operator.getitem or len(item.users) != 1:
        return None
    source = item.args[0]
    return (source, item.args[1]) if source.target is torch.ops.fluxc.qk_norm_rope.default else None


def fold_qk_norm_rope(graph: torch.fx.Graph, send: torch.fx.Node) -> None:
    """ulysses_send(q, k, v) of a fluxc.qk_norm_rope's two outputs -> ulysses_send_qk(its inputs, v)."""
    q, k, v, e4m3 = send.args
    qs, ks = _norm_rope_source(q), _norm_rope_source(k)
    if qs is None or ks is None or qs[0] is not ks[0] or (qs[1], ks[1]) != (0, 1) or len(qs[0].users) != 2:
        return
    norm_rope = qs[0]
    with graph.inserting_before(send):
        fused = call(graph, torch.ops.fluxc.ulysses_send_qk.default, *norm_rope.args, v, e4m3)
    replace_with(send, fused)
    for x in (q, k):
        item = x.args[0]
        graph.erase_node(x)
        graph.erase_node(item)
    graph.erase_node(norm_rope)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {"ulysses": 0, "overlap": 0, "qk_norm_rope": 0, "e4m3": 0}
    if ctx.world_size == 1:
        return PassResult(gm, counts)
    for node in [n for n in gm.graph.nodes if is_aten(n, *ATTENTION)]:
        why = check(node)
        if why is not None:  # every FLUX attention qualifies: a miss is a compiler bug, not a slow path
            raise AssertionError(f"{ctx.segment_kind}: attention {node.name} cannot be sharded: it {why}")
        q, k, v = node.args[:3]
        counts["overlap"] += split(gm.graph, node, q, k, v, node.kwargs.get("scale"), ctx.recipe.ulysses_e4m3)
        counts["ulysses"] += 1
        counts["e4m3"] += ctx.recipe.ulysses_e4m3
    counts["qk_norm_rope"] = sum(n.target is torch.ops.fluxc.ulysses_send_qk.default for n in gm.graph.nodes)
    gm.recompile()
    return PassResult(gm, counts)
