"""NVFP4 format: fluxc's packer against a spec-level reference written here from the format's definition
(DESIGN.md: e2m1 values two per byte low nibble first, e4m3 scale per 16 elements, fp32 global scale), with
numpy float32 arithmetic and exhaustive nearest-value search instead of fluxc's threshold encoding and
torch's e4m3 cast; the swizzled scale layout against cuBLAS's index formula; the Triton kernels compiled for
sm_100a / sm_120a (no GPU needed) and, on a GPU, bit-equal to the reference."""

import numpy as np
import pytest
import torch

from fluxc.runtime.ops import nvfp4


# ---- the spec, independently -------------------------------------------------------------------------
def spec_e4m3(byte: int) -> float:
    s, e, m = byte >> 7, (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return float("nan")
    v = m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def spec_e2m1(nibble: int) -> float:
    s, e, m = nibble >> 3, (nibble >> 1) & 3, nibble & 1
    v = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -v if s else v


def nearest_code(value: np.float32, codes: list[int], decode, even_bit: int) -> int:
    """The code whose value is nearest `value`; on a tie, the one whose lowest mantissa bit is 0."""
    best = min(abs(decode(c) - float(value)) for c in codes)
    tied = [c for c in codes if abs(decode(c) - float(value)) == best]
    return tied[0] if len(tied) == 1 else next(c for c in tied if not c & even_bit)


E4M3_FINITE = [b for b in range(127)]  # non-negative, 0x7f is NaN
E2M1_POSITIVE = list(range(8))


def spec_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes [R, K/2], scale bytes [R, K/16]) of float32 x, step by step as DESIGN.md defines it."""
    f32 = np.float32
    g = f32(np.abs(x).max()) / f32(2688)
    rows, k = x.shape
    packed = np.zeros((rows, k // 2), np.uint8)
    scales = np.zeros((rows, k // 16), np.uint8)
    for r in range(rows):
        for b in range(k // 16):
            block = x[r, b * 16:(b + 1) * 16]
            ideal = f32(np.abs(block).max()) / (f32(6) * g) if g > 0 else f32(0)
            sbyte = nearest_code(min(ideal, f32(448)), E4M3_FINITE, spec_e4m3, 1)
            scales[r, b] = sbyte
            step = f32(spec_e4m3(sbyte)) * g
            for i, v in enumerate(block):
                q = f32(v) / step if step > 0 else f32(0)
                q = min(max(q, f32(-6)), f32(6))
                code = nearest_code(abs(q), E2M1_POSITIVE, spec_e2m1, 1) | (8 if np.signbit(q) else 0)
                j = b * 16 + i
                packed[r, j // 2] |= code << (4 * (j % 2))
    return packed, scales


def spec_decode(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    rows, half = packed.shape
    out = np.zeros((rows, half * 2), np.float64)
    for r in range(rows):
        for j in range(half * 2):
            nibble = (int(packed[r, j // 2]) >> (4 * (j % 2))) & 15
            out[r, j] = spec_e2m1(nibble) * spec_e4m3(int(scales[r, j // 16]))
    return out


def edge_case_tensor() -> torch.Tensor:
    """Blocks that hit each rounding tie, zeros, saturation, subnormal and zero scales. The tensor's amax is
    2688, so the global scale is 1 and a block with amax 6 has scale 1: its values are the e2m1 inputs."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    rows = [
        ties + [-t for t in ties],  # every tie, both signs (scale 1)
        [0.0, -0.0, 0.1, -0.1, 0.3, 5.9, 4.5, 1.0] * 2,  # signed zeros, values rounding to zero, in-between
        [6.36, -6.36, 3.0, 1.0] * 4,  # scale 6.36 / 6 = 1.06 rounds down to 1.0: 6.36 saturates at 6
        [6 * 2.0 ** -8, 2.0 ** -8, -(2.0 ** -9)] + [0.0] * 13,  # subnormal e4m3 scale (2^-8)
        [1e-4, -1e-4] + [0.0] * 14,  # scale below e4m3's smallest subnormal: 0, the block encodes as zeros
        [2688.0, -1000.0, 448.0, 100.0] * 4,  # the tensor's amax: scale 448
    ]
    return torch.tensor(rows, dtype=torch.float32)


