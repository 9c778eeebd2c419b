"""Probe on the GPU: why cuDNN attention runs slower inside a FLUX step than alone.

Two suspects, measured separately (B1 H24 S4608 D128, bf16, cuDNN SDPA):
  layout  the same attention with q/k/v in the layouts a step can hand it (BHSD or BSHD contiguous, v a
          strided slice of the fused QKV output, q/k/v from one [S, 3, H, D] buffer);
  clocks  attention alone vs attention between FLUX-sized GEMMs for ~10 s, with the SM clock and power
          read by nvidia-smi every 100 ms meanwhile.

    python3 scripts/probe_attention_power.py --out $OUT       (on the lab GPU)
"""

import json
import os
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_transformer import cuda_ms, probe_out

B, H, S, D = 1, 24, 4608, 128
FLOP = 4 * B * H * S * S * D


def attention(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def layouts(dev):
    """name -> (q, k, v) as [B, H, S, D] views."""
    bf = dict(device=dev, dtype=torch.bfloat16)
    bhsd = [torch.randn(B, H, S, D, **bf) for _ in range(3)]
    bshd = [torch.randn(B, S, H, D, **bf).transpose(1, 2) for _ in range(3)]
    fused = torch.randn(B, S, 3, H, D, **bf).unbind(2)  # one buffer, three same-strided views
    qkv_rows = torch.randn(B, S, 3 * H * D, **bf)  # fused QKV GEMM output; q/k rewritten by qk_norm_rope
    v_slice = qkv_rows[..., 2 * H * D:].unflatten(-1, (H, D)).transpose(1, 2)
    return {
        "bhsd contiguous": bhsd,
        "bshd contiguous (eager diffusers)": bshd,
        "q,k bshd + v strided slice of QKV (fluxc single block)": [bshd[0], bshd[1], v_slice],
        "q,k,v views of one [S,3,H,D] buffer": [t.transpose(1, 2) for t in fused],
    }


def sample_clocks(path):
    return subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits",
                             "-lms", "100"], stdout=open(path, "w"))


def read_clocks(path):
    rows = [[float(x) for x in line.split(",")] for line in open(path) if line.strip()]
    busy = [r for r in rows if r[1] > 200] or rows  # samples under load
    return {"sm_mhz_median": sorted(r[0] for r in busy)[len(busy) // 2], "sm_mhz_min": min(r[0] for r in busy),
            "power_w_median": sorted(r[1] for r in busy)[len(busy) // 2], "samples": len(rows)}


@torch.no_grad()
def main():
    out = probe_out()
    dev = torch.device("cuda")
    rec = {"layout_us": {}, "sustained": {}}
    for name, (q, k, v) in layouts(dev).items():
        us = cuda_ms(lambda: attention(q, k, v), warmup=5, iters=20) * 1e3
        rec["layout_us"][name] = {"us": us, "tflops": FLOP / us / 1e6}

    q, k, v = layouts(dev)["bshd contiguous (eager diffusers)"]
    x = torch.randn(S, 3072, device=dev, dtype=torch.bfloat16)
    w = torch.randn(12288, 3072, device=dev, dtype=torch.bfloat16)
    gemm = lambda: x @ w.t()
    for name, fn, per_call in (("attention alone", lambda: attention(q, k, v), 1),
                               ("gemm alone", gemm, 1),
                               ("gemm, attention, gemm", lambda: (gemm(), attention(q, k, v), gemm()), 1)):
        path = os.path.join(out, f"clocks-{name.replace(' ', '_').replace(',', '')}.csv")
        proc = sample_clocks(path)
        try:
            ms = cuda_ms(fn, warmup=50, iters=200, calls=50)  # several seconds of load
        finally:
            proc.terminate()
            proc.wait()
        rec["sustained"][name] = {"ms_per_call": ms, **read_clocks(path)}
    s = rec["sustained"]
    rec["attention_in_gemm_sandwich_us"] = (s["gemm, attention, gemm"]["ms_per_call"] - 2 * s["gemm alone"]["ms_per_call"]) * 1e3

    with open(os.path.join(out, "probe_attention_power.json"), "w") as f:
        json.dump(rec, f, indent=1)
    print(f"{'layout':58s} {'us':>7s} {'TFLOP/s':>8s}")
    for name, r in rec["layout_us"].items():
        print(f"{name:58s} {r['us']:7.1f} {r['tflops']:8.1f}")
    print(f"\n{'sustained (50 calls back to back)':30s} {'ms/call':>8s} {'SM MHz':>7s} {'min MHz':>8s} {'W':>5s}")
    for name, r in s.items():
        print(f"{name:30s} {r['ms_per_call']:8.3f} {r['sm_mhz_median']:7.0f} {r['sm_mhz_min']:8.0f} {r['power_w_median']:5.0f}")
    print(f"attention inside the GEMM sandwich: {rec['attention_in_gemm_sandwich_us']:.1f} us")


if __name__ == "__main__":
    main()
