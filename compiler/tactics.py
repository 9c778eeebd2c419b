"""Choices made by measurement on the GPU an engine is built on, where the fastest kernel for a shape differs by GPU
(TensorRT calls these tactics): the build times the candidates once per shape and bakes the winner into the graph.

    fp8_linear_ms(m, n, k, bias, device) -> {"triton": ms, "cublas": ms}
        An FP8 GEMM without an epilogue (per-token activation scales, per-channel weight scales, bf16 output) on
        fluxc's Triton kernel (runtime/ops/fp8_gemm.py, its tiles for the shape) and on cuBLAS's `_scaled_mm`.
        They trade places by GPU: on an H100 the Triton kernel led at FLUX.1-dev's widest GEMM, 4608x21504x3072
        (0.478 against 0.560 ms); on an H200, cuBLAS (0.493 against 0.515), in the same build of torch
        (benchmarks/results/2026-12-06-h{1,2}00-fp8-gemm-*.json). passes/fuse_fp8_epilogues.py's "plain" asks.
    attention_fp8_ms(b, s, h, d, device) -> {"cudnn": ms, "flash3": ms}
        fluxc.attention_fp8 on each of its kernels at [B, H, S, D] (FLUX's [B, S, H, D] memory), where both run
        (kernels.flash3_available). passes/quantize_fp8_attention.py asks for the recipe's fp8_attention_kernel
        "auto".

Timings are GPU time as a graphed step runs the kernel (graph_ms), the median of ROUNDS alternating timings. A build
on a CPU measures nothing: the passes keep their rule-based choice. Two builds can choose differently where two
candidates are within noise, and then either is as fast; the manifest's pass_reports record what was measured.
"""

import functools
import statistics

import torch


def cuda_ms(fn, warmup: int = 3, iters: int = 10, calls: int = 1) -> float:
    """Median over `iters` CUDA-event timings of `calls` back-to-back fn() calls, per call, after warm-up.
    calls > 1 times calls as a denoising loop makes them: each launch overlaps the previous call's GPU work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def graph_ms(fn, calls: int = 10, iters: int = 10, warmup: int = 2) -> float:
    """GPU ms per fn() call as a graphed engine step runs it: cuda_ms of replays of one CUDA graph holding `calls`
    back-to-back fn() calls, so no launch gap or host dispatch is timed. Repeating one call keeps its operands warm
    in L2, for every candidate alike."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS picks its kernel) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay, warmup=1, iters=iters) / calls


# each candidate is timed ROUNDS times, the two alternating, and keeps its median: one timing each, first one then
# the other, can let the order decide close calls (the GPU's clocks and temperature move while a build measures, and
# the two are within ~8% at FLUX's shapes: on an H200 at 194af5b a build chose cuBLAS for a single block's QKV,
# 4608x9216x3072, where bench_fp8_gemm, timing cuBLAS first, had the Triton kernel ahead, 0.191 against 0.207 ms)
ROUNDS = 3


@functools.cache
def fp8_linear_ms(m: int, n: int, k: int, bias: bool, device: torch.device) -> dict[str, float]:
    """{"triton": ms, "cublas": ms} of an [M, K] x [N, K]^T e4m3 GEMM with per-token scales and a bf16 output."""
    from fluxc.runtime.ops import fp8_gemm

    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(m, k, generator=g, device=device).to(torch.float8_e4m3fn)
    w = torch.randn(n, k, generator=g, device=device).to(torch.float8_e4m3fn)
    a_scale, w_scale = torch.rand(m, 1, device=device) + 0.5, torch.rand(n, 1, device=device) + 0.5
    b = torch.randn(n, device=device, dtype=torch.bfloat16) if bias else None
    out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
    return _median_ms({"triton": lambda: fp8_gemm.launch(a, a_scale, w, w_scale, b, out, fp8_gemm.EPILOGUE_BF16,
                                                         traceable=False),
                       "cublas": lambda: torch._scaled_mm(a, w.t(), a_scale, w_scale.t(), bias=b,
                                                          out_dtype=torch.bfloat16)})


@functools.cache
def attention_fp8_ms(b: int, s: int, h: int, d: int, device: torch.device) -> dict[str, float]:
    """{"cudnn": ms, "flash3": ms} of fluxc.attention_fp8 on e4m3 q, k, v [B, H, S, D] ([B, S, H, D] memory)."""
    from fluxc.runtime.ops import kernels

    g = torch.Generator(device).manual_seed(0)
    randn = [torch.randn(b, h, s, d, generator=g, device=device) for _ in range(3)]
    q, k, v = (kernels._bshd_like(x, x) for x in randn)  # e4m3 in FLUX's [B, S, H, D] memory
    one = torch.ones(1, 1, 1, 1, device=device)
    return _median_ms({impl: functools.partial(torch.ops.fluxc.attention_fp8, q, k, v, one, one, one, d ** -0.5, impl)
                       for impl in kernels.FP8_ATTENTION_KERNELS})


def _median_ms(candidates: dict) -> dict[str, float]:
    """{name: the median of ROUNDS graph_ms timings of fn} over candidates {name: fn}, timed in turn each round."""
    times = {name: [] for name in candidates}
    for _ in range(ROUNDS):
        for name, fn in candidates.items():
            times[name].append(graph_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}
