"""What every benchmark shares, per the benchmark protocol (benchmarks/README.md): the FLUX.1-dev 1024x1024 workload (4096 image + 512
text tokens, batch 1) and its step-0 inputs, CUDA-event timing of back-to-back calls, peak memory per phase, the
kernel breakdown under torch.profiler, and the commit measured.
"""

import gc
import os
import subprocess

import torch

from fluxc.runtime.core.profile import Profile
from fluxc.tactics import cuda_ms, graph_ms  # noqa: F401 (the benchmarks' timers are the build's)

H = W = 1024
TEXT = 512


def source_commit() -> str:
    """The commit measured: $FLUXC_COMMIT (the lab GPU gets a copy of the tree without its history), else git."""
    return os.environ.get("FLUXC_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                            capture_output=True, text=True).stdout.strip()


def kernel_category(name: str) -> str:
    """GEMM, attention or other, from a CUDA kernel's name (cuBLAS/cuBLASLt/CUTLASS, fluxc's Triton FP8 GEMMs,
    cuDNN/flash SDPA)."""
    n = name.lower()
    if n.startswith("_fp8_gemm"):  # runtime/ops/fp8_gemm.py: a GEMM with its epilogue
        return "gemm"
    if n.startswith("triton") or n.startswith("_"):  # Inductor's and fluxc's Triton kernels: fused elementwise work
        return "other"
    if any(s in n for s in ("sdpa", "fmha", "flash_fwd", "attention")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
        return "gemm"
    return "other"


def kernel_breakdown(fn, iters: int = 3, top: int = 20) -> dict:
    """torch.profiler over `iters` calls of fn: GPU kernel ms per call by category, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0),
                     key=lambda e: e.time_range.start)
    for e in kernels:
        t = by_name.setdefault(e.name, [0.0, 0])
        t[0] += e.device_time / 1000 / iters  # us -> ms per call
        t[1] += 1 / iters
    # idle GPU time between kernels (the calls run back to back), charged to the kernel that ends the wait
    idle_before: dict[str, float] = {}
    busy_until = kernels[0].time_range.start if kernels else 0
    for e in kernels:
        if e.time_range.start > busy_until:
            idle_before[e.name] = idle_before.get(e.name, 0.0) + (e.time_range.start - busy_until) / 1000 / iters
        busy_until = max(busy_until, e.time_range.end)
    cats = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, (ms, _) in by_name.items():
        cats[kernel_category(name)] += ms
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {**{f"{c}_ms": round(v, 3) for c, v in cats.items()}, "kernel_ms": round(sum(cats.values()), 3),
            "top_kernels": [{"name": n[:160], "category": kernel_category(n), "ms": round(ms, 3), "calls": round(c, 1)}
                            for n, (ms, c) in ranked[:top]],
            "top_other": [{"name": n[:160], "ms": round(ms, 3), "calls": round(c, 1)}
                          for n, (ms, c) in ranked if kernel_category(n) == "other"][:top],
            "idle_ms": round(sum(idle_before.values()), 3),
            "top_idle_before": [{"name": n[:160], "ms": round(ms, 3)}
                                for n, ms in sorted(idle_before.items(), key=lambda kv: -kv[1])[:10]]}


def inputs(cfg, seed=123):
    """Transformer inputs as FluxPipeline passes them at step 0 (bf16 activations, f32 guidance)."""
    g = torch.Generator("cuda").manual_seed(seed)
    p = Profile(H, W, TEXT)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return {
        "hidden_states": torch.randn(1, p.image_tokens, cfg["in_channels"], **bf),
        "encoder_hidden_states": torch.randn(1, TEXT, cfg["joint_attention_dim"], **bf),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], **bf),
        "timestep": torch.full((1,), 0.75, device="cuda", dtype=torch.bfloat16),
        "guidance": torch.full((1,), 3.5, device="cuda"),
    }


def diffusers_call(model, x, ids):
    txt_ids, img_ids = ids[:TEXT], ids[TEXT:]
    return lambda: model(hidden_states=x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                         pooled_projections=x["pooled_projections"], timestep=x["timestep"], guidance=x["guidance"],
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def phase_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / 2**30


def free():
    gc.collect()
    torch.cuda.empty_cache()
