"""Remove ops that return their input unchanged.

Patterns (each a rule with its own count):
  identity_view   %v = aten.view(%x, shape(%x))  | aten.reshape | aten.expand to the same shape
  identity_cast   %c = aten._to_copy(%x, dtype=dtype(%x)) with no device/layout change | aten.clone(%x)
                  | aten.alias(%x)
  cast_roundtrip  %c = aten._to_copy(aten._to_copy(%x, dtype=wider), dtype=dtype(%x))   (bf16->f32->bf16)
  cat_of_slices   %c = aten.cat([aten.slice(%x, d, 0, a), aten.slice(%x, d, a, end)], d)  (the single block
                  splits its joint text+image sequence at the end; the next one joins it again)
Eval-mode dropout needs no rule: make_fx already traces `aten.dropout(train=False)` to its input
(tests/test_passes.py holds that).
Before:  %view_3: bf16[63, 256] = aten.view(%x, [63, 256])  where %x: bf16[63, 256];  %y = mm(%view_3, ...)
After:   %y = mm(%x, ...)
Numerics: exact. A widening cast followed by the narrowing cast back is exact because every value of
the narrow dtype is representable in the wide one.
"""

import torch

from fluxc.passes.base import PassContext, PassResult, is_pure_cast, replace_with

aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default)
_IDENTITIES = (aten.clone.default, aten.alias.default)
# (narrow, wide) pairs where narrow -> wide -> narrow is the identity
_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64),
                   (torch.bfloat16, torch.float64), (torch.float16, torch.float64)}


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def match(node: torch.fx.Node):
    """(rule, replacement node) if `node` is a no-op, else (None, reason)."""
    if node.op == "call_function" and node.target == aten.cat.default:
        return _cat_of_slices(node)
    if node.op != "call_function" or not node.args:
        return None, "not an op"
    src, out, inp = node.args[0], _val(node), _val(node.args[0])
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return None, "no tensor values"
    if node.target in _RESHAPES:
        return ("identity_view", src) if out.shape == inp.shape else (None, "shape changes")
    if node.target in _IDENTITIES and node.kwargs.get("memory_format") in (None, torch.preserve_format):
        return "identity_cast", src
    if is_pure_cast(node):
        if out.dtype == inp.dtype:
            return "identity_cast", src
        if isinstance(src, torch.fx.Node) and src.op == "call_function" and is_pure_cast(src):
            orig = _val(src.args[0])
            if orig.dtype == out.dtype and (orig.dtype, inp.dtype) in _EXACT_WIDENING:
                return "cast_roundtrip", src.args[0]
        return None, f"cast {inp.dtype}->{out.dtype} changes values"
    return None, "not a no-op pattern"


def _cat_of_slices(cat: torch.fx.Node):
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if not all(isinstance(p, torch.fx.Node) and p.target == aten.slice.Tensor for p in parts):
        return None, "not a concatenation of slices"
    src = parts[0].args[0]
    ndim = _val(src).dim()
    end = 0
    for p in parts:
        p_dim, start, stop = (list(p.args[1:]) + [0, None, None])[:3]
        if p.args[0] is not src or p_dim % ndim != dim % ndim or start != end or len(p.args) > 4:
            return None, "slices of different tensors, dims or ranges"
        end = min(stop, _val(src).shape[dim]) if stop is not None else _val(src).shape[dim]
    if end != _val(src).shape[dim]:
        return None, "the slices do not cover the tensor"
    return "cat_of_slices", src


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {"identity_view": 0, "identity_cast": 0, "cast_roundtrip": 0, "cat_of_slices": 0}
    for node in list(gm.graph.nodes):
        rule, replacement = match(node)
        if rule is not None:
            replace_with(node, replacement)
            counts[rule] += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, counts)
