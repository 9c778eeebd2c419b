"""fluxc's custom ops: the fused kernels the fusion passes rewrite the graph to (`torch.ops.fluxc.*`).

Each op has a reference implementation in plain torch, used on the CPU (so the CPU tests run every
rewrite) and as the spec its GPU kernel is tested against, and a CUDA implementation:

    linear_gelu(x [M, K], weight [N, K], bias [N]) -> gelu_tanh(x @ weight.T + bias)       [M, N]
        CUDA: cuBLASLt's GELU+bias epilogue (torch._addmm_activation), one kernel instead of GEMM + GELU.
    qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps) -> (q, k)           [B, S, H, D]
        Per part: RMSNorm over D with that part's weight; the parts concatenated along S (FLUX's double
        blocks join text and image tokens); then the interleaved-pair rotary embedding with cos/sin
        [S, D] (fp32). CUDA: one Triton kernel launch per part doing q and k, one program per token and
        QK_NORM_ROPE_HEADS of its heads.
    adaln(x [B, S, C], scale [B, C], shift [B, C], eps) -> LayerNorm(x) * (1 + scale) + shift  [B, S, C]
        LayerNorm without affine (FLUX's AdaLN). CUDA: one Triton program per token, the row held in
        registers: x is read once (Inductor's fused kernel loops over a 3072-wide row twice).
    adaln_fp8(x, scale, shift, eps) -> quantize_rows(adaln(x, scale, shift, eps))  ([B, S, C] e4m3, [B, S, 1] f32)
    gelu_fp8(x [M, N]) -> quantize_rows(gelu_tanh(x))                              ([M, N] e4m3, [M, 1] f32)
        An FP8 GEMM's input quantized per token inside the kernel that produces it (quantize_fp8): the
        row's amax / 448 as its scale, the row divided by it and rounded to e4m3. The row is held in
        registers, so the activation is read once and written once, in fp8. (Inductor's GELU + amax +
        cast kernel ran at 170-200 us per 4608x12288 call on the H200, ~5x its memory traffic.)
    qk_norm_rope_fp8(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, q_scale, k_scale) -> (q, k) e4m3
        qk_norm_rope's rows divided by static per-tensor scales [1, 1, 1, 1] and rounded to e4m3, in its kernel.
    attention_fp8(q, k, v [B, H, S, D] e4m3, q_scale, k_scale, v_scale [1, 1, 1, 1], softmax_scale, impl) -> o e4m3
        softmax(q k^T * softmax_scale) v over the dequantized inputs, o stored / (v_scale * ATTENTION_OUT_HEADROOM)
        (|o| <= max |v| exactly; the kernels' e4m3 probabilities can take it a little past). CUDA, by `impl` (the
        recipe's fp8_attention_kernel): "cudnn", cuDNN's FP8 SDPA through the cudnn frontend (per-tensor scales;
        the softmax probabilities are held in e4m3 too, scaled by 448), one built graph per shape; "flash3",
        FlashAttention-3's FP8 forward (sm_90 only; e4m3 probabilities too, scaled by 256), whose bf16 output is
        then cast to e4m3 (one more pass over o).
    qk_norm_rope_into(..., q_out, k_out)   qk_norm_rope written into [B, S, G1, G2, G3, D] views (heads h = (g1, g2, g3)),
        as runtime/parallel.py's send buffer lays them out: no copy between the kernel and the wire.
    copy_heads(dst, src)   dst.copy_(src) for [B, S, G1, G2, G3, D] views with D contiguous in both (a plain function,
        not an op: runtime/parallel.py's head regrouping around its all-to-alls, inside its own ops).
        CUDA: one Triton program per token moving its G1*G2*G3 rows of D in wide vectors (torch's copy of these
        6-d permutations works element by element).

Engines that use these ops need this module imported before their segments load; the runtime does that.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

from fluxc.runtime.core.errors import FluxcError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference implementations serve
    triton = None


# ---- linear + bias + GELU(tanh) ------------------------------------------------------------------
@torch.library.custom_op("fluxc::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu.register_kernel("cuda")
def _linear_gelu_cuda(x, weight, bias):
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)  # cuBLASLt's GELU epilogue is the tanh form


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


# ---- per-head RMSNorm of q and k + rotary embedding -----------------------------------------------
def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last dim."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def norm_rope_reference(parts, weights, cos, sin, eps: float) -> torch.Tensor:
    normed = []
    for x, w in zip(parts, weights):
        xf = x.float()
        normed.append((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype))
    y = torch.cat(normed, dim=1).float()  # [B, S, H, D], rounded as the unfused norm's output is
    out = y * cos[None, :, None, :] + rotate_pairs(y) * sin[None, :, None, :]
    return out.to(parts[0].dtype)


# The Triton-backed ops are triton_ops: Inductor traces into them, sees their kernels (launched through wrap_triton)
# and compiles them into the segment, so an engine carries their binaries and its first generate compiles nothing.
# The same function is the fake (shapes only) and, on the CPU, the reference.
@torch.library.triton_op("fluxc::qk_norm_rope", mutates_args=())
def qk_norm_rope(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_weights: list[torch.Tensor],
                 k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not q_parts[0].is_cuda:
        return (norm_rope_reference(q_parts, q_weights, cos, sin, eps),
                norm_rope_reference(k_parts, k_weights, cos, sin, eps))
    q_out, k_out = _joined_qk(q_parts, q_parts[0].dtype)
    _launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, _heads_view(q_out), _heads_view(k_out))
    return q_out, k_out


def _joined_qk(q_parts, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """New q and k [B, S, H, D] over the parts' tokens joined along S."""
    b, _, h, d = q_parts[0].shape
    s = sum(p.shape[1] for p in q_parts)
    return q_parts[0].new_empty(b, s, h, d, dtype=dtype), q_parts[0].new_empty(b, s, h, d, dtype=dtype)


