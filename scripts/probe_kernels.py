"""Probe on the GPU: the traced IR of a tiny block in bf16, and the kernel facts the fusion passes rely on.

    cd scripts && python3 probe_kernels.py --out $OUT       (on the lab GPU; measured facts quoted in passes/)
"""

import json
import os

import torch
import torch.nn.functional as F

from bench_transformer import cuda_ms, probe_out
from fluxc import ir
from fluxc.models import load_model
from fluxc.runtime.flux_math import Profile
from fluxc.trace import trace_model


def tflops(flop, ms):
    return flop / ms / 1e9


@torch.no_grad()
def main():
    out = probe_out()
    dev = torch.device("cuda")
    m = load_model("tiny", dtype=torch.bfloat16, device=dev, seed=0)
    for s in trace_model(m, [Profile(64, 48, 7, 1)], dev, torch.bfloat16):
        with open(os.path.join(out, f"ir-{s.kind}.txt"), "w") as f:
            f.write(ir.dump(s.graph, s.name))
    rec = {}
    S, C, N = 4608, 3072, 12288
    x = torch.randn(S, C, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, C, device=dev, dtype=torch.bfloat16) / C**0.5
    b = torch.randn(N, device=dev, dtype=torch.bfloat16)
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    ref = torch.addmm(b, x, w.t()).float()
    rec["addmm_activation_err_vs_tanh"] = (fused.float() - F.gelu(ref, approximate="tanh")).abs().max().item()
    rec["addmm_activation_err_vs_exact"] = (fused.float() - F.gelu(ref)).abs().max().item()
    flop = 2 * S * C * N
    rec["ms_addmm"] = cuda_ms(lambda: torch.addmm(b, x, w.t()))
    rec["ms_addmm_activation_gelu"] = cuda_ms(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    rec["ms_addmm_then_gelu"] = cuda_ms(lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh"))
    rec["tflops_addmm"] = tflops(flop, rec["ms_addmm"])
    # fused QKV+MLP N=21504 vs separate
    wq = torch.randn(3 * C, C, device=dev, dtype=torch.bfloat16) / C**0.5
    bq = torch.randn(3 * C, device=dev, dtype=torch.bfloat16)
    wall, ball = torch.cat([wq, w]), torch.cat([bq, b])
    rec["ms_qkv"] = cuda_ms(lambda: torch.addmm(bq, x, wq.t()))
    rec["ms_qkv_mlp_fused"] = cuda_ms(lambda: torch.addmm(ball, x, wall.t()))
    rec["ms_q_k_v_separate"] = cuda_ms(lambda: [torch.addmm(bq[:C], x, wq[:C].t()) for _ in range(3)])
    # proj_out over cat([attn, mlp]) vs split in two GEMMs accumulating through C
    a = torch.randn(S, C, device=dev, dtype=torch.bfloat16)
    h = torch.randn(S, N, device=dev, dtype=torch.bfloat16)
    wo = torch.randn(C, C + N, device=dev, dtype=torch.bfloat16) / (C + N) ** 0.5
    bo = torch.randn(C, device=dev, dtype=torch.bfloat16)
    woa, wom = wo[:, :C].contiguous(), wo[:, C:].contiguous()
    rec["ms_proj_out_cat"] = cuda_ms(lambda: torch.addmm(bo, torch.cat([a, h], 1), wo.t()))
    cat = torch.cat([a, h], 1)
    rec["ms_proj_out_gemm_only"] = cuda_ms(lambda: torch.addmm(bo, cat, wo.t()))
    rec["ms_proj_out_split"] = cuda_ms(lambda: torch.addmm(torch.addmm(bo, a, woa.t()), h, wom.t()))
    split = torch.addmm(torch.addmm(bo, a, woa.t()), h, wom.t()).float()
    rec["proj_out_split_rel_err"] = ((split - torch.addmm(bo, cat, wo.t()).float()).norm() / split.norm()).item()
    # cuDNN attention on strided q/k/v views of one [S, 3C] buffer
    qkv = torch.randn(1, S, 3, 24, 128, device=dev, dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    cq, ck, cv = (t.contiguous() for t in (q, k, v))
    sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention
    o1 = sdpa(q, k, v, None, False, 0.0, False, False)[0]
    o2 = sdpa(cq, ck, cv, None, False, 0.0, False, False)[0]
    rec["cudnn_strided_max_diff"] = (o1 - o2).abs().max().item()
    rec["cudnn_out_stride"] = list(o1.stride())
    rec["ms_cudnn_strided"] = cuda_ms(lambda: sdpa(q, k, v, None, False, 0.0, False, False))
    rec["ms_cudnn_contig"] = cuda_ms(lambda: sdpa(cq, ck, cv, None, False, 0.0, False, False))
    bshd = torch.randn(1, S, 24, 128, device=dev, dtype=torch.bfloat16).permute(0, 2, 1, 3)
    rec["cudnn_out_stride_bshd_q"] = list(sdpa(bshd, bshd, bshd, None, False, 0.0, False, False)[0].stride())
    step_levers(rec, dev)
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(rec, f, indent=1)
    for k_, v_ in rec.items():
        print(f"{k_:<36} {v_}")


def step_levers(rec, dev):
    """What is left in the bf16 step: attention input layouts, per-step modulation GEMVs against one GEMM
    over every step's rows, and text+image GEMMs as one grouped GEMM."""
    S, T, H, D, C = 4608, 512, 24, 128, 3072
    sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention
    bshd = [torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    bhsd = [t.contiguous() for t in bshd]
    for name, (q, k, v) in (("bshd", bshd), ("bhsd", bhsd)):
        rec[f"ms_cudnn_{name}"] = cuda_ms(lambda: sdpa(q, k, v, None, False, 0.0, False, False), iters=20)
        rec[f"cudnn_out_stride_{name}"] = list(sdpa(q, k, v, None, False, 0.0, False, False)[0].stride())
    mixed = (bshd[0], bshd[1], bhsd[2])  # q, k from fluxc.qk_norm_rope; v as torch's copy of a strided slice
    rec["ms_cudnn_qk_bshd_v_bhsd"] = cuda_ms(lambda: sdpa(*mixed, None, False, 0.0, False, False), iters=20)
    a = torch.randn(S, 4 * C, device=dev, dtype=torch.bfloat16)
    wb = torch.randn(C, 4 * C, device=dev, dtype=torch.bfloat16)
    rec["ms_gemm_k12288"] = cuda_ms(lambda: torch.mm(a, wb.t()), iters=20)
    rec["ms_gemm_k12288_then_cudnn_bshd"] = cuda_ms(lambda: (torch.mm(a, wb.t()), sdpa(*bshd, None, False, 0.0, False, False)), iters=20)
    w = torch.randn(12 * C, C, device=dev, dtype=torch.bfloat16)
    b = torch.randn(12 * C, device=dev, dtype=torch.bfloat16)
    for rows in (1, 32):
        x = torch.randn(rows, C, device=dev, dtype=torch.bfloat16)
        rec[f"ms_modulation_gemm_rows{rows}"] = cuda_ms(lambda: torch.addmm(b, x, w.t()), iters=20)
    if hasattr(torch, "_grouped_mm"):
        x = torch.randn(S, C, device=dev, dtype=torch.bfloat16)
        offs = torch.tensor([T, S], device=dev, dtype=torch.int32)
        for n in (3 * C, 4 * C):
            wg = torch.randn(2, n, C, device=dev, dtype=torch.bfloat16)
            try:
                rec[f"ms_grouped_mm_n{n}"] = cuda_ms(lambda: torch._grouped_mm(x, wg.transpose(1, 2), offs))
            except Exception as e:  # noqa: BLE001 - a probe records what failed
                rec[f"ms_grouped_mm_n{n}"] = repr(e)[:200]
            rec[f"ms_two_mm_n{n}"] = cuda_ms(lambda: (torch.mm(x[:T], wg[0].t()), torch.mm(x[T:], wg[1].t())))
            rec[f"ms_one_mm_n{n}"] = cuda_ms(lambda: torch.mm(x, wg[0].t()))


if __name__ == "__main__":
    main()
