"""Fuse the per-head RMSNorm of q and k and the rotary embedding into one kernel (fluxc.qk_norm_rope).

Pattern (per attention call; the double block first joins text and image tokens, `cat` below):
    %n_q = getitem(aten._fused_rms_norm(%view_8, [128], %attn_norm_q_weight, 1e-06), 0)   [B, S, H, D]
           (or the decomposed form: x * rsqrt(mean(x^2, -1) + eps) * w, with fp32 casts in bf16)
    [%n_q = aten.cat([%n_added_q, %n_q], 1)]                                      (double blocks)
    %rot = aten.view(aten.stack([aten.neg(x[..., 1::2]), x[..., ::2]], -1))      (x = %n_q; unbind/stack form)
    %q = aten.add(aten.mul(%n_q.float(), %cos[None, :, None]), aten.mul(%rot.float(), %sin[None, :, None])).to(bf16)
    (the same for k)  -> attention(aten.permute(%q, [0, 2, 1, 3]), aten.permute(%k, ...), %v)
Rewrite:
    %qk = fluxc.qk_norm_rope([%view_8 (, ...)], [%view_9 (, ...)], [%attn_norm_q_weight (, ...)],
                             [%attn_norm_k_weight (, ...)], %rope_cos, %rope_sin, 1e-06)
    attention(aten.permute(getitem(%qk, 0), ...), aten.permute(getitem(%qk, 1), ...), %v)
Without it Inductor emits ~6 kernels per block for this (norms, concatenations, rotations); the fused
kernel reads q and k once and writes them once, in the [B, S, H, D] layout the attention reads.
Pre:  pure graph (fuse_qkv may have made q/k strided column slices; the kernel takes any row stride).
Post: counts["fused"] == attention calls with RoPE (n_double + n_single).
Numerics: within numerics.REWRITE_TOLERANCE. The op's CPU implementation is the reference math (fp32
norm rounded once to the activation dtype, fp32 rotation); the CUDA kernel is tested against it
(tests/test_gpu.py) and the reference against diffusers' RMSNorm + apply_rotary_emb (tests/test_passes.py).
"""

import operator

import torch

from fluxc.passes.base import (VIEWS, ATTENTION, NoMatch, PassContext, PassResult, aten, call, expect, is_aten,
                               rewrite_all, strip_casts)



def match_rms_norm(node: torch.fx.Node, depth: int):
    """(x, weight, eps) of an RMSNorm over the last dim, fused or decomposed, else NoMatch."""
    node = strip_casts(node)
    if is_aten(node, operator.getitem) and is_aten(node.args[0], aten._fused_rms_norm.default) and node.args[1] == 0:
        x, _, weight, eps = node.args[0].args
        return x, weight, eps if eps is not None else torch.finfo(x.meta["val"].dtype).eps
    scaled = expect(node, aten.mul.Tensor, depth=depth, what="RMSNorm: expected")
    normed, weight = scaled.args
    normed = expect(strip_casts(normed), aten.mul.Tensor, depth=depth, what="RMSNorm x * rstd: expected")
    x, rstd = (strip_casts(a) for a in normed.args)
    add = expect(expect(rstd, aten.rsqrt.default, depth=depth).args[0], aten.add.Scalar, aten.add.Tensor, depth=depth)
    mean = expect(add.args[0], aten.mean.dim, depth=depth)
    square = expect(mean.args[0], aten.pow.Tensor_Scalar, depth=depth)
    if strip_casts(square.args[0]) is not x or square.args[1] != 2:
        raise NoMatch(square, "RMSNorm: the mean is not over the normed input squared", depth)
    if list(mean.args[1]) not in ([-1], [x.meta["val"].dim() - 1]):
        raise NoMatch(mean, "RMSNorm: the mean is not over the last dim", depth)
    return x, weight, add.args[1]


def _table(node: torch.fx.Node) -> torch.fx.Node | None:
    """The [S, D] activation input behind unsqueeze/view broadcasting (the RoPE cos or sin table)."""
    while is_aten(node, aten.unsqueeze.default, *VIEWS, aten._to_copy.default):
        node = node.args[0]
    return node if node.op == "placeholder" and "weight" not in node.meta else None


