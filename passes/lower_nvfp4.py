"""Lower fluxc.nvfp4_linear to the target's kernels: native NVFP4 GEMMs on sm_100+, exact emulation elsewhere.

Runs when the engine is finished (after a plan, on the target), so one plan serves both.
Pattern:  %y = fluxc.nvfp4_linear(%x, %codes, %scales, %global, %bias[, %x_global])           [M, N] bf16
          (%x_global: the calibrated global scale of x, passed on to nvfp4_quantize; None: x's own amax)
Rewrite, native (sm_100, sm_120: Blackwell's block-scaled FP4 tensor cores):
    %xq, %xs, %xg = fluxc.nvfp4_quantize(%x, swizzled=True)          (Triton: codes, swizzled scales, global)
    %y0 = aten._scaled_mm(aten.view.dtype(%xq, f4e2m1x2), aten.t(aten.view.dtype(%codes, f4e2m1x2)),
                          %xs, %nvfp4_swizzled(scales), None, None, bf16)      (swizzled weight scales made here)
Rewrite, emulated (sm_89/sm_90 and the CPU):
    %xq, %xs, %xg = fluxc.nvfp4_quantize(%x, swizzled=False)
    %y0 = aten.mm(fluxc.nvfp4_dequantize(%xq, %xs, bf16), aten.t(fluxc.nvfp4_dequantize(%codes, %scales, bf16)))
Then, both:  %y = aten._to_copy(aten.add(aten.mul(aten._to_copy(%y0, f32), aten.mul(%xg, %global)), %bias), bf16)
Numerics: both forms multiply the same e2m1 * e4m3 operand values (bit-equal codes and scales: the same
quantize kernel; dequantized values are exact in bf16) with fp32 accumulation, round to bf16 and scale by
the globals in fp32: they differ only in accumulation order. The native form was compiled (graph and
Triton kernels), not run: no Blackwell GPU was available to fluxc's developers.
Post: counts["native"] or counts["emulated"] == quantize_nvfp4's counts["quantized"].
"""

import operator

import torch

from fluxc.ir import WeightSource
from fluxc.passes.base import PassContext, PassResult, add_weight, aten, call, drop_unused_weights, is_aten
from fluxc.runtime.core import targets
from fluxc.runtime.ops import nvfp4

def mode(target: str) -> str:
    """"native" where the target has FP4 tensor cores (sm_100 and newer), else "emulated"."""
    return "native" if targets.has(target, "nvfp4") else "emulated"


def describe(target: str) -> str:
    return ("native FP4 GEMMs (block-scaled _scaled_mm)" if mode(target) == "native"
            else "emulated: quantize-dequantize, bf16 GEMMs")


def _quantize(g: torch.fx.Graph, x: torch.fx.Node, swizzled: bool, x_global) -> list[torch.fx.Node]:
    q = call(g, torch.ops.fluxc.nvfp4_quantize.default, x, swizzled, x_global)
    return [call(g, operator.getitem, q, i) for i in range(3)]


def _native(gm: torch.fx.GraphModule, x, codes, scales, x_global) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(bf16 GEMM of the block-scaled FP4 operands, x's global scale)."""
    g = gm.graph
    xq, xs, xg = _quantize(g, x, True, x_global)
    source, val = scales.meta["weight"], scales.meta["val"]
    swizzled = add_weight(gm, WeightSource(f"nvfp4_swizzled({source.name})", "nvfp4_swizzled", (source,)),
                          val.new_empty(nvfp4.swizzled_numel(*val.shape)))
    fp4 = torch.float4_e2m1fn_x2
    w = call(g, aten.t.default, call(g, aten.view.dtype, codes, fp4))
    return call(g, aten._scaled_mm.default, call(g, aten.view.dtype, xq, fp4), w, xs, swizzled, None, None,
                x.meta["val"].dtype), xg


def _emulated(gm: torch.fx.GraphModule, x, codes, scales, x_global) -> tuple[torch.fx.Node, torch.fx.Node]:
    g = gm.graph
    dtype = x.meta["val"].dtype
    xq, xs, xg = _quantize(g, x, False, x_global)
    xd, wd = (call(g, torch.ops.fluxc.nvfp4_dequantize.default, c, s, dtype) for c, s in ((xq, xs), (codes, scales)))
    return call(g, aten.mm.default, xd, call(g, aten.t.default, wd)), xg


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    how = mode(ctx.target)
    lower = _native if how == "native" else _emulated
    g = gm.graph
    count = 0
    for node in list(g.nodes):
        if not is_aten(node, torch.ops.fluxc.nvfp4_linear.default):
            continue
        x, codes, scales, w_global, bias, *static = node.args
        with g.inserting_before(node):
            y, x_global = lower(gm, x, codes, scales, *(static or [None]))
            out = call(g, aten.mul.Tensor, call(g, aten._to_copy.default, y, dtype=torch.float32),
                       call(g, aten.mul.Tensor, x_global, w_global))  # as nvfp4.scale_output
            if bias is not None:
                out = call(g, aten.add.Tensor, out, bias)
            out = call(g, aten._to_copy.default, out, dtype=x.meta["val"].dtype)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        count += 1
    drop_unused_weights(gm)
    gm.recompile()
    return PassResult(gm, {how: count})
