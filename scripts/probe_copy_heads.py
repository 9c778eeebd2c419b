"""Probe on one GPU: context parallelism's head regrouping around its all-to-alls (runtime/parallel.py), torch's
copy of the permuted views against kernels.copy_heads, at FLUX.1-dev 1024x1024's shapes per rank (batch 1,
24 heads of 128, 4608 tokens split over N ranks, 2 parts per head group). Pack: q, k ([B, S, H, D] from
qk_norm_rope) and v (a slice of the fused QKV output) into the send buffer; unpack: the received outputs into
[B, S, H, D]. Each variant's result is checked equal to the other's. Timed as CUDA graphs, as the engine's loop runs them.

    cd scripts && python3 probe_copy_heads.py --out $OUT       (one H200)
"""

import json
import os

import torch

from bench_transformer import cuda_ms, probe_out
from fluxc.runtime import kernels

B, TOKENS, H, D, CHUNKS = 1, 4608, 24, 128, 2


def buffers(n: int):
    s, hc = TOKENS // n, H // (n * CHUNKS)
    qkv = torch.randn(B, s, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    q, k = (torch.randn(B, s, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    v = qkv[..., 2 * H * D:].unflatten(2, (H, D)).transpose(1, 2)
    send = torch.empty(CHUNKS, n, s, B, 3, hc, D, device="cuda", dtype=torch.bfloat16)
    back = torch.randn(CHUNKS, n, s, B, hc, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(B, s, H, D, device="cuda", dtype=torch.bfloat16)
    return (q, k, v), send, back, out, n, hc


def pack_torch(qkv, send, n, hc):
    for c in range(CHUNKS):
        for i, x in enumerate(qkv):
            send[c, :, :, :, i].copy_(x.unflatten(1, (n, CHUNKS, hc))[:, :, c].permute(1, 3, 0, 2, 4))


def pack_kernel(qkv, send, n, hc):
    heads = [x.transpose(1, 2).unflatten(2, (n, CHUNKS, hc)) for x in qkv]
    for c in range(CHUNKS):
        for i, x in enumerate(heads):
            kernels.copy_heads(send[c, :, :, :, i].permute(2, 1, 0, 3, 4).unsqueeze(3), x[:, :, :, c:c + 1])


def unpack_torch(back, out, n, hc):
    parts = out.view(B, -1, n, CHUNKS, hc, D)
    for c in range(CHUNKS):
        parts[:, :, :, c].copy_(back[c].permute(2, 1, 0, 3, 4))


def unpack_kernel(back, out, n, hc):
    parts = out.view(B, -1, n, CHUNKS, hc, D)
    for c in range(CHUNKS):
        kernels.copy_heads(parts[:, :, :, c:c + 1], back[c].permute(2, 1, 0, 3, 4).unsqueeze(3))


def graphed_us(fn, args, reps: int = 20) -> float:
    """GPU microseconds per fn(*args), from a CUDA graph of `reps` calls (the engine's loop is graphed: launch
    cost on the host does not count)."""
    fn(*args)  # compile / warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    return 1e3 * cuda_ms(graph.replay, iters=20) / reps


@torch.no_grad()
def main():
    out_dir = probe_out()
    rec = {"gpu": torch.cuda.get_device_name(), "shapes": dict(batch=B, tokens=TOKENS, heads=H, head_dim=D,
                                                               parts=CHUNKS)}
    for n in (2, 4):
        qkv, send, back, out, n, hc = buffers(n)
        pack_torch(qkv, send, n, hc)
        want = send.clone()
        send.zero_()
        pack_kernel(qkv, send, n, hc)
        assert torch.equal(send, want), f"pack differs at {n} ranks"
        unpack_torch(back, out, n, hc)
        want = out.clone()
        out.zero_()
        unpack_kernel(back, out, n, hc)
        assert torch.equal(out, want), f"unpack differs at {n} ranks"
        moved = 2 * (send.numel() + out.numel()) * send.element_size()  # bytes read + written, pack and unpack
        row = {f"{what}_{how}_us": graphed_us(fn, args)
               for what, args in (("pack", (qkv, send, n, hc)), ("unpack", (back, out, n, hc)))
               for how, fn in (("torch", globals()[f"{what}_torch"]), ("kernel", globals()[f"{what}_kernel"]))}
        row["TB_per_s_torch"] = moved / (row["pack_torch_us"] + row["unpack_torch_us"]) / 1e6
        row["TB_per_s_kernel"] = moved / (row["pack_kernel_us"] + row["unpack_kernel_us"]) / 1e6
        rec[f"ranks {n}"] = row
        print(n, {k: round(v, 1) for k, v in row.items()})
    with open(os.path.join(out_dir, "probe_copy_heads.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
