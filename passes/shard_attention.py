"""Context parallelism (`fluxc build --world-size N`): attention over every rank's tokens, Ulysses style.

The segments of an N-rank engine are traced for one rank's share of the tokens (Profile.local_*_tokens);
everything but attention is per token and stays as traced. Attention must see all tokens:
Pattern:  %sdpa = aten._scaled_dot_product_{flash_attention_for_cpu, flash_attention, efficient_attention,
                  cudnn_attention}(%q, %k, %v, ..., scale=s)      q, k, v [B, H, S_local, D]; no mask, not causal
          %out  = getitem(%sdpa, 0)                             (the only output used)
Rewrite:  %out  = fluxc.ulysses_attention(%q, %k, %v, s)        (runtime/parallel.py: all-to-all over heads,
                                                                 attention over all tokens, all-to-all back)
Rule "overlap" (a single block: its MLP does not depend on attention): the op in its three steps, with that
work between them, so that it computes while the transfers run (runtime/parallel.py):
          %got  = fluxc.ulysses_send(%q, %k, %v)
          ...independent work traced before the attention (the MLP input GEMM; hides the q/k/v transfer)
          %back = fluxc.ulysses_attend(%got, [its GEMMs' outputs], s)
          ...independent work traced after it (the output projection's MLP half; hides the transfer back)
          %out  = fluxc.ulysses_receive(%back, [its GEMMs' outputs])
  Independent: neither an input of the attention nor a user of it. Each side's work stays in its traced order
  and moves as a whole, so every node still follows its inputs; the `after` lists pin it between the steps.
  Applied where at least one GEMM is independent (not in a double block, whose every GEMM feeds or follows
  its attention).
Runs before select_attention (the op picks its kernel through torch's SDPA dispatch at run time).
Pre:  H divisible by the world size (build checks it); every attention unmasked (FLUX's joint attention).
Post: counts["ulysses"] == attention calls in the segment when world_size > 1, counts["overlap"] of them split
into steps; nothing changes at 1.
Numerics: the same softmax attention over the same tokens (keys in another order); exact up to summation order.
"""

import operator

import torch

from fluxc.passes.base import ATTENTION, PassContext, PassResult, aten, call, is_aten, replace_with
from fluxc.runtime import kernels, nvfp4, parallel  # noqa: F401  (register the fluxc ops)

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
         torch.ops.fluxc.nvfp4_linear.default)


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


def overlap(gm: torch.fx.GraphModule, attention: torch.fx.Node) -> bool:
    """Split `attention` (a fluxc.ulysses_attention node) into its three steps around the work that does not
    depend on it, if that work holds a GEMM; returns whether it did."""
    graph = gm.graph
    related = _closure(attention, lambda n: n.all_input_nodes) | _closure(attention, lambda n: n.users)
    free = [n for n in graph.nodes if n.op == "call_function" and n is not attention and n not in related]
    if not any(is_gemm(n) for n in free):
        return False
    position = {n: i for i, n in enumerate(graph.nodes)}
    before = [n for n in free if position[n] < position[attention]]
    after = [n for n in free if position[n] > position[attention]]
    q, k, v, scale = attention.args
    with graph.inserting_before(attention):
        got = call(graph, torch.ops.fluxc.ulysses_send.default, q, k, v)
    for n in before:
        attention.prepend(n)  # in their order, after the send
    with graph.inserting_before(attention):
        back = call(graph, torch.ops.fluxc.ulysses_attend.default, got, [n for n in before if is_gemm(n)], scale)
    for n in after:
        attention.prepend(n)  # in their order, after the attention step
    with graph.inserting_before(attention):
        out = call(graph, torch.ops.fluxc.ulysses_receive.default, back, [n for n in after if is_gemm(n)])
    replace_with(attention, out)
    return True


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {"ulysses": 0, "overlap": 0}
    if ctx.world_size == 1:
        return PassResult(gm, counts)
    for node in [n for n in gm.graph.nodes if is_aten(n, *ATTENTION)]:
        why = check(node)
        if why is not None:  # every FLUX attention qualifies: a miss is a compiler bug, not a slow path
            raise AssertionError(f"{ctx.segment_kind}: attention {node.name} cannot be sharded: it {why}")
        q, k, v = node.args[:3]
        with gm.graph.inserting_before(node):
            out = call(gm.graph, torch.ops.fluxc.ulysses_attention.default, q, k, v, node.kwargs.get("scale"))
        for use in list(node.users):
            replace_with(use, out)
        gm.graph.erase_node(node)
        counts["ulysses"] += 1
        counts["overlap"] += overlap(gm, out)
    gm.recompile()
    return PassResult(gm, counts)
