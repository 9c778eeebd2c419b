"""Probe on the GPU: per-token FP8 quantization kernels for the MLP's GELU output (4608 x 12288 bf16).

    cd scripts && python3 probe_fp8_quant.py --out $OUT
Times fluxc.gelu_fp8, Inductor's kernel for the same aten ops, and looped two-pass Triton variants
(the row re-read from L2 in the second pass) over (rows per program, chunk, warps); prints GB/s.
"""

import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench_transformer import cuda_ms, probe_out
from fluxc.runtime import kernels


_gelu = kernels.gelu_tanh


@triton.jit
def _gelu_fp8_looped(x_ptr, out_ptr, scale_ptr, M, N, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    rmask = rows < M
    amax = tl.zeros((ROWS, CHUNK), tl.float32)
    for start in range(0, N, CHUNK):
        n = start + tl.arange(0, CHUNK)[None, :]
        m = rmask & (n < N)
        x = tl.load(x_ptr + rows * N + n, mask=m, other=0.0).to(tl.float32)
        y = _gelu(x).to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, axis=1, keep_dims=True), 1e-12) / 448.0
    tl.store(scale_ptr + rows, scale, mask=rmask)
    for start in range(0, N, CHUNK):
        n = start + tl.arange(0, CHUNK)[None, :]
        m = rmask & (n < N)
        x = tl.load(x_ptr + rows * N + n, mask=m, other=0.0).to(tl.float32)
        y = _gelu(x).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + rows * N + n, (y * (1.0 / scale)).to(tl.float8e4nv), mask=m)


@triton.jit
def _gelu_fp8_persistent(x_ptr, out_ptr, scale_ptr, M, N, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    n = tl.arange(0, BLOCK)
    mask = n < N
    for row in tl.range(tl.program_id(0), M, tl.num_programs(0), num_stages=STAGES):
        offs = row.to(tl.int64) * N + n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _gelu(x).to(x_ptr.dtype.element_ty).to(tl.float32)
        kernels._store_fp8_row(y, mask, out_ptr + offs, scale_ptr + row)


def persistent(x, programs, warps, stages):
    m, n = x.shape
    out, scale = kernels._empty_fp8(x)
    _gelu_fp8_persistent[(programs,)](x, out, scale, m, n, BLOCK=triton.next_power_of_2(n), STAGES=stages,
                                      num_warps=warps)
    return out, scale


def looped(x, rows, chunk, warps):
    m, n = x.shape
    out = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    scale = x.new_empty(m, 1, dtype=torch.float32)
    _gelu_fp8_looped[(triton.cdiv(m, rows),)](x, out, scale, m, n, ROWS=rows, CHUNK=chunk, num_warps=warps)
    return out, scale


def aten_ops(x):
    y = F.gelu(x, approximate="tanh")
    scale = y.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448.0
    return (y / scale).to(torch.float8_e4m3fn), scale


@torch.no_grad()
def main():
    out = probe_out()
    x = torch.randn(4608, 12288, device="cuda", dtype=torch.bfloat16) * 2
    want = kernels.quantize_rows(F.gelu(x, approximate="tanh"))
    nbytes = x.numel() * 3  # bf16 in, e4m3 out
    rec = {}

    def time(name, fn):
        q, s = fn()
        same = (q.float() == want[0].float()).float().mean().item()
        ms = cuda_ms(fn, warmup=5, iters=10, calls=20)
        rec[name] = {"us": ms * 1e3, "GB/s": nbytes / ms / 1e6, "codes_equal": same}
        print(f"{name:32s} {ms * 1e3:8.1f} us {nbytes / ms / 1e6:8.0f} GB/s  equal {same:.4f}", flush=True)

    time("fluxc.gelu_fp8 (row in registers)", lambda: torch.ops.fluxc.gelu_fp8(x))
    for warps in (4, 8, 32):
        def in_registers(warps=warps):
            out, scale = kernels._empty_fp8(x)
            kernels._gelu_fp8_kernel[(x.shape[0],)](x, out, scale, x.shape[1], BLOCK=16384, num_warps=warps)
            return out, scale
        time(f"row in registers w={warps}", in_registers)
    a = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16) * 3
    mod = torch.randn(1, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    for name, fn in [("adaln", lambda: torch.ops.fluxc.adaln(a[None], mod[:, :3072], mod[:, 3072:], 1e-6)),
                     ("adaln_fp8", lambda: torch.ops.fluxc.adaln_fp8(a[None], mod[:, :3072], mod[:, 3072:], 1e-6))]:
        ms = cuda_ms(fn, warmup=5, iters=10, calls=20)
        rec[name] = {"us": ms * 1e3}
        print(f"{name:32s} {ms * 1e3:8.1f} us", flush=True)
    compiled = torch.compile(aten_ops)
    time("inductor aten ops", lambda: compiled(x))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per_sm, warps, stages in [(1, 8, 1), (1, 8, 2), (1, 8, 3), (1, 16, 2), (2, 8, 2), (2, 4, 2), (4, 4, 2)]:
        time(f"persistent {per_sm}/SM w={warps} stages={stages}", lambda: persistent(x, per_sm * sms, warps, stages))
    for rows, chunk, warps in [(1, 2048, 8)]:
        time(f"looped rows={rows} chunk={chunk} w={warps}", lambda: looped(x, rows, chunk, warps))
    with open(os.path.join(out, "probe_fp8_quant.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
