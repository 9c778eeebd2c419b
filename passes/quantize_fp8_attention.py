"""Attention in FP8: attention over fluxc.qk_norm_rope's q and k becomes fluxc.attention_fp8 (recipe.fp8_attention):
cuDNN's FP8 SDPA, or FlashAttention-3's FP8 forward (recipe.fp8_attention_kernel).

Pattern:
    %rope = fluxc.qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps)      q, k [B, S, H, D]
    %q = aten.permute(getitem(%rope, 0), [0, 2, 1, 3]);  %k = ... getitem(%rope, 1) ...   [B, H, S, D]
    %o = <attention kernel>(%q, %k, %v, ...)
Rewrite:
    %rms_fp8_scale(q weights), %rms_fp8_scale(k weights): f32[1, 1, 1, 1] = input          (made at build time)
    %rope8 = fluxc.qk_norm_rope_fp8(..., q scale, k scale)                                 q, k e4m3
    %v8, %v_scale = aten._to_copy(%v / (amax|v| / 448), f8e4m3), amax|v| / 448              (per tensor, at run time)
    %o8 = fluxc.attention_fp8(%q8, %k8, %v8, q scale, k scale, %v_scale, softmax_scale, impl)  [B, H, S, D] e4m3
    %o = aten.mul(aten._to_copy(%o8, bf16), aten.mul(%v_scale, 9/8))     (its scale: ATTENTION_OUT_HEADROOM's 9/8)
quantize_fp8, which runs next, lets the output projections read %o8 through the layout ops between.
Kernel: recipe.fp8_attention_kernel, the op's last argument (impl); "auto" takes the faster on the GPU building the
engine (fluxc.tactics times both at the segment's attention shape; "cudnn" where FA3 cannot run), and the manifest's
pass_reports keep {"kernel": chosen, "measured_ms": {kernel: ms}}.
Pre:  fuse_qk_norm_rope ran. Post: counts["attention"] attention calls in FP8 (n_double + n_single on tiny).
Numerics: q and k on static bounds of the normed rows (sqrt(D) max|w| / 448), v and the output on v's amax (the
output with 9/8 of headroom: runtime/ops/kernels.py, ATTENTION_OUT_HEADROOM); the softmax probabilities in e4m3
(both kernels); a segment's output at or above numerics.FP8_SEGMENT_SQNR_DB against bf16.
"""

import operator

import torch

from fluxc import tactics
from fluxc.ir import WeightSource
from fluxc.passes.base import ATTENTION, NoMatch, PassContext, PassResult, add_weight, aten, call, expect, is_aten, rewrite_all
from fluxc.passes.linear import quantize_by_amax
from fluxc.runtime.ops.kernels import ATTENTION_OUT_HEADROOM, flash3_available


def quantize_attention(gm: torch.fx.GraphModule, node: torch.fx.Node, kernel: str) -> None:
    """attention(q, k, v) over fluxc.qk_norm_rope's q and k -> fluxc.attention_fp8 on e4m3 q, k (static scales
    from the norm weights, quantized by qk_norm_rope_fp8) and v (scale amax / 448 at run time); the output is
    dequantized for its readers, and quantized linears reading it take the e4m3 output directly."""
    q, k, v = node.args[:3]
    qg, kg = (expect(t, aten.permute.default, depth=0, what="q/k: expected").args[0] for t in (q, k))
    rope = qg.args[0] if is_aten(qg, operator.getitem) else None
    if not (is_aten(rope, torch.ops.fluxc.qk_norm_rope.default) and kg.args[0] is rope
            and (qg.args[1], kg.args[1]) == (0, 1) and q.args[1] == k.args[1] == [0, 2, 1, 3]):
        raise NoMatch(node, "q and k are not fluxc.qk_norm_rope's outputs as [B, H, S, D]", 1)
    out = [u for u in node.users if u.args[1] == 0]
    g = gm.graph
    q_weights, k_weights = rope.args[2:4]
    scales = []
    for weights in (q_weights, k_weights):
        sources = tuple(w.meta["weight"] for w in weights)
        name = f"rms_fp8_scale({','.join(s.name for s in sources)})"
        scales.append(add_weight(gm, WeightSource(name, "rms_fp8_scale", sources),
                                 weights[0].meta["val"].new_empty(1, 1, 1, 1, dtype=torch.float32)))
    with g.inserting_before(node):
        rope8 = call(g, torch.ops.fluxc.qk_norm_rope_fp8.default, *rope.args, *scales)
        q8, k8 = (call(g, aten.permute.default, call(g, operator.getitem, rope8, i), [0, 2, 1, 3]) for i in (0, 1))
        v8, v_scale = quantize_by_amax(g, v, [0, 1, 2, 3])
        softmax_scale = node.kwargs.get("scale") or q.meta["val"].shape[-1] ** -0.5
        o8 = call(g, torch.ops.fluxc.attention_fp8.default, q8, k8, v8, *scales, v_scale, float(softmax_scale), kernel)
        o_scale = call(g, aten.mul.Tensor, v_scale, ATTENTION_OUT_HEADROOM)
        o = call(g, aten.mul.Tensor, call(g, aten._to_copy.default, o8, dtype=q.meta["val"].dtype), o_scale)
    for user in out:
        user.replace_all_uses_with(o)


def fastest_kernel(q) -> tuple[str, dict]:
    """"auto": the faster kernel on the GPU building the engine, at q's [B, H, S, D], and the report for the
    manifest; cuDNN's, with nothing measured, where FlashAttention-3 cannot run (a CPU build among them)."""
    measured = {}
    if q.is_cuda and flash3_available(q.device):
        b, h, s, d = q.shape
        measured = tactics.attention_fp8_ms(b, s, h, d, q.device)
    kernel = min(measured, key=measured.get) if measured else "cudnn"
    return kernel, {"kernel": kernel, "measured_ms": measured}


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    nodes = [n for n in gm.graph.nodes if is_aten(n, *ATTENTION)]
    kernel, report = ctx.recipe.fp8_attention_kernel, None
    if kernel == "auto" and nodes:
        kernel, report = fastest_kernel(nodes[0].args[0].meta["val"])
    done, rejected = rewrite_all(nodes, lambda n: quantize_attention(gm, n, kernel))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, {"attention": done}, rejected, report=report)
