"""The FP8 step's memory-bound kernels (runtime/ops/kernels.py, issue 31) at FLUX.1-dev's shapes, per launch
variant, against the GPU's copy bandwidth.

    python3 scripts/bench_activations.py --out bench_activations.json     (gpu_tests.sh job activations)

    gelu_fp8          GELU(tanh) + per-token e4m3 of the MLP's up-projection output, the row in registers (two
                      passes over column blocks, the second from L2, were timed at 0e894bb and lost: 1650-1950 GB/s):
                      warps per token (16: two programs an SM at 64 registers; 8: two, 128; 32: 38 registers
                      with Triton 3.6, one)
    qk_norm_rope_fp8  q and k of the fused QKV output (strided rows) normed, rotated, e4m3: warps per token
    adaln_fp8         LayerNorm + modulation + per-token e4m3 of the residual stream: warps per token; and a candidate
                      kept here until it is measured, "prefetch xN": N programs an SM, each walking rows with the next
                      row's load in flight while this one is normed and stored (the H200 ran the step's memory-bound
                      kernels at ~2 TB/s against its 4.3 TB/s copy: too few bytes in flight, if latency-bound)
    v_fp8             FP8 attention's v: amax over the tensor, then e4m3 on amax / 448, as Inductor compiles
                      quantize_fp8_attention's aten ops from the fused QKV output (a slice, viewed [B, H, S, D];
                      the double blocks' text and image parts joined), against the amax taken over the slice before
                      its permute (the same elements). Each call reads another of four copies of the QKV output, so
                      that v comes from HBM as in the step, not from the L2 the previous call left it in.
GPU time per call as a graphed step runs it (timing.graph_ms); GB/s counts each kernel's own reads and writes; the
ceiling is a device-to-device copy of 1 GiB, timed the same way. Each variant's output is compared with the
first variant's, bit for bit (warp counts sum a row in other orders: a last-bit difference is expected). "step ms"
weighs each shape by its calls in a FLUX.1-dev step (57 blocks). Writes JSON and prints a table last.
"""

import argparse
import json

import torch
import triton
import triton.language as tl

from fluxc.runtime.ops import kernels
from fluxc.runtime.ops.kernels import _adaln_row, _store_fp8_row
from timing import graph_ms, source_commit

HIDDEN, MLP, HEADS, HEAD_DIM, IMAGE, TEXT = 3072, 12288, 24, 128, 4096, 512
# (shape name, tokens, calls per step): the double blocks' image and text streams, the single blocks' joint one
STREAMS = (("double image", IMAGE, 19), ("double text", TEXT, 19), ("single", IMAGE + TEXT, 38))
WARPS = (2, 4, 8, 16)


def warp_variants(knob: str, op, args, result: list, warps=WARPS) -> dict:
    """{warps: a call of op(*args) into result with kernels.<knob> (the op's warps per program) set to warps}."""
    def variant(w):
        def call():
            setattr(kernels, knob, w)
            result[:] = op(*args)
        return call
    return {str(w): variant(w) for w in warps}


