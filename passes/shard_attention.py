"""Context parallelism (`fluxc build --world-size N`): attention over every rank's tokens, Ulysses style.

The segments of an N-rank engine are traced for one rank's share of the tokens (Profile.local_*_tokens);
everything but attention is per token and stays as traced. Attention must see all tokens:
Pattern:  %sdpa = aten._scaled_dot_product_{flash_attention_for_cpu, flash_attention, efficient_attention,
                  cudnn_attention}(%q, %k, %v, ..., scale=s)      q, k, v [B, H, S_local, D]; no mask, not causal
          %out  = getitem(%sdpa, 0)                             (the only output used)
Rewrite:  %out  = fluxc.ulysses_attention(%q, %k, %v, s)        (runtime/parallel.py: all-to-all over heads,
                                                                 attention over all tokens, all-to-all back)
Runs before select_attention (the op picks its kernel through torch's SDPA dispatch at run time).
Pre:  H divisible by the world size (build checks it); every attention unmasked (FLUX's joint attention).
Post: counts["ulysses"] == attention calls in the segment when world_size > 1; nothing changes at 1.
Numerics: the same softmax attention over the same tokens (keys in another order); exact up to summation order.
"""

import operator

import torch

from fluxc.passes.base import ATTENTION, PassContext, PassResult, call, is_aten, replace_with
from fluxc.runtime import parallel  # noqa: F401  (registers fluxc.ulysses_attention)

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


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {"ulysses": 0}
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
    gm.recompile()
    return PassResult(gm, counts)