# warps per program (one token's q and k heads): on an H100 at FLUX.1-dev's shapes, 2 moved 2316 GB/s (single
# blocks), 4 2070, 8 1635 (copy: 2435; benchmarks/results/2026-12-06-h100-activations-0e894bb.json)
QK_NORM_ROPE_WARPS = 2
# heads per program, a power of two (or all of a token's where it has fewer): FLUX's 24 heads over 3 programs a token
# with no padded rows. In the FP8 step on an H100 the kernel took 2.58 ms against 3.95 with a token's 24 heads in one
# 32-row program, bitwise the same output (benchmarks/results/2026-12-07-h100-flux1dev-fp8-qk-8-heads-1844927.json)
QK_NORM_ROPE_HEADS = 8
# what _qk_norm_rope_kernel stores: the rows as they are; e4m3 codes of the rows / static per-tensor scales
# (qk_norm_rope_fp8); or uint8 rows of e4m3 codes and their own fp32 scale's bytes (quantize_heads' layout)
NORM_ROPE_PLAIN, NORM_ROPE_STATIC_E4M3, NORM_ROPE_ROW_E4M3 = 0, 1, 2


def _launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, q_out, k_out, scales=None,
                         mode=NORM_ROPE_PLAIN):
    """The kernel over each part, writing q_out and k_out: [B, S, G1, G2, G3, D] views, heads h = (g1, g2, g3)
    (rows of D + 4 bytes in NORM_ROPE_ROW_E4M3)."""
    b, _, h, d = q_parts[0].shape
    cos, sin = cos.contiguous(), sin.contiguous()
    q_scale, k_scale = scales or (cos, cos)  # unread unless NORM_ROPE_STATIC_E4M3
    assert q_out.stride() == k_out.stride() and q_out.stride(5) == 1
    block_h = min(QK_NORM_ROPE_HEADS, triton.next_power_of_2(h))
    row0 = 0
    for q, k, qw, kw in zip(q_parts, k_parts, q_weights, k_weights):
        q, k = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k))  # rows may be strided (fused QKV)
        s = q.shape[1]
        wrap_triton(_qk_norm_rope_kernel)[(b * s, triton.cdiv(h, block_h))](
            q, k, qw, kw, q_out, k_out, cos, sin, q_scale, k_scale, s, row0, *q.stride()[:3], *k.stride()[:3],
            *q_out.stride()[:5], q_out.shape[3], q_out.shape[4], h, eps, QUANT=mode, D=d, BLOCK_H=block_h,
            num_warps=QK_NORM_ROPE_WARPS)
        row0 += s
    return q_out, k_out


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] as [B, S, H, 1, 1, D]: the kernel's output views for a plain layout."""
    return x.unflatten(2, (x.shape[2], 1, 1))


