"""ONNX translations of fluxc's custom ops and of the attention the graphs call, for torch.onnx's exporter.

Each fused op becomes the standard ONNX op where opset 23 has one (LayerNormalization, RMSNormalization,
Gelu with approximate="tanh", Attention), so TensorRT's parser sees the fusion the graph passes made:
    fluxc.adaln(x, scale, shift, eps)      LayerNormalization(x, 1, 0) * (1 + scale) + shift
    fluxc.linear_gelu(x, w, b)             Gelu(MatMul(x, w^T) + b, approximate="tanh")
    fluxc.qk_norm_rope(q, k, ..., eps)     RMSNormalization per part, Concat along S, then the interleaved
                                           rotary embedding in float32 (y*cos + rotate_pairs(y)*sin)
    aten SDPA (CPU flash / cuDNN forms)    Attention(q, k, v, scale)
"""

import torch
from onnxscript import opset23 as op

FLOAT = 1  # onnx.TensorProto.FLOAT


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


def table() -> dict:
    aten = torch.ops.aten
    return {torch.ops.fluxc.adaln.default: adaln, torch.ops.fluxc.linear_gelu.default: linear_gelu,
            torch.ops.fluxc.qk_norm_rope.default: qk_norm_rope,
            aten._scaled_dot_product_flash_attention_for_cpu.default: sdpa_flash_cpu,
            aten._scaled_dot_product_cudnn_attention.default: sdpa_cudnn}