def copy_gbps() -> float:
    src = torch.empty(2 ** 29, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / graph_ms(lambda: dst.copy_(src), calls=5) / 1e6


def gelu_case(tokens: int):
    x = torch.randn(tokens, MLP, device="cuda", dtype=torch.bfloat16) * 2
    result = []
    variants = warp_variants("GELU_FP8_WARPS", torch.ops.fluxc.gelu_fp8, (x,), result, warps=(16, 8, 32))
    return variants, result, x.numel() * 3 + tokens * 4


def qk_case(stream: str, tokens: int):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    width = 3 * HIDDEN + (MLP if stream == "single" else 0)  # the fused QKV (+ MLP up-projection) output
    parts = [(1, tokens)] if stream == "single" else [(1, TEXT), (1, IMAGE)]
    qkv = [torch.randn(*p, width, device="cuda", generator=g, dtype=torch.bfloat16) for p in parts]
    q_parts = [y[..., :HIDDEN].unflatten(-1, (HEADS, HEAD_DIM)) for y in qkv]
    k_parts = [y[..., HIDDEN:2 * HIDDEN].unflatten(-1, (HEADS, HEAD_DIM)) for y in qkv]
    weights = [torch.rand(HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5 for _ in range(2)]
    joint = sum(p[1] for p in parts)
    angles = torch.randn(joint, HEAD_DIM // 2, device="cuda", generator=g).repeat_interleave(2, dim=1)
    scales = [torch.full((1, 1, 1, 1), 0.01, device="cuda") for _ in range(2)]
    args = (q_parts, k_parts, weights[:1] * len(parts), weights[1:] * len(parts), angles.cos(), angles.sin(), 1e-6,
            *scales)
    nbytes = joint * HIDDEN * 2 * (2 + 1) + 2 * joint * HEAD_DIM * 4  # q, k read, written in e4m3; cos, sin
    result = []
    return warp_variants("QK_NORM_ROPE_WARPS", torch.ops.fluxc.qk_norm_rope_fp8, args, result), result, nbytes


@triton.jit
def _adaln_fp8_prefetch_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, row_scale_ptr, R, S, C, scale_stride,
                               shift_stride, eps, BLOCK_C: tl.constexpr):
    """kernels._adaln_kernel's QUANT work on rows pid, pid + P, ... (P programs): each row's x is loaded, as it is
    stored (bf16), while the row before it is normed, modulated, quantized and stored."""
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    first, programs = tl.program_id(0), tl.num_programs(0)
    x_next = tl.load(x_ptr + first * C + c, mask=mask & (first * C + c < R * C), other=0.0)
    for row in range(first, R, programs):
        x = x_next.to(tl.float32)
        following = row + programs
        x_next = tl.load(x_ptr + following * C + c, mask=mask & (following * C + c < R * C), other=0.0)
        b = row // S
        y = _adaln_row(x, mask, c, C, eps, scale_ptr + b * scale_stride, shift_ptr + b * shift_stride,
                       x_ptr.dtype.element_ty)
        _store_fp8_row(y.to(tl.float32), mask, out_ptr + row * C + c, row_scale_ptr + row)


# the candidate's warps: at 8, 118 registers a thread with Triton 3.6 (162 with 3.9), two programs an SM; at 4, 252
PREFETCH_WARPS = 8


def adaln_prefetch_variant(x, scale, shift, result: list, per_sm: int):
    """A call of _adaln_fp8_prefetch_kernel into result, per_sm programs an SM of PREFETCH_WARPS warps."""
    b, s, c = x.shape
    programs = min(b * s, per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count)

    def call():
        out, row_scale = torch.empty_like(x, dtype=torch.float8_e4m3fn), x.new_empty(b, s, 1, dtype=torch.float32)
        _adaln_fp8_prefetch_kernel[(programs,)](x, scale, shift, out, row_scale, b * s, s, c, scale.stride(0),
                                               shift.stride(0), 1e-6, BLOCK_C=triton.next_power_of_2(c),
                                               num_warps=PREFETCH_WARPS)
        result[:] = out, row_scale
    return call


def adaln_case(tokens: int):
    x = torch.randn(1, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    mod = torch.randn(1, 6 * HIDDEN, device="cuda", dtype=torch.bfloat16)
    scale, shift = mod[:, HIDDEN:2 * HIDDEN], mod[:, 4 * HIDDEN:5 * HIDDEN]
    result = []
    variants = warp_variants("ADALN_WARPS", torch.ops.fluxc.adaln_fp8, (x, scale, shift, 1e-6), result)
    variants |= {f"prefetch x{n}": adaln_prefetch_variant(x, scale, shift, result, n) for n in (1, 2)}
    return variants, result, tokens * HIDDEN * 3 + tokens * 4


def v_case(stream: str, tokens: int):
    width = 3 * HIDDEN + (MLP if stream == "single" else 0)
    parts = [TEXT, IMAGE] if stream == "double" else [tokens]
    copies = [[torch.randn(1, p, width, device="cuda", dtype=torch.bfloat16) for p in parts] for _ in range(4)]

    def quantize(qkv, permuted_amax: bool):
        v = [y[..., 2 * HIDDEN:3 * HIDDEN] for y in qkv]  # [B, S, H * D]
        v = torch.cat(v, dim=1) if len(v) > 1 else v[0]  # (a cat of one tensor would be a copy in the graph)
        v4 = v.unflatten(-1, (HEADS, HEAD_DIM)).permute(0, 2, 1, 3)
        amax = (v4 if permuted_amax else v).abs().amax((0, 1, 2, 3) if permuted_amax else (0, 1, 2), True).float()
        scale = amax.clamp_min(1e-12).view(1, 1, 1, 1) / kernels.E4M3_MAX
        return (v4 / scale).to(torch.float8_e4m3fn), scale

    result = []

    def variant(permuted_amax: bool):
        fn, turn = torch.compile(lambda qkv: quantize(qkv, permuted_amax), fullgraph=True), [0]

        def call():
            turn[0] += 1
            result[:] = fn(copies[turn[0] % len(copies)])
        return call
    joint = sum(parts)
    return ({"inductor": variant(True), "amax unpermuted": variant(False)}, result,
            joint * HIDDEN * (2 * 2 + 1))  # v read twice (amax, quantize), written in e4m3


def measure(kernel: str, stream: str, calls: int, case) -> dict:
    variants, outputs, nbytes = case
    row = {"kernel": kernel, "stream": stream, "calls_per_step": calls, "gb": nbytes / 1e9, "variants": {}}
    reference = None
    for name, fn in variants.items():
        fn()
        torch.cuda.synchronize()
        got = [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in outputs]
        got = [t.clone() for t in got]
        same = reference is None or all(torch.equal(a, b) for a, b in zip(got, reference))
        reference = reference or got
        ms = graph_ms(fn)
        row["variants"][name] = {"ms": ms, "gbps": nbytes / ms / 1e6, "bitwise_equal_to_default": same}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    defaults = (kernels.QK_NORM_ROPE_WARPS, kernels.ADALN_WARPS, kernels.GELU_FP8_WARPS)
    r = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
         "triton": __import__("triton").__version__, "copy_gbps": copy_gbps(),
         "default_warps": {"qk_norm_rope_fp8": defaults[0], "adaln_fp8": defaults[1], "gelu_fp8": defaults[2]},
         "rows": []}
    for stream, tokens, calls in STREAMS:
        r["rows"].append(measure("gelu_fp8", stream, calls, gelu_case(tokens)))
        r["rows"].append(measure("adaln_fp8", stream, calls, adaln_case(tokens)))
        if stream != "double text":  # the double blocks' text and image parts are one op call
            r["rows"].append(measure("qk_norm_rope_fp8", stream, calls, qk_case(stream, tokens)))
            r["rows"].append(measure("v_fp8", stream, calls, v_case(stream.split()[0], tokens)))
        with open(args.out, "w") as fh:
            json.dump(r, fh, indent=1)
    kernels.QK_NORM_ROPE_WARPS, kernels.ADALN_WARPS, kernels.GELU_FP8_WARPS = defaults
    print(f"\nMemory-bound FP8 kernels on {r['gpu']} (commit {r['commit']}); copy {r['copy_gbps']:.0f} GB/s")
    print(f"{'kernel':<18}{'stream':<14}{'variant':<12}{'ms':>8}{'GB/s':>7}{'step ms':>9}  equal")
    for x in r["rows"]:
        for name, v in x["variants"].items():
            print(f"{x['kernel']:<18}{x['stream']:<14}{name:<12}{v['ms']:>8.4f}{v['gbps']:>7.0f}"
                  f"{v['ms'] * x['calls_per_step']:>9.3f}  {v['bitwise_equal_to_default']}")
    for kernel in ("gelu_fp8", "adaln_fp8", "qk_norm_rope_fp8", "v_fp8"):
        rows = [x for x in r["rows"] if x["kernel"] == kernel]
        for name in rows[0]["variants"]:
            print(f"{kernel} {name}: {sum(x['variants'][name]['ms'] * x['calls_per_step'] for x in rows):.3f} ms/step")


if __name__ == "__main__":
    main()