def qk_norm_rope_into(q_parts, k_parts, q_weights, k_weights, cos, sin, eps: float, q_out: torch.Tensor,
                      k_out: torch.Tensor, e4m3: bool = False) -> None:
    """qk_norm_rope's q and k written into q_out and k_out: [B, S, G1, G2, G3, D] views (heads h = (g1, g2, g3)),
    e.g. straight into runtime/ops/ulysses.py's send buffer; e4m3: uint8 views of rows of D + 4 bytes, each row
    quantized as quantize_heads does. CUDA: the op's kernel with these output strides."""
    if triton is None or not q_out.is_cuda:
        for out, value in zip((q_out, k_out), qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps)):
            value = value.view(*out.shape[:-1], value.shape[-1])
            quantize_heads(out, value) if e4m3 else out.copy_(value)
        return
    _launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, q_out, k_out,
                         mode=NORM_ROPE_ROW_E4M3 if e4m3 else NORM_ROPE_PLAIN)


@torch.library.triton_op("fluxc::qk_norm_rope_fp8", mutates_args=())
def qk_norm_rope_fp8(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_weights: list[torch.Tensor],
                     k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                     q_scale: torch.Tensor, k_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not q_parts[0].is_cuda:
        return tuple((norm_rope_reference(parts, weights, cos, sin, eps).float() / scale).to(torch.float8_e4m3fn)
                     for parts, weights, scale in ((q_parts, q_weights, q_scale), (k_parts, k_weights, k_scale)))
    q_out, k_out = _joined_qk(q_parts, torch.float8_e4m3fn)
    _launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, _heads_view(q_out), _heads_view(k_out),
                         (q_scale, k_scale), NORM_ROPE_STATIC_E4M3)
    return q_out, k_out


# ---- AdaLN: LayerNorm + (1 + scale) * x + shift -------------------------------------------------------
def adaln_reference(x, scale, shift, eps: float) -> torch.Tensor:
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype).float()  # rounded like the unfused norm
    return (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


@torch.library.triton_op("fluxc::adaln", mutates_args=())
def adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    if not x.is_cuda:
        return adaln_reference(x, scale, shift, eps)
    out = torch.empty_like(x)
    _launch_adaln(x, scale, shift, eps, out)
    return out


# warps per program (one token): on an H100, 4 moved 1952 GB/s at 4608x3072, 8 1762 (the same file)
ADALN_WARPS = 4


def _launch_adaln(x, scale, shift, eps, out, row_scale=None):
    x = x.contiguous()
    scale, shift = (t if t.stride(1) == 1 else t.contiguous() for t in (scale, shift))  # [B, C] column slices
    b, s, c = x.shape
    wrap_triton(_adaln_kernel)[(b * s,)](x, scale, shift, out, out if row_scale is None else row_scale, s, c,
                                         scale.stride(0), shift.stride(0), eps, QUANT=row_scale is not None,
                                         BLOCK_C=triton.next_power_of_2(c), num_warps=ADALN_WARPS)


# ---- FP8 per-token quantization inside the producing kernel ------------------------------------------
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: scales map each row's amax onto it, nothing saturates


def quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y / scale in e4m3, scale) with scale = amax over the last dim / 448, as quantize_fp8's aten ops do."""
    scale = y.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (y.float() / scale).to(torch.float8_e4m3fn), scale


def _empty_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(*x.shape[:-1], 1, dtype=torch.float32))


