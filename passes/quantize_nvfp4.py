"""Quantize linears to NVFP4: weights packed at build time, activations per 16-element block at run time.

Pattern (the linears quantize_fp8 matches: addmm, mm, fuse_epilogues' fluxc.linear_gelu and split addmm):
    %addmm = aten.addmm(%bias, %x, aten.t(%weight))                                          [M, N] bf16
Rewrite:
    %nvfp4(weight): u8[N, K/2] = input; %nvfp4_scale(weight): f8e4m3[N, K/16] = input;
    %nvfp4_global(weight): f32[1] = input                                                    (made at build time)
    %addmm = fluxc.nvfp4_linear(%x, %nvfp4(weight), %nvfp4_scale(weight), %nvfp4_global(weight), %bias)
    (fluxc.linear_gelu: the same, then aten.gelu(tanh); an addmm accumulating onto C: the same, then + C)
Built with --calibrate, each x is quantized on a static global scale stored per layer (weight op "act_global":
the calibrated input amax / 2688), the extra last argument of nvfp4_linear: the block scales stay per 16
elements at run time, as in TensorRT's TRT_FP4DynamicQuantize, whose global scale is a build-time constant.
fluxc.nvfp4_linear is target-independent: a plan (`fluxc build --stage plan`) stores it, and
passes/lower_nvfp4.py picks its kernel (native sm_100 GEMM or exact emulation) when the engine is finished.
Weight-only linears (recipe.quant_weight_only: the AdaLN modulation GEMMs, run once per generation by
hoist_schedule) read their weight dequantized in the graph: nvfp4_dequantize(codes, scales) * global, in bf16.
Excluded (recipe.quant_exclude), as for FP8 and as NVIDIA's ModelOpt FLUX recipe keeps them in higher precision:
the head's embedders and time embedding, the tail's final norm and projection, the text encoders and the VAE.
They are 0.3% of FLUX.1-dev's weights; the final projection's error would land on the prediction unaveraged.
Linears whose K is not a multiple of 16 stay bf16 too (rejected, with the reason).
Pre:  fusion passes ran (a fused QKV weight quantizes as one tensor: one global scale over the fused rows).
Post: counts["quantized"] fluxc.nvfp4_linear calls, counts["weight_only"], counts["excluded"] as the recipe says.
Numerics (runtime/ops/nvfp4.py): per-block scales keep each 16-element block within e2m1's grid, ~20 dB per
operand on Gaussian data; each quantized linear at or above numerics.NVFP4_LINEAR_SQNR_DB against float64
math, a segment at or above numerics.NVFP4_SEGMENT_SQNR_DB against its bf16 graph.
"""

import torch

from fluxc.ir import WeightSource
from fluxc.passes.base import PassContext, PassResult, add_weight, aten, call
from fluxc.passes.weight_formats import NVFP4_OPS
from fluxc.passes.linear import linear_operands, quantized_result, recipe_linears, replace_linear, replace_weight
from fluxc.runtime.ops import nvfp4

def nvfp4_weights(gm: torch.fx.GraphModule, weight: torch.fx.Node) -> list[torch.fx.Node]:
    """New weight inputs: `weight` [N, K] as e2m1 codes [N, K/2] u8, e4m3 block scales [N, K/16], global f32 [1]."""
    source, val = weight.meta["weight"], weight.meta["val"]
    n, k = val.shape
    likes = (val.new_empty(n, k // 2, dtype=torch.uint8), val.new_empty(n, k // nvfp4.BLOCK, dtype=torch.float8_e4m3fn),
             val.new_empty(1, dtype=torch.float32))
    return [add_weight(gm, WeightSource(f"{op}({source.name})", op, (source,)), like) for op, like in zip(NVFP4_OPS, likes)]


def quantize(gm: torch.fx.GraphModule, node: torch.fx.Node, calibrated: bool) -> None:
    x, weight, bias, *_ = linear_operands(node)
    codes, scales, global_ = nvfp4_weights(gm, weight)
    static = []
    if calibrated:
        source = weight.meta["weight"]
        static = [add_weight(gm, WeightSource(f"act_global({source.name})", "act_global", (source,)),
                             weight.meta["val"].new_empty(1, dtype=torch.float32))]
    replace_linear(gm, node, lambda g: call(g, torch.ops.fluxc.nvfp4_linear.default, x, codes, scales, global_, bias,
                                            *static))


def quantize_weight_only(gm: torch.fx.GraphModule, weight: torch.fx.Node) -> None:
    codes, scales, global_ = nvfp4_weights(gm, weight)
    replace_weight(gm, weight, lambda g: call(g, aten.mul.Tensor, call(
        g, torch.ops.fluxc.nvfp4_dequantize.default, codes, scales, torch.float32), global_))


def _k_not_blocked(node: torch.fx.Node, weight: torch.fx.Node) -> str | None:
    k = weight.meta["val"].shape[-1]
    return f"K = {k} is not a multiple of {nvfp4.BLOCK}" if k % nvfp4.BLOCK else None


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    to_quantize, weight_only, excluded, rejected = recipe_linears(gm, ctx, quantize_weight_only, _k_not_blocked)
    for node, _ in to_quantize:
        quantize(gm, node, ctx.calibrated)
    return quantized_result(gm, {}, rejected, [name for _, name in to_quantize], weight_only, excluded)
