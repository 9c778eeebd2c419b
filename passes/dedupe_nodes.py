"""Common-subexpression elimination of pure aten nodes.

Pattern:  %view = aten.view(%add_1, [63, 256]); %view_2 = aten.view(%add_1, [63, 256])   (Q, K, V inputs)
Rewrite:  every use of %view_2 reads %view.
Pre:  the graph is pure (functionalize_inplace ran); random ops are never merged.
Post: no two pure nodes share target, args and kwargs. This exposes shared inputs to the QKV fusion.
Numerics: exact.
"""

import torch

from fluxc.passes.base import PassContext, PassResult, replace_with


def _key(node: torch.fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        return a if isinstance(a, torch.fx.Node) else (type(a).__name__, repr(a))

    return node.target, freeze(node.args), freeze(node.kwargs)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    seen: dict = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.is_impure():
            continue
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        key = _key(node)
        if key in seen:
            replace_with(node, seen[key])
            merged += 1
        else:
            seen[key] = node
    gm.recompile()
    return PassResult(gm, {"merged": merged})