@torch.library.triton_op("fluxc::adaln_fp8", mutates_args=())
def adaln_fp8(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_cuda:
        return quantize_rows(adaln_reference(x, scale, shift, eps))
    out, row_scale = _empty_fp8(x)
    _launch_adaln(x, scale, shift, eps, out, row_scale)
    return out, row_scale


# warps per program (one token), at most: at FLUX's 12288-wide rows, 16 hold a row in 64 registers a thread, so two
# programs, two rows in flight, fit an SM (cuobjdump of the sm_90a cubin, with Triton 3.6 and 3.9; 8 warps: 128, two;
# 32: 38 with Triton 3.6, one)
GELU_FP8_WARPS = 16
# a row as chunks of at most this many elements (a power of two dividing N), so that the mask is one per chunk
GELU_FP8_CHUNK = 4096


@torch.library.triton_op("fluxc::gelu_fp8", mutates_args=())
def gelu_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row held in registers, one program per token: at the GPU's copy bandwidth on an H100 (2443 GB/s against a
    copy's 2435 at 4608x12288; two passes over column blocks, the second from L2, ran at 1650-1950:
    benchmarks/results/2026-12-06-h100-activations-0e894bb.json). Not on an H200: ~2.2 TB/s in the step against
    its ~4.3 TB/s copy (results/2026-12-07-h200-flux1dev-fp8-amax-194af5b.json), with one program an SM (16 warps,
    ~100 registers a thread: a 16384-lane block with a predicate per lane). As whole chunks of the row, masked
    per chunk, with the GELU output held in bf16, an SM holds two."""
    if not x.is_cuda:
        return quantize_rows(F.gelu(x, approximate="tanh"))
    x = x.contiguous()
    out, row_scale = _empty_fp8(x)
    n = x.shape[-1]
    chunks, chunk = gelu_fp8_chunks(n)
    wrap_triton(_gelu_fp8_kernel)[(x.numel() // n,)](x, out, row_scale, n, CHUNKS=chunks, CHUNK=chunk,
                                                     num_warps=min(GELU_FP8_WARPS, max(1, chunks * chunk // 512)))
    return out, row_scale


def gelu_fp8_chunks(n: int) -> tuple[int, int]:
    """_gelu_fp8_kernel's (CHUNKS, CHUNK) for rows of n: the largest power of two dividing n, at most
    GELU_FP8_CHUNK, and enough of them, a power of two, to hold the row (FLUX's 12288: 3 of 4096 in a block of 4)."""
    chunk = min(GELU_FP8_CHUNK, n & -n)
    return triton.next_power_of_2(n // chunk), chunk


# ---- FP8 attention --------------------------------------------------------------------------------
# attention_fp8's output is stored in units of v_scale * 9/8, not v_scale. Exactly, |P @ v| <= max |v| (448 in v's
# units), but the kernels multiply v by e4m3 probabilities, each rounded by up to 2^-4 (and more where subnormal),
# while the softmax divides by the sum of the unrounded ones: a row of P can sum to ~1.08, and the output reach ~484.
# e4m3 ends at 448, and a cast that does not saturate (torch's, before it did: values from 465 became NaN) would
# turn such an output into NaN. With 9/8 the output stays below ~430. e4m3 is floating point, so the 9/8 costs no
# relative precision.
ATTENTION_OUT_HEADROOM = 9 / 8


def attention_fp8_reference(q, k, v, q_scale, k_scale, v_scale, softmax_scale: float) -> torch.Tensor:
    qf, kf, vf = (t.float() * s for t, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    o = torch.softmax(qf @ kf.transpose(-1, -2) * softmax_scale, dim=-1) @ vf
    return _bshd_like(q, (o / (v_scale * ATTENTION_OUT_HEADROOM)).to(torch.float8_e4m3fn))


def _bshd_like(q: torch.Tensor, o: torch.Tensor | None = None) -> torch.Tensor:
    """o (or a new e4m3 tensor) [B, H, S, D] laid out as [B, S, H, D] in memory, like FLUX's heads."""
    b, h, s, d = q.shape
    out = q.new_empty(b, s, h, d, dtype=torch.float8_e4m3fn).permute(0, 2, 1, 3)
    return out if o is None else out.copy_(o)


FP8_ATTENTION_KERNELS = ("cudnn", "flash3")  # attention_fp8's CUDA kernels


@torch.library.custom_op("fluxc::attention_fp8", mutates_args=())
def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                  v_scale: torch.Tensor, softmax_scale: float, impl: str = "cudnn") -> torch.Tensor:
    # impl, not "kernel": Inductor's FallbackKernel.create(kernel, *args, **kwargs) takes that name
    return attention_fp8_reference(q, k, v, q_scale, k_scale, v_scale, softmax_scale)


@attention_fp8.register_fake
def _(q, k, v, q_scale, k_scale, v_scale, softmax_scale, impl="cudnn"):
    return _bshd_like(q)


class _CudnnFp8Attention:
    """cuDNN's FP8 SDPA graph for one (shapes, strides, scale), built on first use (a warm-up run, outside
    CUDA graph capture) and then only executed: on torch's current stream, so it is captured with the step."""

    _cache: dict = {}

    @classmethod
    def get(cls, q, k, v, softmax_scale):
        key = (q.device, *(tuple(t.shape) + t.stride() for t in (q, k, v)), softmax_scale)
        if key not in cls._cache:
            cls._cache[key] = cls(q, k, v, softmax_scale)
        return cls._cache[key]

    def __init__(self, q, k, v, softmax_scale):
        try:
            import cudnn
        except ImportError as e:
            raise FluxcError("This engine runs attention in FP8 through cuDNN's Python frontend, which is not "
                             "installed.", "pip install nvidia-cudnn-frontend, or build with --recipe sm90_fp8.") from e
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        self.handle = cudnn.create_handle()
        self.graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                                   handle=self.handle)
        qt, kt, vt = (self.graph.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                      for n, t in zip("qkv", (q, k, v)))
        one = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        self.scales = [self.graph.tensor(name=n, **one)
                       for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = self.graph.sdpa_fp8(
            q=qt, k=kt, v=vt, descale_q=self.scales[0], descale_k=self.scales[1], descale_v=self.scales[2],
            descale_s=self.scales[3], scale_s=self.scales[4], scale_o=self.scales[5], attn_scale=softmax_scale,
            use_causal_mask=False, generate_stats=False, name="sdpa_fp8")
        like = _bshd_like(q)
        o.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride())).set_data_type(e4m3)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        self.graph.validate()
        self.graph.build_operation_graph()
        self.graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.graph.check_support()
        self.graph.build_plans()
        self.tensors = qt, kt, vt, o, amax_s, amax_o
        self.workspace = torch.empty(self.graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
        self.amaxes = torch.empty(2, 1, 1, 1, 1, device=q.device)
        # P in [0, 1] is held as e4m3 scaled by 448; v stays in v's units (descale 1), the output is stored in
        # units of v's * ATTENTION_OUT_HEADROOM
        self.p_descale, self.p_scale, self.one, self.o_scale = torch.tensor(
            [1 / E4M3_MAX, E4M3_MAX, 1.0, 1 / ATTENTION_OUT_HEADROOM], device=q.device).reshape(4, 1, 1, 1, 1)
        self.cudnn = cudnn

    def pack(self, q, k, v, q_scale, k_scale, out) -> dict:
        """The graph's tensors -> this call's: operands, scales and out. The output is P @ v in v's units over
        ATTENTION_OUT_HEADROOM, which is the reference's (P @ (v * v_scale)) / (v_scale * ATTENTION_OUT_HEADROOM)
        without multiplying by v_scale and dividing by it again: no 1 / v_scale is computed (a reciprocal and a
        product, 2 of the step's kernels per attention)."""
        qt, kt, vt, o, amax_s, amax_o = self.tensors
        pack = {qt: q, kt: k, vt: v, o: out, amax_s: self.amaxes[0], amax_o: self.amaxes[1]}
        values = (q_scale, k_scale, self.one, self.p_descale, self.p_scale, self.o_scale)
        return pack | dict(zip(self.scales, values))

    def __call__(self, q, k, v, q_scale, k_scale):
        out = _bshd_like(q)
        pack = self.pack(q, k, v, q_scale, k_scale, out)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


def flash3_available(device: torch.device) -> bool:
    """Whether attention_fp8's "flash3" kernel can run on device: flash_attn_3 installed, an sm_90 GPU."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and importlib.util.find_spec("flash_attn_interface") is not None)


@functools.cache
def _flash3_v_descale(device: torch.device) -> torch.Tensor:
    """FA3's v descale, 1 / ATTENTION_OUT_HEADROOM, made once a device, on the warm-up call before capture (made in
    a captured step, it would be a fill kernel replayed every step), as _CudnnFp8Attention keeps its constants."""
    return torch.full((1, 1), 1 / ATTENTION_OUT_HEADROOM, device=device)


def _flash3_fp8_attention(q, k, v, q_scale, k_scale, softmax_scale):
    """FlashAttention-3's FP8 forward on FLUX's [B, S, H, D] memory. Its descales are per (batch, head): the
    per-tensor scales broadcast (stride 0), and v's 1 / ATTENTION_OUT_HEADROOM. Its bf16 output is then P @ v in
    v's units over the headroom, as cuDNN's pack makes it, below ~430, and it casts to e4m3 without overflow."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError as e:
        raise FluxcError(f"This engine runs attention in FP8 through FlashAttention-3, which does not import ({e}).",
                         "Install flash-attention's Hopper package (flash_attn_3, built from its hopper/ folder) for "
                         "this torch, or build with fp8_attention_kernel 'cudnn'.") from e
    b, h = q.shape[:2]
    descales = [s.reshape(1, 1).expand(b, h) for s in (q_scale, k_scale, _flash3_v_descale(q.device))]
    o = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=softmax_scale, q_descale=descales[0],
                        k_descale=descales[1], v_descale=descales[2])
    return o.to(torch.float8_e4m3fn).transpose(1, 2)  # [B, S, H, D] memory as [B, H, S, D], like _bshd_like