CASES = {
    "edge cases": edge_case_tensor,
    "randn": lambda: torch.randn(37, 96, generator=torch.Generator().manual_seed(0)),
    "wide range": lambda: (torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
                           * torch.logspace(-6, 3, 9)[:, None]),
    "bf16 rows": lambda: torch.randn(5, 48, generator=torch.Generator().manual_seed(2)).bfloat16().float(),
}


@pytest.mark.parametrize("case", CASES)
def test_pack_matches_spec_bit_exactly(case):
    x = CASES[case]()
    codes, scales, g = nvfp4.quantize_weight(x)
    want_codes, want_scales = spec_quantize(x.numpy())
    assert float(g) == np.float32(np.abs(x.numpy()).max()) / np.float32(2688)
    np.testing.assert_array_equal(scales.view(torch.uint8).numpy(), want_scales)
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    decoded = nvfp4.dequantize(codes, scales).double().numpy()
    np.testing.assert_array_equal(decoded, spec_decode(codes.numpy(), scales.view(torch.uint8).numpy()))


def test_edge_cases_decode_to_the_spec_values():
    """Spot values the rounding rules fix, decoded by the spec decoder (scale 1 rows)."""
    x = edge_case_tensor()
    codes, scales, _ = nvfp4.quantize_weight(x)
    got = spec_decode(codes.numpy(), scales.view(torch.uint8).numpy())
    assert list(got[0, :8]) == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]  # ties to the even code
    assert list(got[0, 8:]) == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0]
    assert int(codes[1, 0]) & 0xF0 == 0x80  # -0.0 keeps its sign
    assert got[2, 0] == 6.0 and got[2, 1] == -6.0  # saturated
    assert spec_e4m3(int(scales.view(torch.uint8)[3, 0])) == 2.0 ** -8  # a subnormal scale
    assert int(scales.view(torch.uint8)[4, 0]) == 0 and not codes[4].any()
    assert got[5, 0] == 2688.0


