"""ONNX translations of fluxc's custom ops and of the attention the graphs call, for torch.onnx's exporter.

Each fused op becomes the standard ONNX op where opset 23 has one (LayerNormalization, RMSNormalization,
Gelu with approximate="tanh", Attention), so TensorRT's parser sees the fusion the graph passes made:
    fluxc.adaln(x, scale, shift, eps)      LayerNormalization(x, 1, 0) * (1 + scale) + shift
    fluxc.linear_gelu(x, w, b)             Gelu(MatMul(x, w^T) + b, approximate="tanh")
    fluxc.qk_norm_rope(q, k, ..., eps)     RMSNormalization per part, Concat along S, then the interleaved
                                           rotary embedding in float32 (y*cos + rotate_pairs(y)*sin)
    aten SDPA (CPU flash / cuDNN forms)    Attention(q, k, v, mask, is_causal, scale)
FP8 (quantize_fp8) in the Q/DQ form TensorRT's parser fuses, with per-token scales as blocked quantization
(opset 21+: one scale per row, block size = the row):
    fluxc.adaln_fp8 / fluxc.gelu_fp8       the op above, then scale = max(amax(|y|), 1e-12) / 448 per row
                                           and QuantizeLinear(y, scale, axis=-1, block_size=C) to float8e4m3fn
    aten._scaled_mm(a, b, sa, sb, bias)    MatMul(DequantizeLinear(a, sa), DequantizeLinear(b, sb)) + bias,
                                           each scale per tensor, per row of a or per column of b
NVFP4 (quantize_nvfp4, unlowered) in the pattern NVIDIA's ModelOpt exports for TensorRT: packed FLOAT4E2M1
weights (the engine's e2m1 codes, fed as float4: ONNX packs two per byte, the first in the low nibble, as
fluxc does) with two-level DequantizeLinear, and TensorRT's own op for the activations:
    fluxc.nvfp4_linear(x, codes, scales, global, bias, x_global)
        xq, xs = trt::TRT_FP4DynamicQuantize(x, x_global, axis=-1, block_size=16, scale_type=float8e4m3fn)
        x' = DequantizeLinear(xq, DequantizeLinear(xs, x_global), axis=-1, block_size=16)
        w' = DequantizeLinear(codes, DequantizeLinear(scales, global), axis=-1, block_size=16)
        MatMul(x', w'^T) + bias, in float32, cast back to x's type
    fluxc.nvfp4_dequantize(codes, scales)  DequantizeLinear(codes, Cast(scales, float), axis=-1, block_size=16)
x_global is the calibrated global scale (--calibrate): TensorRT takes it as a build-time constant. ONNX
Runtime has no TRT_ ops; fluxc.runtime.ops.onnx_reference runs such models with onnx.reference and a
transcription of the op's documented math.
"""

import math

import torch
from onnxscript import opset23 as op
from onnxscript import values

from fluxc.runtime.ops.onnx_reference import TRT_DOMAIN, register_trt_schemas

FLOAT, FLOAT8E4M3FN = 1, 17  # onnx.TensorProto
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
trt = values.Opset(TRT_DOMAIN, 1)


def adaln(x, scale, shift, eps: float):
    width = op.Shape(x, start=-1)
    one, zero = op.CastLike(op.Constant(value_float=1.0), x), op.CastLike(op.Constant(value_float=0.0), x)
    normed = op.LayerNormalization(x, op.Expand(one, width), op.Expand(zero, width), axis=-1, epsilon=eps)[0]
    rows = op.Constant(value_ints=[1])  # [B, C] -> [B, 1, C]
    return normed * (one + op.Unsqueeze(scale, rows)) + op.Unsqueeze(shift, rows)


def linear_gelu(x, weight, bias):
    return op.Gelu(op.MatMul(x, op.Transpose(weight, perm=[1, 0])) + bias, approximate="tanh")


def _rope(y, cos, sin):
    """y [B, S, H, D] float32, cos/sin [S, D]: y * cos + rotate_pairs(y) * sin."""
    broadcast = op.Constant(value_ints=[0, 2])  # [S, D] -> [1, S, 1, D]
    pairs = op.Reshape(y, op.Concat(op.Shape(y, end=-1), op.Constant(value_ints=[-1, 2]), axis=0))
    x0, x1 = op.Split(pairs, axis=-1, num_outputs=2)
    rotated = op.Reshape(op.Concat(op.Neg(x1), x0, axis=-1), op.Shape(y))
    return y * op.Unsqueeze(cos, broadcast) + rotated * op.Unsqueeze(sin, broadcast)


def qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps: float):
    outs = []
    for parts, weights in ((q_parts, q_weights), (k_parts, k_weights)):
        normed = [op.RMSNormalization(x, w, axis=-1, epsilon=eps) for x, w in zip(parts, weights)]
        y = normed[0] if len(normed) == 1 else op.Concat(*normed, axis=1)
        outs.append(op.CastLike(_rope(op.Cast(y, to=FLOAT), cos, sin), y))
    return outs[0], outs[1]


