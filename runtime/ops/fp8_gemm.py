"""FP8 GEMMs that own their epilogues (issue 31): one Triton kernel, e4m3 x e4m3 -> fp32 accumulators, whose
epilogue does the work that today follows cuBLAS's `_scaled_mm` as separate passes over the activation.

    fp8_linear_gelu_fp8(a, a_scale, w, w_scale, bias) -> (q [M, N] e4m3, q_scale [M, N / 128] f32)
        The MLP's up-projection: y = a @ w.T + bias, GELU(tanh), then y quantized to e4m3 with one scale per 1x128
        block of each row (amax / 448). Today: `_scaled_mm` writes y in bf16 and fluxc.gelu_fp8 reads it back to
        quantize it per token. A row's amax spans every N tile, so per-token scales cannot be made in the tile
        that computes it; 1x128 blocks are tile-local (BLOCK_N = 128) and finer (DeepSeek's FP8 recipe, cuBLAS's
        Hopper block scaling).
    fp8_linear_gate_residual(a, a_scale, w, w_scale, bias, gate [B, N], residual [B, S, N], a0=None, a0_scale=None,
                             w0=None, w0_scale=None) -> [B, S, N] bf16
        The output projections: residual + gate * (a @ w.T + bias), FLUX's gated residual, in the GEMM's store.
        With a0 (a single block's output projection, whose attention half a0 @ w0.T is added to its MLP half
        a @ w.T): both in one K loop, a0's first, one accumulator, one epilogue.
    fp8_linear(a, a_scale, w, w_scale, bias) -> [M, N] bf16
        No epilogue: `_scaled_mm`'s work on the same kernel, for the GEMMs where it is faster than cuBLAS, which
        differs by GPU (graphed, FLUX.1-dev's widest GEMM, 4608x21504x3072: an H100 0.478 ms against cuBLAS's
        0.560, an H200 0.515 against 0.493): fuse_fp8_epilogues rewrites to it where fluxc.tactics measured it
        faster on the building GPU. Below CUBLAS_BELOW rows of per-token-scaled activations it calls cuBLAS, which
        stays ahead there.

    a: [M, K] e4m3 with per-token scales [M, 1] (today's activations), 1x128 block scales [M, K / 128] (the
    output of fp8_linear_gelu_fp8: the down-projection reads it as it was written) or one scale [1, 1] (the FP8
    attention output on v's scale, which _scaled_mm would need expanded to rows). w: [N, K] e4m3 with per-output-
    channel scales [N, 1] (today's weights, unchanged). K a multiple of 128; N a multiple of 128 for the GELU op.

Numerics: the kernel rounds y to bf16 where the unfused graph does (the GEMM's bf16 output, GELU's bf16 output).
Its e4m3 dots accumulate in the tensor cores' own accumulator across K (Triton's sm_90 default for FP8 dots,
max_num_imprecise_acc 2^30: what cuBLAS does with use_fast_accum, where `_scaled_mm`'s default adds partial sums in
fp32 at intervals; with 1x128 block scales each K block's product is scaled and added in fp32); tests/test_gpu.py
holds the compiled kernel to the fp32 reference within 5e-3 at FLUX's K, up to 15360. Block scales quantize each
row at least as finely as its per-token scale, so a block-quantized activation's SQNR is at least the per-token
one's (tests/test_fp8_gemm.py holds both ops against float64 math at numerics.FP8_LINEAR_SQNR_DB). The gated
residual is computed in fp32 and rounded once, where the bf16 graph rounds gate * y before the add: within
REWRITE_TOLERANCE[bf16].

The reference implementations in plain torch run on the CPU; the CUDA ones launch the Triton kernel.
"""

from typing import NamedTuple

import torch
from torch.library import wrap_triton

from fluxc.runtime.ops.kernels import E4M3_MAX, triton

