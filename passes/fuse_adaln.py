"""Fuse AdaLN — a LayerNorm without affine, then `x * (1 + scale) + shift` — into one kernel (fluxc.adaln).

Pattern (norm1 of the image and the text stream in double blocks, the single block's norm, norm_out):
    %ln = getitem(aten.native_layer_norm(%x, [C], None, None, 1e-06), 0)                  [B, S, C]
    %mul = aten.mul.Tensor(%ln, aten.add.Tensor(aten.unsqueeze(%scale, 1), 1))         (or unsqueeze(add))
    %out = aten.add.Tensor(%mul, aten.unsqueeze(%shift, 1))                            scale, shift [B, C]
    (FLUX.2: `(1 + scale) * ln + shift` with scale, shift [B, 1, C], slices of the shared modulation)
Rewrite:
    %out = fluxc.adaln(%x, %scale, %shift, 1e-06)            (FLUX.2's scale, shift squeezed to [B, C] first)
Inductor already fuses this into one kernel, but a looped reduction: it reads the 3072-wide row twice
and ran at 41-57 us per 4608x3072 call on the H200, against ~15 us of memory traffic. fluxc's kernel keeps
the row in registers. A norm whose input is a residual add (a double block's norm2) is left alone: Inductor
fuses that add into its kernel, and the op would need the sum written out first. Except where the recipe's
FP8 GEMMs add their gated residual themselves (fp8_epilogues "gate_residual"): the GEMM writes the sum anyway,
and Inductor's looped norm + quantize kernel over it ran at 53 us per 4096x3072 call on an H100, adaln_fp8 at 19.
Pre:  pure graph.  Post: counts["fused"] == 2 per double block (4 with the gated-residual GEMMs), 1 per single
block, 1 in the tail.
Numerics: within numerics.REWRITE_TOLERANCE; the op rounds the normed row to the activation dtype as the
unfused graph does, then modulates in fp32 and rounds once (the unfused graph rounds after each op).
"""

import torch

from fluxc.passes.base import NoMatch, PassContext, PassResult, aten, call, expect, is_aten, rewrite_all
from fluxc.recipes import Precision


def _modulation(node: torch.fx.Node, plus_one: bool, depth: int) -> torch.fx.Node:
    """v of unsqueeze(v, 1) [+ 1], the +1 before or after the unsqueeze; v must be [B, C]."""
    seen_one = False
    while True:
        if is_aten(node, aten.unsqueeze.default) and node.args[1] == 1:
            node = node.args[0]
        elif plus_one and not seen_one and is_aten(node, aten.add.Tensor) and node.args[1] == 1:
            node, seen_one = node.args[0], True
        else:
            break
    if plus_one and not seen_one:
        raise NoMatch(node, "modulation: no (1 + scale)", depth)
    shape = node.meta["val"].shape
    if len(shape) != 2 and not (len(shape) == 3 and shape[1] == 1):
        raise NoMatch(node, "modulation: scale/shift are not [B, C] or [B, 1, C]", depth)
    return node


def match(ln: torch.fx.Node, residual_written: bool):
    """(x, scale, shift, eps, the modulated output) around one native_layer_norm, else NoMatch. residual_written:
    a residual add feeding the norm will be written out by its GEMM (see the module's docstring)."""
    x, shape, weight, bias, eps = ln.args
    if weight is not None or bias is not None or list(shape) != [x.meta["val"].shape[-1]]:
        raise NoMatch(ln, "LayerNorm with affine weights or over more than the last dim", 0)
    if is_aten(x, aten.add.Tensor) and not residual_written:
        raise NoMatch(ln, "input is a residual add that Inductor fuses into its own norm kernel", 1)
    users = [u for u in ln.users if u.args[1] == 0]
    if len(users) != 1 or len(users[0].users) != 1:
        raise NoMatch(ln, "the normed output has other users than the modulation", 2)
    mul = expect(next(iter(users[0].users)), aten.mul.Tensor, depth=3, what="modulation: expected")
    scale = _modulation(mul.args[1] if mul.args[0] is users[0] else mul.args[0], True, 3)
    if len(mul.users) != 1:
        raise NoMatch(mul, "modulation: the scaled output has other users", 4)
    add = expect(next(iter(mul.users)), aten.add.Tensor, depth=4, what="modulation: expected")
    shift = _modulation(add.args[1] if add.args[0] is mul else add.args[0], False, 4)
    return x, scale, shift, eps, add


def fuse(gm: torch.fx.GraphModule, ln: torch.fx.Node, residual_written: bool) -> None:
    x, scale, shift, eps, out = match(ln, residual_written)
    with gm.graph.inserting_before(out):
        scale, shift = (call(gm.graph, aten.squeeze.dim, v, 1) if v.meta["val"].dim() == 3 else v for v in (scale, shift))
        out.replace_all_uses_with(call(gm.graph, torch.ops.fluxc.adaln.default, x, scale, shift, float(eps)))


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    norms = [n for n in gm.graph.nodes if is_aten(n, aten.native_layer_norm.default)]
    residual_written = ctx.recipe.precision is Precision.FP8 and "gate_residual" in ctx.recipe.fp8_epilogues
    fused, rejected = rewrite_all(norms, lambda n: fuse(gm, n, residual_written))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, {"fused": fused}, rejected)
