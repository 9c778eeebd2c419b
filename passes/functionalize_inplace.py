"""Replace in-place aten ops on intermediates with their out-of-place forms.

Pattern:  %add_ = aten.add_.Scalar(%mean, 1e-06)      (RMSNorm's `variance + eps`)
Rewrite:  %add_ = aten.add.Scalar(%mean, 1e-06)
Pre:  the mutated tensor is a graph intermediate used by nothing after the in-place op but its result.
Post: the graph is pure, so later passes can match patterns without tracking aliasing.
Numerics: exact (same op, same math).
"""

import torch

from fluxc.passes.base import PassContext, PassResult

aten = torch.ops.aten


def _out_of_place(op: torch._ops.OpOverload):
    """aten.add_.Scalar -> aten.add.Scalar, or None where no such overload exists."""
    name = op._schema.name.split("::")[1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def check(node: torch.fx.Node):
    """None if `node` can be rewritten, else the reason it cannot."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return "not an aten op"
    if not node.target._schema.is_mutable:
        return "not in-place"
    if _out_of_place(node.target) is None:
        return f"{node.target} has no out-of-place overload"
    mutated = node.args[0]
    later_users = [u for u in mutated.users if u is not node and u > node]
    if mutated.op == "placeholder" or later_users:
        return f"{mutated.name} is read after being mutated"
    return None


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and check(node) is None:
            node.target = _out_of_place(node.target)
            rewritten += 1
    gm.recompile()
    return PassResult(gm, {"inplace_to_outofplace": rewritten})