def test_all_zero_tensor_and_non_finite_weights():
    codes, scales, g = nvfp4.quantize_weight(torch.zeros(2, 32))
    assert float(g) == 0 and not codes.any() and not scales.view(torch.uint8).any()
    for bad in (float("nan"), float("inf")):
        w = torch.ones(2, 32)
        w[1, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            nvfp4.quantize_weight(w)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize_weight(torch.ones(2, 24))


@pytest.mark.parametrize("shape", [(37, 6), (128, 4), (300, 9)])
def test_swizzle_matches_cublas_layout(shape):
    r, c = shape
    scales = torch.randint(1, 120, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(r))
    got = nvfp4.swizzle_scales(scales.view(torch.float8_e4m3fn)).view(torch.uint8)
    col_tiles = -(-c // 4)
    want = torch.zeros(-(-r // 128) * 128 * col_tiles * 4, dtype=torch.uint8)
    for i in range(r):
        for j in range(c):
            want[((i // 128) * col_tiles + j // 4) * 512 + (i % 32) * 16 + ((i // 32) % 4) * 4 + j % 4] = scales[i, j]
    assert torch.equal(got, want)


def test_linear_reference_matches_float64():
    """nvfp4_linear's reference (the emulated numerics) against float64 math on the spec-decoded operands."""
    g = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(12, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    wc, ws, wg = nvfp4.quantize_weight(w)
    y = torch.ops.fluxc.nvfp4_linear(x, wc, ws, wg, bias)
    xc, xs = spec_quantize(x.numpy())
    xg = np.abs(x.numpy()).max() / np.float32(2688)
    want = (spec_decode(xc, xs) * float(xg)) @ (spec_decode(wc.numpy(), ws.view(torch.uint8).numpy()) * float(wg)).T
    np.testing.assert_allclose(y.double().numpy(), want + bias.double().numpy(), rtol=1e-5, atol=1e-5)


# ---- Triton: compiled for Blackwell here, run on the lab GPU ----------------------------------------------
def _kernels():
    """(kernel, signature, constexprs) for every fluxc Triton kernel."""
    from fluxc.runtime.ops import kernels

    return [
        (nvfp4._quantize_kernel, {"x_ptr": "*bf16", "g_ptr": "*fp32", "codes_ptr": "*u8", "scales_ptr": "*fp8e4nv",
                                  "M": "i32", "N_BLOCKS": "i32", "x_stride": "i32", "SWIZZLED": "constexpr",
                                  "ROWS": "constexpr", "BLOCKS": "constexpr"},
         {"SWIZZLED": True, "ROWS": nvfp4.QUANTIZE_ROWS, "BLOCKS": nvfp4.QUANTIZE_BLOCKS}),
        (nvfp4._dequantize_kernel, {"codes_ptr": "*u8", "scales_ptr": "*fp8e4nv", "out_ptr": "*bf16", "N": "i32",
                                    "BYTES": "constexpr"}, {"BYTES": nvfp4.DEQUANTIZE_BYTES}),
        (kernels._adaln_kernel, {"x_ptr": "*bf16", "scale_ptr": "*bf16", "shift_ptr": "*bf16", "out_ptr": "*fp8e4nv",
                                 "row_scale_ptr": "*fp32", "S": "i32", "C": "i32", "scale_stride": "i32",
                                 "shift_stride": "i32", "eps": "fp32", "QUANT": "constexpr", "BLOCK_C": "constexpr"},
         {"QUANT": True, "BLOCK_C": 4096}),
        (kernels._gelu_fp8_kernel, {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "row_scale_ptr": "*fp32", "N": "i32",
                                    "CHUNKS": "constexpr", "CHUNK": "constexpr"},
         dict(zip(("CHUNKS", "CHUNK"), kernels.gelu_fp8_chunks(12288)))),
        (kernels._qk_norm_rope_kernel,
         {**{p: "*bf16" for p in ("q_ptr", "k_ptr", "qw_ptr", "kw_ptr")}, "qo_ptr": "*fp8e4nv", "ko_ptr": "*fp8e4nv",
          "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32",
          **{p: "i32" for p in ("S", "row0", "q_sb", "q_ss", "q_sh", "k_sb", "k_ss", "k_sh", "o_sb", "o_ss", "o_1",
                                "o_2", "o_3", "G2", "G3", "H")},
          "eps": "fp32", "QUANT": "constexpr", "D": "constexpr", "BLOCK_H": "constexpr"},
         {"QUANT": kernels.NORM_ROPE_STATIC_E4M3, "D": 128, "BLOCK_H": kernels.QK_NORM_ROPE_HEADS}),
        (kernels._copy_heads_kernel,
         {"src_ptr": "*bf16", "dst_ptr": "*bf16", **{p: "i32" for p in ("S", "G2", "G3", "s_b", "s_s", "s_1", "s_2",
                                                                       "s_3", "d_b", "d_s", "d_1", "d_2", "d_3")},
          "G": "constexpr", "D": "constexpr", "BLOCK_G": "constexpr", "QUANT": "constexpr"},
         {"G": 24, "D": 128, "BLOCK_G": 32, "QUANT": False}),
    ]


@pytest.mark.parametrize("arch", [100, 120])
def test_triton_kernels_compile_for_blackwell(arch):
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, signature, constexprs in _kernels():
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
        assert f".target sm_{arch}a" in compiled.asm["ptx"], fn.__name__
        assert len(compiled.asm["cubin"]) > 1000, fn.__name__


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("swizzled", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_triton_quantize_is_bit_equal_to_reference(case, swizzled, static):
    """static: on a given (calibrated) global scale, a third of x's own, so that large blocks saturate."""
    x = CASES[case]().bfloat16()  # the kernel reads bf16 activations
    g = nvfp4.global_scale(x) / 3 if static else None
    want = [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
            for t in torch.ops.fluxc.nvfp4_quantize(x, swizzled, g)]
    got = [t.cpu().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.cpu()
           for t in torch.ops.fluxc.nvfp4_quantize(x.cuda(), swizzled, None if g is None else g.cuda())]
    for name, a, b in zip(("codes", "scales", "global"), got, want):
        assert torch.equal(a, b), name
    big = torch.randn(4608, 3072, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    ref = torch.ops.fluxc.nvfp4_quantize(big.cpu(), swizzled)
    for a, b in zip(torch.ops.fluxc.nvfp4_quantize(big, swizzled), ref):
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
def test_triton_dequantize_matches_reference():
    w = torch.randn(300, 4096, generator=torch.Generator().manual_seed(5))
    codes, scales, _ = nvfp4.quantize_weight(w)
    want = nvfp4.dequantize(codes, scales, torch.bfloat16)
    got = torch.ops.fluxc.nvfp4_dequantize(codes.cuda(), scales.cuda(), torch.bfloat16).cpu()
    assert torch.equal(got, want)