def _attention(q, k, v, mask, is_causal: bool, scale):
    attrs = {"is_causal": int(is_causal)} | ({} if scale is None else {"scale": scale})
    out = op.Attention(q, k, v, mask, **attrs) if mask is not None else op.Attention(q, k, v, **attrs)
    return out[0] if isinstance(out, (tuple, list)) else out


def sdpa_flash_cpu(q, k, v, dropout_p: float = 0.0, is_causal: bool = False, attn_mask=None, scale=None):
    return _attention(q, k, v, attn_mask, is_causal, scale), op.Constant(value_float=0.0)  # (output, unused lse)


def sdpa_cudnn(q, k, v, attn_bias=None, compute_log_sumexp: bool = False, dropout_p: float = 0.0,
               is_causal: bool = False, return_debug_mask: bool = False, scale=None):
    unused = op.Constant(value_float=0.0)  # logsumexp, cum_seq_q/k, max_q/k, philox seed/offset, debug mask
    return (_attention(q, k, v, attn_bias, is_causal, scale),) + (unused,) * 8


def _quantize_rows(y, width: int):
    """(y / scale rounded to e4m3, scale [..., 1] f32), scale = max(amax over the last dim, 1e-12) / 448;
    `width`: y's last dim (the exporter knows the op inputs' shapes, not those of values made here)."""
    wide = op.Cast(y, to=FLOAT)
    amax = op.ReduceMax(op.Abs(wide), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Max(amax, op.Constant(value_float=1e-12)) / op.Constant(value_float=E4M3_MAX)
    return op.QuantizeLinear(wide, scale, axis=-1, block_size=width, output_dtype=FLOAT8E4M3FN), scale


def adaln_fp8(x, scale, shift, eps: float):
    return _quantize_rows(adaln(x, scale, shift, eps), x.shape[-1])


def gelu_fp8(x):
    return _quantize_rows(op.Gelu(x, approximate="tanh"), x.shape[-1])


def _dequantize(q, scale, axis: int):
    """q [M, N] float8 with a scale per tensor ([] or [1, 1]) or per row / column ([M, 1] / [1, N])."""
    if math.prod(scale.shape) == 1:
        return op.DequantizeLinear(q, op.Reshape(scale, op.Constant(value_ints=[])))
    return op.DequantizeLinear(q, scale, axis=axis, block_size=q.shape[axis])


def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum: bool = False):
    out = op.MatMul(_dequantize(a, scale_a, 1), _dequantize(b, scale_b, 0))
    if bias is not None:
        out = out + op.Cast(bias, to=FLOAT)
    return op.CastLike(out, bias) if bias is not None else op.Cast(out, to=16)  # bf16: the only out dtype used


def _block_dequantize(q, block_scale, scale):
    """Two-level dequantization: q * DequantizeLinear(block_scale, scale) per 16-element block of the last axis."""
    return op.DequantizeLinear(q, op.DequantizeLinear(block_scale, scale), axis=-1, block_size=NVFP4_BLOCK)


def nvfp4_linear(x, w_codes, w_scales, w_global, bias=None, x_global=None):
    if x_global is None:  # validate._check_backend refuses these builds first
        raise ValueError("NVFP4 export needs calibrated activation global scales (--calibrate)")
    x_global = op.Squeeze(x_global)  # [1] -> a scalar: per-tensor quantization
    xq, xs = trt.TRT_FP4DynamicQuantize(op.Cast(x, to=FLOAT), x_global, axis=-1, block_size=NVFP4_BLOCK,
                                        scale_type=FLOAT8E4M3FN, _num_outputs=2)
    w = _block_dequantize(w_codes, w_scales, op.Squeeze(w_global))
    y = op.MatMul(_block_dequantize(xq, xs, x_global), op.Transpose(w, perm=[1, 0]))
    return op.CastLike(y if bias is None else y + op.Cast(bias, to=FLOAT), x)


def nvfp4_dequantize(codes, scales, dtype: int):
    """`dtype`: the exporter passes torch dtypes as ONNX data types (an IntEnum)."""
    values_ = op.DequantizeLinear(codes, op.Cast(scales, to=FLOAT), axis=-1, block_size=NVFP4_BLOCK)
    return values_ if dtype == FLOAT else op.Cast(values_, to=int(dtype))


def table() -> dict:
    register_trt_schemas()
    aten = torch.ops.aten
    return {torch.ops.fluxc.nvfp4_linear.default: nvfp4_linear,
            torch.ops.fluxc.nvfp4_dequantize.default: nvfp4_dequantize,
            torch.ops.fluxc.adaln.default: adaln, torch.ops.fluxc.linear_gelu.default: linear_gelu,
            torch.ops.fluxc.qk_norm_rope.default: qk_norm_rope, torch.ops.fluxc.adaln_fp8.default: adaln_fp8,
            torch.ops.fluxc.gelu_fp8.default: gelu_fp8, aten._scaled_mm.default: scaled_mm,
            aten._scaled_dot_product_flash_attention_for_cpu.default: sdpa_flash_cpu,
            aten._scaled_dot_product_cudnn_attention.default: sdpa_cudnn}