def _rotated_source(node: torch.fx.Node, depth: int) -> torch.fx.Node:
    """x of view(stack([-x[..., 1::2], x[..., ::2]], -1)), spelled with view + unbind, else NoMatch."""
    flat = expect(node, *VIEWS, depth=depth)
    stack = expect(flat.args[0], aten.stack.default, depth=depth, what="rotation: expected")
    neg, even = stack.args[0]
    odd = expect(neg, aten.neg.default, depth=depth).args[0]
    if not (is_aten(odd, operator.getitem) and is_aten(even, operator.getitem) and odd.args[0] is even.args[0]
            and (odd.args[1], even.args[1]) == (1, 0)):
        raise NoMatch(stack, "rotation: not (-odd, even) pairs of one unbind", depth)
    unbind = expect(odd.args[0], aten.unbind.int, depth=depth)
    pairs = expect(unbind.args[0], *VIEWS, depth=depth)
    if unbind.args[1] not in (-1, pairs.meta["val"].dim() - 1) or pairs.meta["val"].shape[-1] != 2:
        raise NoMatch(unbind, "rotation: not interleaved pairs along the last dim", depth)
    return pairs.args[0]


def match_rope(out: torch.fx.Node, depth: int):
    """(x, cos, sin) of x * cos + rotate(x) * sin, else NoMatch."""
    add = expect(strip_casts(out), aten.add.Tensor, depth=depth, what="RoPE: expected")
    terms = []
    for mul in add.args:
        a, b = expect(mul, aten.mul.Tensor, depth=depth, what="RoPE term: expected").args
        table = _table(b) or _table(a)
        if table is None:
            raise NoMatch(mul, "RoPE term: no cos/sin table input", depth)
        terms.append((strip_casts(a if _table(b) else b), table))
    (x, cos), (rot, sin) = terms if not is_aten(terms[0][0], *VIEWS) else terms[::-1]
    if strip_casts(_rotated_source(rot, depth)) is not x:
        raise NoMatch(add, "RoPE: the rotated tensor is not the one multiplied by cos", depth)
    return x, cos, sin


def match(attention: torch.fx.Node):
    """((q parts, k parts) as (x, weight) lists, cos, sin, eps, (q, k) RoPE outputs) for one attention call."""
    sides = []
    for arg in attention.args[:2]:
        permute = expect(arg, aten.permute.default, depth=1, what="attention q/k: expected")
        rope_out = permute.args[0]
        x, cos, sin = match_rope(rope_out, depth=2)
        joined = x.args[0] if is_aten(x, aten.cat.default) and x.args[1] == 1 else [x]
        sides.append(([match_rms_norm(p, depth=3) for p in joined], cos, sin, rope_out))
    (q_parts, q_cos, q_sin, q_out), (k_parts, k_cos, k_sin, k_out) = sides
    eps = {p[2] for p in q_parts + k_parts}
    if (q_cos, q_sin) != (k_cos, k_sin) or len(q_parts) != len(k_parts) or len(eps) != 1:
        raise NoMatch(attention, "q and k differ in RoPE tables, joined parts or norm eps", 4)
    return q_parts, k_parts, q_cos, q_sin, eps.pop(), (q_out, k_out)


def fuse(gm: torch.fx.GraphModule, attention: torch.fx.Node) -> None:
    q_parts, k_parts, cos, sin, eps, outs = match(attention)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(min(attention.args[:2], key=order.get)):
        qk = call(gm.graph, torch.ops.fluxc.qk_norm_rope.default,
                  [x for x, _, _ in q_parts], [x for x, _, _ in k_parts],
                  [w for _, w, _ in q_parts], [w for _, w, _ in k_parts], cos, sin, float(eps))
        for i, (arg, old) in enumerate(zip(attention.args[:2], outs)):
            arg.replace_input_with(old, call(gm.graph, operator.getitem, qk, i))


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    attentions = [n for n in gm.graph.nodes if is_aten(n, *ATTENTION)]
    fused, rejected = rewrite_all(attentions, lambda n: fuse(gm, n))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, {"fused": fused}, rejected)