BLOCK = 128  # the activation scale block along K (and N, for the quantized output)
# fp8_linear leaves GEMMs of fewer rows to cuBLAS: on an H100 it beat every tile config at the 512 text tokens' QKV
# and MLP up-projections (0.033 against 0.035 ms, 0.036 against 0.040: results/2026-12-06-h100-fp8-gemm-dca7e98)
CUBLAS_BELOW = 1024


# ---- reference ------------------------------------------------------------------------------------
def dequantize_activation(a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of an e4m3 activation with per-token [M, 1], 1x128 block [M, K / 128] or one [1, 1] scale."""
    m, k = a.shape
    if a_scale.shape[-1] == 1:
        return a.float() * a_scale
    return (a.float().view(m, k // BLOCK, BLOCK) * a_scale[..., None]).view(m, k)


def quantize_blocks(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y / scale in e4m3, scale [M, N / 128]): one scale per 1x128 block of each row, amax / 448."""
    m, n = y.shape
    blocks = y.float().view(m, n // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1).clamp_min(1e-12) / E4M3_MAX
    return (blocks / scale[..., None]).to(torch.float8_e4m3fn).view(m, n), scale


def fp8_linear_reference(a, a_scale, w, w_scale, bias) -> torch.Tensor:
    """a @ w.T + bias over the dequantized operands in fp32, rounded to bf16 (what `_scaled_mm` returns)."""
    y = dequantize_activation(a, a_scale) @ (w.float() * w_scale).T
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


def gelu_fp8_reference(a, a_scale, w, w_scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.nn.functional.gelu(fp8_linear_reference(a, a_scale, w, w_scale, bias).float(), approximate="tanh")
    return quantize_blocks(y.to(torch.bfloat16))


def gate_residual_reference(a, a_scale, w, w_scale, bias, gate, residual, lead=None) -> torch.Tensor:
    """residual + gate * y, y = a @ w.T + bias (plus a0 @ w0.T with a lead, summed in fp32) rounded to bf16."""
    b, s, n = residual.shape
    y = dequantize_activation(a, a_scale) @ (w.float() * w_scale).T
    if lead is not None:
        a0, a0_scale, w0, w0_scale = lead
        y += dequantize_activation(a0, a0_scale) @ (w0.float() * w0_scale).T
    y = (y if bias is None else y + bias.float()).to(torch.bfloat16).float().view(b, s, n)
    return (residual.float() + gate.float()[:, None, :] * y).to(residual.dtype)


def _check(a, a_scale, w, w_scale, quantized_output: bool) -> None:
    (m, k), n = a.shape, w.shape[0]
    assert a.dtype == w.dtype == torch.float8_e4m3fn and w.shape[1] == k and k % BLOCK == 0, (a.shape, w.shape)
    assert a_scale.shape in ((m, 1), (m, k // BLOCK), (1, 1)) and w_scale.shape == (n, 1), (a_scale.shape,
                                                                                             w_scale.shape)
    assert not quantized_output or n % BLOCK == 0, n


# ---- ops ------------------------------------------------------------------------------------------
# triton_op, not custom_op: Inductor traces into the op, sees the Triton kernel (through wrap_triton) and compiles
# it into the segment with its own kernels, so an engine carries the GEMM's binary and the first generate after
# Engine.load compiles nothing. The same function is the fake (shapes only) and, on the CPU, the reference.
@torch.library.triton_op("fluxc::fp8_linear_gelu_fp8", mutates_args=())
def fp8_linear_gelu_fp8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(a, a_scale, w, w_scale, True)
    if a.device.type != "cuda":
        return gelu_fp8_reference(a, a_scale, w, w_scale, bias)
    m, n = a.shape[0], w.shape[0]
    out, out_scale = a.new_empty(m, n), a.new_empty(m, n // BLOCK, dtype=torch.float32)
    launch(a, a_scale, w, w_scale, bias, out, EPILOGUE_GELU_FP8, out_scale=out_scale)
    return out, out_scale


@torch.library.triton_op("fluxc::fp8_linear", mutates_args=())
def fp8_linear(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    _check(a, a_scale, w, w_scale, False)
    if a.device.type != "cuda":
        return fp8_linear_reference(a, a_scale, w, w_scale, bias)
    if on_cublas(a, a_scale):
        return torch._scaled_mm(a, w.t(), a_scale, w_scale.t(), bias=bias, out_dtype=torch.bfloat16)
    out = a.new_empty(a.shape[0], w.shape[0], dtype=torch.bfloat16)
    launch(a, a_scale, w, w_scale, bias, out, EPILOGUE_BF16)
    return out


@torch.library.triton_op("fluxc::fp8_linear_gate_residual", mutates_args=())
def fp8_linear_gate_residual(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                             bias: torch.Tensor | None, gate: torch.Tensor, residual: torch.Tensor,
                             a0: torch.Tensor | None = None, a0_scale: torch.Tensor | None = None,
                             w0: torch.Tensor | None = None, w0_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check(a, a_scale, w, w_scale, False)
    lead = None
    if a0 is not None:
        _check(a0, a0_scale, w0, w0_scale, False)
        assert a0.shape[0] == a.shape[0] and w0.shape[0] == w.shape[0], (a0.shape, a.shape, w0.shape, w.shape)
        lead = (a0, a0_scale, w0, w0_scale)
    if a.device.type != "cuda":
        return gate_residual_reference(a, a_scale, w, w_scale, bias, gate, residual, lead)
    residual = residual.contiguous()
    out = torch.empty_like(residual)
    launch(a, a_scale, w, w_scale, bias, out, EPILOGUE_GATE_RESIDUAL, gate=gate, residual=residual, lead=lead)
    return out


def on_cublas(a: torch.Tensor, a_scale: torch.Tensor) -> bool:
    """Whether fp8_linear hands this GEMM to cuBLAS: fewer than CUBLAS_BELOW rows, per-token scales."""
    return a.shape[0] < CUBLAS_BELOW and scaling(a, a_scale) == SCALES_ROWS


def scaling(a: torch.Tensor, a_scale: torch.Tensor) -> int:
    """How the activation a [M, K] is scaled: SCALES_ROWS ([M, 1]), SCALES_BLOCKS ([M, K / 128]) or SCALES_TENSOR
    ([1, 1]: the FP8 attention output, v's scale; _scaled_mm needs it expanded to rows, the kernel reads it once)."""
    if tuple(a_scale.shape) == (1, 1) and a.shape[0] != 1:
        return SCALES_TENSOR
    return SCALES_ROWS if a_scale.shape[-1] == 1 else SCALES_BLOCKS


# ---- the kernel -----------------------------------------------------------------------------------
EPILOGUE_BF16, EPILOGUE_GELU_FP8, EPILOGUE_GATE_RESIDUAL = 0, 1, 2
SCALES_ROWS, SCALES_BLOCKS, SCALES_TENSOR = 0, 1, 2  # the kernel's A_SCALES: scaling()


class Config(NamedTuple):
    """A launch of the kernel. BLOCK_K is 128, one activation scale block per step. Hopper: 128x128 tiles of e4m3
    take 32 KB of shared memory a stage. scripts/bench_fp8_gemm.py sweeps these.
    loads: "pointers" (cp.async through registers' addresses; one program a tile) or "tma" (the tensor memory
    accelerator copies each tile from a descriptor; a persistent grid of one program per SM walks the tiles).
    flatten (tma only): one software-pipelined loop over tiles x K blocks, so the next tile's first loads are in
    flight while this tile's epilogue runs (Triton's tl.range(flatten=True)).
    tma_store (tma only; the bf16 and gated-residual epilogues): the output (and the residual) through descriptors,
    in two 128-column halves: staged in shared memory and written asynchronously, not stored from registers.
    warp_specialize (tma only, not with flatten): Triton's Hopper warp specialization (tl.range(warp_specialize=True)
    on the loop over tiles): a producer warp group issues the TMA loads while two consumer warp groups of `warps`
    warps each (4: one warp group) run the wgmma and the epilogue on half the tile, DeepGEMM's and CUTLASS's
    layout; the producer runs ahead into the next tile while the consumers store this one."""
    block_m: int = 128
    block_n: int = 128
    warps: int = 8
    stages: int = 4
    loads: str = "pointers"
    flatten: bool = False
    tma_store: bool = False
    warp_specialize: bool = False


# The tiles per (epilogue, activation scales in 1x128 blocks) at FLUX.1-dev's shapes, measured on an H100 as a graphed
# step runs them: 128x256 TMA tiles, fastest at every large shape without a block-scaled K loop (results/
# 2026-12-06-h100-fp8-gemm-dce3364.json), their loop over tiles flattened and, for a bf16 output, stored through
# descriptors (results/2026-12-06-h100-fp8-gemm-tma-store-0e1ff53.json: a single block's QKV + MLP up-projection
# 0.478 ms against 0.502 unflattened and cuBLAS's 0.560; a double block's MLP up-projection 0.243 against 0.264);
# the gated residual flattened but stored from registers (TMA stores: 0.075 against 0.070 ms at its 4096 x 3072
# x 3072). The GELU epilogue quantizes 128-column blocks; the block-scaled K loop (a dot and a scaled add per K
# block) runs best on 128x128 TMA tiles. choose() narrows the wide tiles where they would leave the GPU idle.
CONFIGS = {(EPILOGUE_BF16, False): Config(128, 256, 8, 3, "tma", flatten=True, tma_store=True),
           (EPILOGUE_GELU_FP8, False): Config(256, 128, 8, 3),
           (EPILOGUE_GATE_RESIDUAL, False): Config(128, 256, 8, 3, "tma", flatten=True),
           (EPILOGUE_GATE_RESIDUAL, True): Config(128, 128, 8, 4, "tma")}
# two GEMMs in one K loop (a lead, fp8_linear_gate_residual's a0): one loop over K blocks a tile, so not flattened
# over tiles (nor warp specialized). Not narrowed by choose(): at a single block's 4608 x 3072 x (3072 + 12288) on an
# H100, 128x256 tiles took 0.347 ms, 128x128 0.384 (4 stages; 3: 0.470), the two chained kernels 0.374
# (results/2026-12-07-h100-fp8-gemm-joined-b199e1e.json): the long K loop amortizes the last wave's idle SMs
JOINED_CONFIG = Config(128, 256, 8, 3, "tma")


def choose(config: Config, m: int, n: int, programs: int) -> Config:
    """config, or its 128x128 tiles (one more stage) where those keep more of the GPU busy: a grid runs in waves of
    `programs` tiles, the last one part-empty, and a few wide tiles waste more of it (a single block's output
    projection, 4608 x 3072: 432 tiles of 128x256 fill 3.3 waves of an H100's 132 SMs, 82% busy; 864 of 128x128,
    94%; measured 0.386 against 0.355 ms). Ties keep the wide tile, which reads each operand half as often."""
    if config.block_n != 256:
        return config
    narrow = config._replace(block_n=128, stages=config.stages + 1)

    def busy(c: Config) -> float:
        tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
        return tiles / (triton.cdiv(tiles, programs) * programs)
    return narrow if busy(narrow) > busy(config) + 0.05 else config


def multiprocessors(device: torch.device) -> int:
    """The persistent grid's size: the GPU's SM count (4 programs under the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch(a, a_scale, w, w_scale, bias, out, epilogue: int, out_scale=None, gate=None, residual=None, lead=None,
           config: Config | None = None, traceable=True) -> None:
    """Run the kernel into `out` (tensors on one device: CUDA, or the CPU under TRITON_INTERPRET=1). Pointers an
    epilogue does not use get a_scale, which the kernel only reads, so that no output aliases another argument.
    lead: (a0, a0_scale, w0, w0_scale), a GEMM of the same M and N whose product is added before the epilogue, in
    the same K loop (TMA loads). traceable=False launches the kernel directly instead of through wrap_triton's
    operator (microbenchmarks: no dispatch between launches). config: CONFIGS' for this epilogue and scaling,
    chosen for the shape (with a lead: JOINED_CONFIG as it is), unless given."""
    (m, k), n = a.shape, w.shape[0]
    scales = scaling(a, a_scale)
    if config is None:
        config = JOINED_CONFIG if lead else choose(CONFIGS.get((epilogue, scales == SCALES_BLOCKS), Config()), m, n,
                                                   multiprocessors(a.device))
    config = Config(*config)
    assert epilogue != EPILOGUE_GELU_FP8 or config.block_n == BLOCK
    assert not lead or (config.loads == "tma" and not config.flatten and not config.warp_specialize), config
    a, a_scale = a.contiguous(), a_scale.contiguous()
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    kernel, extra = _fp8_gemm_kernel, {}
    if config.loads == "tma":
        assert not config.tma_store or epilogue != EPILOGUE_GELU_FP8
        assert not (config.flatten and config.warp_specialize), config
        a0, a0_scale, w0, w0_scale = (t.contiguous() for t in lead) if lead else (a_scale,) * 4
        kernel, extra = _fp8_gemm_tma_kernel, dict(
            a0_ptr=a0, a0_scale_ptr=a0_scale, b0_ptr=w0, b0_scale_ptr=w0_scale, K0=a0.shape[1] if lead else 0,
            A0_SCALES=scaling(a0, a0_scale) if lead else 0, PROGRAMS=min(tiles, multiprocessors(a.device)),
            FLATTEN=config.flatten, TMA_STORE=config.tma_store, WARP_SPECIALIZE=config.warp_specialize,
            JOINED=lead is not None)
        triton.set_allocator(_descriptor_memory)  # (Inductor's launcher sets its own for the segments it runs)
    (wrap_triton(kernel) if traceable else kernel)[(extra.get("PROGRAMS", tiles),)](
        a, a_scale, w, w_scale, a_scale if bias is None else bias, out, a_scale if out_scale is None else out_scale,
        a_scale if gate is None else gate, a_scale if residual is None else residual, m, n, k,
        residual.shape[1] if residual is not None else m, gate.stride(0) if gate is not None else 0,
        A_SCALES=scales, HAS_BIAS=bias is not None, EPILOGUE=epilogue, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=BLOCK, GROUP_M=8, num_warps=config.warps, num_stages=config.stages, **extra)


def _descriptor_memory(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the TMA descriptors a kernel makes on the device (triton.set_allocator's contract)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


if triton is not None:
    import triton.language as tl

    from fluxc.runtime.ops.kernels import gelu_tanh

    @triton.jit
    def _tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of tile number `tile`, in groups of GROUP_M rows of tiles, so that the programs
        running together share w's columns in L2."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        return first_m + (tile % (GROUP_M * tiles_n)) % size_m, (tile % (GROUP_M * tiles_n)) // size_m

    @triton.jit
    def _accumulate(acc, a, b, a_scale_ptr, rm, M, K, kb, A_SCALES: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc + a @ b for K block kb (b: [BLOCK_K, BLOCK_N]); with 1x128 activation blocks, each block is one K
        step, its partial product scaled by the rows' scales as it is added."""
        if A_SCALES == 1:  # SCALES_BLOCKS
            a_scale = tl.load(a_scale_ptr + rm * (K // BLOCK_K) + kb, mask=rm < M, other=0.0)
            return acc + tl.dot(a, b) * a_scale[:, None]
        return tl.dot(a, b, acc)

    @triton.jit
    def _row_scale(rm, a_scale_ptr, M, A_SCALES: tl.constexpr):
        """[BLOCK_M, 1]: what the accumulator's rows are still to be multiplied by, the activation's scale (1 for
        1x128 blocks, which _accumulate applied per K block)."""
        if A_SCALES == 0:  # SCALES_ROWS
            return tl.load(a_scale_ptr + rm, mask=rm < M, other=1.0)[:, None]
        elif A_SCALES == 2:  # SCALES_TENSOR
            return tl.full((rm.shape[0], 1), 1.0, tl.float32) * tl.load(a_scale_ptr)
        return tl.full((rm.shape[0], 1), 1.0, tl.float32)

    @triton.jit
    def _scaled(acc, rm, rn, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, A_SCALES: tl.constexpr,
                HAS_BIAS: tl.constexpr):
        """The fp32 tile (rows rm, columns rn) times its scales, plus the bias, rounded to bf16 as the unfused
        graph's GEMM output is."""
        if A_SCALES != 1:  # (1x128 blocks: _accumulate scaled each K block)
            acc *= _row_scale(rm, a_scale_ptr, M, A_SCALES)
        y = acc * tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        return y.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _epilogue(acc, pm, pn, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, gate_ptr, residual_ptr,
                  M, N, rows_per_batch, gate_stride, A_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                  EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The fp32 tile's scales and bias, then the epilogue's work, stored."""
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        y = _scaled(acc, rm, rn, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, A_SCALES, HAS_BIAS)
        mask = mask_m[:, None] & mask_n[None, :]
        offsets = rm[:, None].to(tl.int64) * N + rn[None, :]
        if EPILOGUE == 1:  # GELU, then e4m3 with one scale per row of this 1x128 tile
            y = gelu_tanh(y).to(tl.bfloat16).to(tl.float32)
            scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1), 1e-12) / 448.0
            tl.store(out_scale_ptr + rm * (N // BLOCK_N) + pn, scale, mask=mask_m)
            tl.store(out_ptr + offsets, (y * (1.0 / scale)[:, None]).to(tl.float8e4nv), mask=mask)
        elif EPILOGUE == 2:  # residual + gate * y, the gate of each row's batch element
            gate = tl.load(gate_ptr + (rm // rows_per_batch)[:, None] * gate_stride + rn[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, (residual + gate * y).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, gate_ptr,
                         residual_ptr, M, N, K, rows_per_batch, gate_stride,
                         A_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pm, pn = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m, mask_n = rm < M, rn < N
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
        b_ptrs = b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # w is [N, K]: K-major, as FP8 wgmma wants
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, K // BLOCK_K):
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            acc = _accumulate(acc, a, b, a_scale_ptr, rm, M, K, kb, A_SCALES, BLOCK_K)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        _epilogue(acc, pm, pn, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, gate_ptr, residual_ptr,
                  M, N, rows_per_batch, gate_stride, A_SCALES, HAS_BIAS, EPILOGUE, BLOCK_M, BLOCK_N)

    @triton.jit
    def _store_half(acc, m0, n0, a_scale_ptr, b_scale_ptr, bias_ptr, out_desc, gate_ptr, residual_desc, M, N,
                    rows_per_batch, gate_stride, A_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                    EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, HALF: tl.constexpr):
        """_epilogue's bf16 and gated-residual work on the [BLOCK_M, HALF] columns from (m0, n0), through the
        descriptors: the residual read (zeros past M, N) and the output written (clipped there) by the TMA unit."""
        rm = m0 + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, HALF)
        y = _scaled(acc, rm, rn, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, A_SCALES, HAS_BIAS)
        if EPILOGUE == 2:
            gate = tl.load(gate_ptr + (rm // rows_per_batch)[:, None] * gate_stride + rn[None, :],
                           mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0).to(tl.float32)
            y = residual_desc.load([m0, n0]).to(tl.float32) + gate * y
        out_desc.store([m0, n0], y.to(out_desc.dtype))

    @triton.jit
    def _fp8_gemm_tma_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, gate_ptr,
                             residual_ptr, M, N, K, rows_per_batch, gate_stride, a0_ptr, a0_scale_ptr, b0_ptr,
                             b0_scale_ptr, K0, A_SCALES: tl.constexpr, A0_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                             EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
                             FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                             JOINED: tl.constexpr):
        # persistent: PROGRAMS programs (one per SM) walk the tiles; the TMA unit copies each operand tile (rows past
        # M or N read as zeros), so the loop has no address arithmetic and no masks. The descriptors are made here
        # (on the device), not by the host: torch traces a kernel's pointers into a segment, not host descriptors.
        # JOINED: a0 @ b0.T + a @ b.T in one accumulator (a single block's output projection, its attention and MLP
        # halves): a0's K loop first, its sum brought to a's and b's scales, then a's K loop.
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        if JOINED:
            a0_desc = tl.make_tensor_descriptor(a0_ptr, shape=[M, K0], strides=[K0, 1], block_shape=[BLOCK_M, BLOCK_K])
            b0_desc = tl.make_tensor_descriptor(b0_ptr, shape=[N, K0], strides=[K0, 1], block_shape=[BLOCK_N, BLOCK_K])
        if TMA_STORE:
            out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1],
                                                 block_shape=[BLOCK_M, BLOCK_N // 2])
            residual_desc = out_desc  # (read only by the gated residual)
            if EPILOGUE == 2:
                residual_desc = tl.make_tensor_descriptor(residual_ptr, shape=[M, N], strides=[N, 1],
                                                          block_shape=[BLOCK_M, BLOCK_N // 2])
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), PROGRAMS,
                             flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
            pm, pn = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if JOINED:
                for kb in range(0, K0 // BLOCK_K):
                    a = a0_desc.load([pm * BLOCK_M, kb * BLOCK_K])
                    b = b0_desc.load([pn * BLOCK_N, kb * BLOCK_K])
                    acc = _accumulate(acc, a, b.T, a0_scale_ptr, rm, M, K0, kb, A0_SCALES, BLOCK_K)
                rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
                b_ratio = (tl.load(b0_scale_ptr + rn, mask=rn < N, other=1.0)
                           / tl.load(b_scale_ptr + rn, mask=rn < N, other=1.0))
                acc *= _row_scale(rm, a0_scale_ptr, M, A0_SCALES) / _row_scale(rm, a_scale_ptr, M, A_SCALES)
                acc *= b_ratio[None, :]
            for kb in range(0, K // BLOCK_K):
                a = a_desc.load([pm * BLOCK_M, kb * BLOCK_K])
                b = b_desc.load([pn * BLOCK_N, kb * BLOCK_K])
                acc = _accumulate(acc, a, b.T, a_scale_ptr, rm, M, K, kb, A_SCALES, BLOCK_K)
            if TMA_STORE:
                lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _store_half(lo, pm * BLOCK_M, pn * BLOCK_N, a_scale_ptr, b_scale_ptr, bias_ptr, out_desc, gate_ptr,
                            residual_desc, M, N, rows_per_batch, gate_stride, A_SCALES, HAS_BIAS, EPILOGUE, BLOCK_M,
                            BLOCK_N // 2)
                _store_half(hi, pm * BLOCK_M, pn * BLOCK_N + BLOCK_N // 2, a_scale_ptr, b_scale_ptr, bias_ptr,
                            out_desc, gate_ptr, residual_desc, M, N, rows_per_batch, gate_stride, A_SCALES,
                            HAS_BIAS, EPILOGUE, BLOCK_M, BLOCK_N // 2)
            else:
                _epilogue(acc, pm, pn, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, gate_ptr,
                          residual_ptr, M, N, rows_per_batch, gate_stride, A_SCALES, HAS_BIAS, EPILOGUE, BLOCK_M,
                          BLOCK_N)
