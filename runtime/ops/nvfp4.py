"""NVFP4, NVIDIA's two-level microblock 4-bit format (DESIGN.md, "Precisions"), and the ops engines call.

A tensor [..., K] (K a multiple of 16) is quantized along K into
    values  e2m1 codes (sign, 2 exponent bits, 1 mantissa bit: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}), two per byte,
            element 2i in the low nibble of byte i and 2i+1 in the high nibble              uint8 [..., K/2]
    scales  one e4m3 per 16 consecutive elements                                          e4m3 [..., K/16]
    global  one fp32 per tensor                                                           f32 [1]
and x ~= value * scale * global. Quantization is these fp32 operations, in this order (the Triton kernel
performs the same ones, IEEE division included, so its output is bit-equal to the reference here):
    global = amax|x| / 2688                                    (2688 = 6 * 448: e2m1's and e4m3's largest values)
    scale  = e4m3(min(block_amax / (6 * global), 448))         round to nearest even; 0 where global is 0
    q      = x / (f32(scale) * global), clamped to [-6, 6]     0 where that product is 0
    code   = e2m1(q)                                           round to nearest, ties to the even code
                                                               (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4); the sign
                                                               is kept, so -0 and tiny negatives are 0x8
Values past 6 * scale (the scale rounded down) saturate to +-6. Non-finite values: `quantize_weight` (the
build) rejects them; the run-time activation quantizer does not check (no host sync in the denoising loop)
and its result for them is undefined.

Swizzled scales: the layout cuBLASLt's blockwise 1x16 scaling (torch._scaled_mm on fp4 operands) reads on
sm_100: rows padded to a multiple of 128 and scale columns to a multiple of 4 with zeros; each 128x4 tile
stored as 512 contiguous bytes, tiles in row-major order; inside a tile, (r, c) at (r % 32) * 16 + (r // 32) * 4 + c.

Ops (torch.ops.fluxc.*; the plain-torch reference runs on the CPU, Triton kernels on CUDA):
    nvfp4_quantize(x [M, K], swizzled, global) -> (codes u8 [M, K/2], scales e4m3 [M, K/16] or swizzled, global f32 [1])
        global: a static (calibrated) global scale [1], or None for amax|x| / 2688 of this x
    nvfp4_dequantize(codes, scales, dtype) -> value * scale in dtype [..., K]   (exact in bf16: <= 6 significant bits)
    nvfp4_linear(x [M, K], w_codes [N, K/2], w_scales [N, K/16], w_global [1], bias [N] | None, x_global [1] | None)
        -> [M, N]. What passes/quantize_nvfp4.py writes into plans: x quantized per 16-block at run time (on its
        calibrated global scale x_global, or its own amax when None), times the packed
        weight. passes/lower_nvfp4.py replaces it when the engine is finished: native (sm_100+: the codes as
        float4_e2m1fn_x2 into torch._scaled_mm with swizzled scales) or emulated (sm_90, CPU: both operands
        dequantized to bf16, bf16 GEMM). Either way the GEMM's bf16 result is scaled by both globals in fp32,
        plus the bias; this reference is the emulated form.
"""

import torch

from fluxc.runtime.ops.kernels import E4M3_MAX, triton

if triton is not None:
    import triton.language as tl

BLOCK = 16  # elements per e4m3 scale
E2M1_MAX = 6.0
GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7
# A magnitude's code is how many of these it passes: strictly where a tie rounds down to the even code,
# inclusively where it rounds up (0.75 -> 1.0, 1.75 -> 2.0, 3.5 -> 4.0 have even mantissas above them).
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


# ---- the format, in plain torch ---------------------------------------------------------------------
def global_scale(x: torch.Tensor) -> torch.Tensor:
    """amax|x| / 2688 as f32 [1]."""
    return (x.abs().amax().float() / GLOBAL_DIVISOR).reshape(1)


def quantize(x: torch.Tensor, global_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes u8 [..., K/2], scales e4m3 [..., K/16]) of x on the given global scale."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))  # [..., K/16, 16]
    denom = E2M1_MAX * global_
    scale = torch.where(denom > 0, blocks.abs().amax(-1) / denom, 0.0).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = (scale.float() * global_)[..., None]  # [..., K/16, 1]
    q = torch.where(step > 0, blocks / step, 0.0).clamp(-E2M1_MAX, E2M1_MAX)
    codes = _encode_e2m1(q).flatten(-2)  # [..., K]
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale


def _encode_e2m1(q: torch.Tensor) -> torch.Tensor:
    a = q.abs()
    code = sum((a > t).to(torch.uint8) for t in _TIES_DOWN) + sum((a >= t).to(torch.uint8) for t in _TIES_UP)
    return code | (torch.signbit(q).to(torch.uint8) << 3)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, global) of a weight [N, K]; raises ValueError for non-finite values or K % 16."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"the last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("it holds NaN or Inf values, which NVFP4 cannot represent")
    g = global_scale(w)
    return (*quantize(w, g), g)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """value * scale [..., K] in dtype (without the global scale)."""
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).long()  # [..., K]
    values = lut[nibbles].unflatten(-1, (-1, BLOCK)) * scales.float()[..., None]
    return values.flatten(-2).to(dtype)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales [R, C] in cuBLASLt's blocked layout for 1x16 block scaling (module docstring), flat."""
    r, c = scales.shape
    nr, nc = -(-r // 128), -(-c // 4)
    padded = scales.new_zeros(nr * 128, nc * 4, dtype=torch.uint8)
    padded[:r, :c] = scales.view(torch.uint8)
    tiles = padded.view(nr, 128, nc, 4).permute(0, 2, 1, 3)  # [nr, nc, 128, 4]
    return tiles.reshape(nr, nc, 4, 32, 4).transpose(2, 3).reshape(-1).view(torch.float8_e4m3fn)


def unswizzle_scales(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The scales [rows, cols] that swizzle_scales laid out as `flat` (its inverse)."""
    nr, nc = -(-rows // 128), -(-cols // 4)
    tiles = flat.view(torch.uint8).reshape(nr, nc, 32, 4, 4).transpose(2, 3).reshape(nr, nc, 128, 4)
    return tiles.permute(0, 2, 1, 3).reshape(nr * 128, nc * 4)[:rows, :cols].contiguous().view(torch.float8_e4m3fn)


def swizzled_numel(rows: int, cols: int) -> int:
    return -(-rows // 128) * 128 * -(-cols // 4) * 4


def scale_output(y: torch.Tensor, global_: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A block-scaled GEMM's result times both operands' global scales (`global_`, their product) in fp32, + bias."""
    out = y.float() * global_
    return (out if bias is None else out + bias.float()).to(y.dtype)


# ---- ops -----------------------------------------------------------------------------------------------
@torch.library.custom_op("fluxc::nvfp4_quantize", mutates_args=())
def nvfp4_quantize(x: torch.Tensor, swizzled: bool, global_: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = global_scale(x) if global_ is None else global_.float().clone()
    codes, scales = quantize(x, g)
    return codes, swizzle_scales(scales) if swizzled else scales, g


@nvfp4_quantize.register_fake
def _(x, swizzled, global_=None):
    m, k = x.shape
    scales = (x.new_empty(swizzled_numel(m, k // BLOCK), dtype=torch.float8_e4m3fn) if swizzled
              else x.new_empty(m, k // BLOCK, dtype=torch.float8_e4m3fn))
    return x.new_empty(m, k // 2, dtype=torch.uint8), scales, x.new_empty(1, dtype=torch.float32)


@nvfp4_quantize.register_kernel("cuda")
def _nvfp4_quantize_cuda(x, swizzled, global_=None):
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    # torch's reduction and IEEE division: the same global as the reference
    g = global_scale(x) if global_ is None else global_.float().clone()
    codes = x.new_empty(m, k // 2, dtype=torch.uint8)
    n_blocks = k // BLOCK
    scales = (x.new_zeros(swizzled_numel(m, n_blocks), dtype=torch.float8_e4m3fn) if swizzled  # zero padding
              else x.new_empty(m, n_blocks, dtype=torch.float8_e4m3fn))
    grid = (triton.cdiv(m, QUANTIZE_ROWS), triton.cdiv(n_blocks, QUANTIZE_BLOCKS))
    _quantize_kernel[grid](x, g, codes, scales, m, n_blocks, x.stride(0), SWIZZLED=swizzled, ROWS=QUANTIZE_ROWS,
                           BLOCKS=QUANTIZE_BLOCKS, enable_fp_fusion=False)
    return codes, scales, g


@torch.library.custom_op("fluxc::nvfp4_dequantize", mutates_args=())
def nvfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(codes, scales, dtype)


@nvfp4_dequantize.register_fake
def _(codes, scales, dtype):
    return codes.new_empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=dtype)


@nvfp4_dequantize.register_kernel("cuda")
def _nvfp4_dequantize_cuda(codes, scales, dtype):
    codes, scales = codes.contiguous(), scales.contiguous()
    out = codes.new_empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=dtype)
    n = codes.numel()
    _dequantize_kernel[(triton.cdiv(n, DEQUANTIZE_BYTES),)](codes, scales, out, n, BYTES=DEQUANTIZE_BYTES)
    return out


@torch.library.custom_op("fluxc::nvfp4_linear", mutates_args=())
def nvfp4_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor, w_global: torch.Tensor,
                 bias: torch.Tensor | None, x_global: torch.Tensor | None = None) -> torch.Tensor:
    codes, scales, g = nvfp4_quantize(x, False, x_global)
    y = dequantize(codes, scales, x.dtype) @ dequantize(w_codes, w_scales, x.dtype).t()
    return scale_output(y, g * w_global, bias)


@nvfp4_linear.register_fake
def _(x, w_codes, w_scales, w_global, bias, x_global=None):
    return x.new_empty(x.shape[0], w_codes.shape[0])


# ---- Triton kernels (CUDA) -------------------------------------------------------------------------------
QUANTIZE_ROWS, QUANTIZE_BLOCKS = 8, 32  # a program quantizes 8 rows x 32 blocks (512 elements) of each
DEQUANTIZE_BYTES = 1024

if triton is not None:

    @triton.jit
    def _e2m1(q):
        """The e2m1 code of each fp32 q in [-6, 6] (module docstring: nearest, ties to even, sign kept)."""
        a = tl.abs(q)
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
        sign = (q.to(tl.int32, bitcast=True) >> 31) & 1
        return code | (sign << 3)

    @triton.jit
    def _quantize_kernel(x_ptr, g_ptr, codes_ptr, scales_ptr, M, N_BLOCKS, x_stride, SWIZZLED: tl.constexpr,
                         ROWS: tl.constexpr, BLOCKS: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [R, 1] rows
        b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)[None, :]  # [1, NB] 16-element blocks
        mask2 = (r < M) & (b < N_BLOCKS)
        mask = mask2[:, :, None]
        pair = (b * 8)[:, :, None] + tl.arange(0, 8)[None, None, :]  # [1, NB, 8] byte (element pair) index
        x_row = x_ptr + r.to(tl.int64)[:, :, None] * x_stride
        even = tl.load(x_row + 2 * pair, mask=mask, other=0.0).to(tl.float32)  # [R, NB, 8]
        odd = tl.load(x_row + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr)
        amax = tl.maximum(tl.max(tl.abs(even), axis=2), tl.max(tl.abs(odd), axis=2))  # [R, NB]
        denom = 6.0 * g
        scale = tl.where(denom > 0, tl.math.div_rn(amax, tl.where(denom > 0, denom, 1.0)), 0.0)
        scale = tl.minimum(scale, 448.0).to(tl.float8e4nv)
        step = (scale.to(tl.float32) * g)[:, :, None]
        safe = tl.where(step > 0, step, 1.0)
        q_even = tl.where(step > 0, tl.math.div_rn(even, safe), 0.0)
        q_odd = tl.where(step > 0, tl.math.div_rn(odd, safe), 0.0)
        q_even = tl.minimum(tl.maximum(q_even, -6.0), 6.0)
        q_odd = tl.minimum(tl.maximum(q_odd, -6.0), 6.0)
        byte = (_e2m1(q_even) | (_e2m1(q_odd) << 4)).to(tl.uint8)
        tl.store(codes_ptr + r.to(tl.int64)[:, :, None] * (N_BLOCKS * 8) + pair, byte, mask=mask)
        if SWIZZLED:
            col_tiles = (N_BLOCKS + 3) // 4
            offset = (((r // 128) * col_tiles + b // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + b % 4)
        else:
            offset = r * N_BLOCKS + b
        tl.store(scales_ptr + offset.to(tl.int64), scale, mask=mask2)

    @triton.jit
    def _e2m1_value(code):
        e = (code >> 1) & 3
        m = (code & 1).to(tl.float32)
        magnitude = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << tl.maximum(e - 1, 0)).to(tl.float32))
        return tl.where(code >= 8, -magnitude, magnitude)

    @triton.jit
    def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, N, BYTES: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # byte index: elements 2i, 2i + 1
        mask = i < N
        byte = tl.load(codes_ptr + i, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + i // 8, mask=mask, other=0.0).to(tl.float32)  # 8 bytes per 16-block
        lo, hi = _e2m1_value(byte & 15) * scale, _e2m1_value(byte >> 4) * scale
        out = tl.reshape(tl.join(lo, hi), (2 * BYTES,)).to(out_ptr.dtype.element_ty)
        j = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + j, out, mask=j < 2 * N)