@attention_fp8.register_kernel("cuda")
def _attention_fp8_cuda(q, k, v, q_scale, k_scale, v_scale, softmax_scale, impl="cudnn"):
    if impl == "flash3":
        return _flash3_fp8_attention(q, k, v, q_scale, k_scale, softmax_scale)
    return _CudnnFp8Attention.get(q, k, v, softmax_scale)(q, k, v, q_scale, k_scale)  # v_scale: see pack


# ---- head regrouping (context parallelism) -----------------------------------------------------------
def copy_heads(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for two [B, S, G1, G2, G3, D] views of the same shape and dtype, D contiguous in both."""
    if triton is None or not dst.is_cuda:
        dst.copy_(src)
        return
    assert dst.shape == src.shape and dst.dtype == src.dtype and src.stride(5) == dst.stride(5) == 1
    _launch_copy_heads(dst, src, quant=False)


def _launch_copy_heads(dst: torch.Tensor, src: torch.Tensor, quant: bool) -> None:
    """One program per token moving its G1 * G2 * G3 rows of D (quant: as quantize_heads' e4m3 rows)."""
    b, s, g1, g2, g3, d = src.shape
    _copy_heads_kernel[(b * s,)](src, dst, s, g2, g3, *src.stride()[:5], *dst.stride()[:5], G=g1 * g2 * g3, D=d,
                                 BLOCK_G=triton.next_power_of_2(g1 * g2 * g3), QUANT=quant, num_warps=4)


ROW_SCALE_BYTES = 4  # an e4m3 row's fp32 scale, stored after its D codes (quantize_heads' rows of D + 4 bytes)


def quantize_heads(dst: torch.Tensor, src: torch.Tensor) -> None:
    """src [B, S, G1, G2, G3, D] (bf16, D contiguous) into dst, a uint8 view of the same shape with rows of D + 4:
    each row's e4m3 codes of src / scale, then the 4 bytes of its fp32 scale = amax / 448 (quantize_rows per row).
    CUDA: one Triton program per token, as copy_heads."""
    d = src.shape[-1]
    assert dst.dtype == torch.uint8 and dst.shape == (*src.shape[:-1], d + ROW_SCALE_BYTES)
    assert dst.stride(5) == src.stride(5) == 1
    if triton is None or not dst.is_cuda:
        codes, scale = quantize_rows(src)
        dst[..., :d].copy_(codes.view(torch.uint8))
        dst[..., d:].copy_(scale.view(torch.uint8))
        return
    _launch_copy_heads(dst, src, quant=True)


def dequantize_heads(x: torch.Tensor) -> torch.Tensor:
    """quantize_heads' rows [..., D + 4] back to bf16 [..., D], contiguous. CUDA (x contiguous): one Triton
    program per 16 rows, reading each byte once (torch's view/float/mul/cast moved ~6x the bytes)."""
    d = x.shape[-1] - ROW_SCALE_BYTES
    if triton is None or not x.is_cuda or not x.is_contiguous():
        scale = x[..., d:].contiguous().view(torch.float32)
        return (x[..., :d].view(torch.float8_e4m3fn).float() * scale).to(torch.bfloat16)
    out = x.new_empty(*x.shape[:-1], d, dtype=torch.bfloat16)
    rows = out.numel() // d
    _dequantize_rows_kernel[(triton.cdiv(rows, 16),)](x, out, rows, D=d, BLOCK_R=16, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _store_fp8_row(y, mask, out_ptrs, row_scale_ptr):
        """Store the fp32 row y (already rounded to the activation dtype) as e4m3 with its scale amax / 448.
        y * (1 / scale) may differ from torch's y / scale in the last fp32 bit, which moves an e4m3 rounding
        only at an exact tie; one reciprocal per row instead of an IEEE division per element."""
        row_scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), 1e-12) / 448.0
        tl.store(row_scale_ptr, row_scale)
        tl.store(out_ptrs, (y * (1.0 / row_scale)).to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _store_e4m3_rows(x, rows, d, mask, D: tl.constexpr):
        """quantize_heads' layout: each row of x [G, D] (fp32) as D e4m3 codes of x / scale at rows + d (uint8
        pointers [G, 1]), then the 4 bytes of its fp32 scale = amax / 448."""
        scale = tl.maximum(tl.max(tl.abs(x), axis=1, keep_dims=True), 1e-12) / 448.0  # [G, 1]
        tl.store(rows + d, (x * (1.0 / scale)).to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
        tl.store((rows + D).to(tl.pointer_type(tl.float32)), scale, mask=mask)

    @triton.jit
    def _dequantize_rows_kernel(x_ptr, out_ptr, R, D: tl.constexpr, BLOCK_R: tl.constexpr):
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None].to(tl.int64)
        d = tl.arange(0, D)[None, :]
        mask = r < R
        rows = x_ptr + r * (D + 4)
        codes = tl.load(rows + d, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        scale = tl.load((rows + D).to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)
        tl.store(out_ptr + r * D + d, (codes * scale).to(tl.bfloat16), mask=mask)

    @triton.jit
    def gelu_tanh(x):
        """0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3): one ex2 and one
        reciprocal (to ~2 fp32 ulp, below bf16 rounding) where libdevice's tanh made the kernel compute-bound."""
        return tl.fdiv(x, 1 + tl.exp2(-2.302208198144325 * (x + 0.044715 * x * x * x)), ieee_rounding=False)

    @triton.jit
    def _adaln_row(x, mask, c, C, eps, scale_ptr, shift_ptr, dtype: tl.constexpr):
        """One token's LayerNorm(x) * (1 + scale) + shift (x: [BLOCK_C] fp32, lanes past C masked), rounded to dtype
        where the unfused graph rounds: the norm's output and the result."""
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
        normed = (xc * rstd).to(dtype).to(tl.float32)
        scale = tl.load(scale_ptr + c, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + c, mask=mask, other=0.0).to(tl.float32)
        return (normed * (1 + scale) + shift).to(dtype)

    @triton.jit
    def _adaln_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, row_scale_ptr, S, C, scale_stride, shift_stride, eps,
                      QUANT: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0)  # one token: [C] in registers
        b = row // S
        c = tl.arange(0, BLOCK_C)
        mask = c < C
        x = tl.load(x_ptr + row * C + c, mask=mask, other=0.0).to(tl.float32)
        y = _adaln_row(x, mask, c, C, eps, scale_ptr + b * scale_stride, shift_ptr + b * shift_stride,
                       x_ptr.dtype.element_ty)
        if QUANT:
            _store_fp8_row(y.to(tl.float32), mask, out_ptr + row * C + c, row_scale_ptr + row)
        else:
            tl.store(out_ptr + row * C + c, y, mask=mask)

    @triton.jit
    def _gelu_fp8_kernel(x_ptr, out_ptr, row_scale_ptr, N, CHUNKS: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token: [N] in registers, as [CHUNKS, CHUNK], N a multiple of CHUNK
        r = tl.arange(0, CHUNKS)[:, None]
        offsets = row * N + r * CHUNK + tl.arange(0, CHUNK)[None, :]
        mask = r < N // CHUNK  # one mask per chunk: one per element kept ~100 registers a thread live at 16 warps
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        y = gelu_tanh(x.to(tl.float32)).to(x_ptr.dtype.element_ty)  # held in bf16 until the store
        # _store_fp8_row's work on the 2-D row, its amax unmasked: the masked chunks loaded 0, and GELU(0) = 0
        row_scale = tl.maximum(tl.max(tl.abs(y)).to(tl.float32), 1e-12) / 448.0
        tl.store(row_scale_ptr + row, row_scale)
        tl.store(out_ptr + offsets, (y.to(tl.float32) * (1.0 / row_scale)).to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _head_offset(h, G2, G3, stride_1, stride_2, stride_3):
        """Where head h = (g1, g2, g3) of a [..., G1, G2, G3, D] view starts."""
        return (h // (G2 * G3)) * stride_1 + ((h // G3) % G2) * stride_2 + (h % G3) * stride_3

    @triton.jit
    def _load_heads(x_ptr, b, s, h0, x_sb, x_ss, x_sh, H, D: tl.constexpr, BLOCK_H: tl.constexpr):
        """Token (b, s)'s heads h0 .. h0 + BLOCK_H of x, [BLOCK_H, D] in fp32 (rows past H: zeros)."""
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        return tl.load(x_ptr + b * x_sb + s * x_ss + h * x_sh + d, mask=h < H, other=0.0).to(tl.float32)

    @triton.jit
    def _norm_rope_row(x, x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr, scale_ptr, b, row, h0, o_sb, o_ss, o_1, o_2, o_3,
                       G2, G3, H, eps, QUANT: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
        """x: _load_heads' heads from h0 of x_ptr's token (b, row), normed, rotated and stored to out_ptr's row."""
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = h < H
        rstd = tl.rsqrt(tl.sum(x * x, axis=1, keep_dims=True) / D + eps)
        w = tl.load(w_ptr + d).to(tl.float32)
        y = (x * rstd * w).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded like the unfused norm output
        y_even, y_odd = tl.split(tl.reshape(y, (BLOCK_H, D // 2, 2)))
        c_even, c_odd = tl.split(tl.reshape(tl.load(cos_ptr + row * D + d), (1, D // 2, 2)))
        s_even, s_odd = tl.split(tl.reshape(tl.load(sin_ptr + row * D + d), (1, D // 2, 2)))
        out = tl.reshape(tl.join(y_even * c_even - y_odd * s_even, y_odd * c_odd + y_even * s_odd), (BLOCK_H, D))
        rows = out_ptr + b * o_sb + row * o_ss + _head_offset(h, G2, G3, o_1, o_2, o_3)
        if QUANT == 2:  # NORM_ROPE_ROW_E4M3: quantize_heads' rows, from the activation-dtype values
            _store_e4m3_rows(out.to(x_ptr.dtype.element_ty).to(tl.float32), rows, d, mask, D)
        else:
            if QUANT == 1:  # NORM_ROPE_STATIC_E4M3: rounded to the activation dtype first, as the reference does
                out = out.to(x_ptr.dtype.element_ty).to(tl.float32) * (1.0 / tl.load(scale_ptr))
            tl.store(rows + d, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, q_scale_ptr, k_scale_ptr,
                             S, row0, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, o_sb, o_ss, o_1, o_2, o_3, G2, G3, H, eps,
                             QUANT: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0)  # one token of this part: BLOCK_H heads of q and of k, both loads in flight at once
        b, s, h0 = pid // S, pid % S, tl.program_id(1) * BLOCK_H
        q = _load_heads(q_ptr, b, s, h0, q_sb, q_ss, q_sh, H, D, BLOCK_H)
        k = _load_heads(k_ptr, b, s, h0, k_sb, k_ss, k_sh, H, D, BLOCK_H)
        _norm_rope_row(q, q_ptr, qw_ptr, qo_ptr, cos_ptr, sin_ptr, q_scale_ptr, b, row0 + s, h0, o_sb, o_ss, o_1,
                       o_2, o_3, G2, G3, H, eps, QUANT, D, BLOCK_H)
        _norm_rope_row(k, k_ptr, kw_ptr, ko_ptr, cos_ptr, sin_ptr, k_scale_ptr, b, row0 + s, h0, o_sb, o_ss, o_1,
                       o_2, o_3, G2, G3, H, eps, QUANT, D, BLOCK_H)

    @triton.jit
    def _copy_heads_kernel(src_ptr, dst_ptr, S, G2, G3, s_b, s_s, s_1, s_2, s_3, d_b, d_s, d_1, d_2, d_3,
                           G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, QUANT: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one token: its [G, D] rows, G = G1 * G2 * G3
        b, s = pid // S, pid % S
        g = tl.arange(0, BLOCK_G)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = g < G
        x = tl.load(src_ptr + b * s_b + s * s_s + _head_offset(g, G2, G3, s_1, s_2, s_3) + d, mask=mask)
        rows = dst_ptr + b * d_b + s * d_s + _head_offset(g, G2, G3, d_1, d_2, d_3)
        if QUANT:  # quantize_heads
            _store_e4m3_rows(x.to(tl.float32), rows, d, mask, D)
        else:
            tl.store(rows + d, x, mask=mask)
