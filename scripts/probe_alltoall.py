"""All-to-all bandwidth between 2 and 4 ranks of fluxc's launcher (NCCL): the transport context parallelism gets.

    python3 scripts/probe_alltoall.py --out $OUT
"""

import json
import os

import torch


def bandwidth(mb: int = 64) -> dict | None:
    import torch.distributed as dist

    from fluxc.runtime import parallel

    x = torch.randn(mb * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        dist.all_to_all_single(y, x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dist.all_to_all_single(y, x)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / 10
    n = parallel.world_size()
    sent = mb * (n - 1) / n  # MB each rank sends to the others
    out = {"visible": os.environ["CUDA_VISIBLE_DEVICES"], "ms": ms, "sent_mb": sent, "gb_per_s": sent / ms}
    return out if parallel.rank() == 0 else None


def main():
    from bench_transformer import probe_out

    from fluxc.runtime import parallel

    out = probe_out()
    rec = {n: parallel.launch(n, bandwidth) for n in (2, 4)}
    print(rec)
    with open(os.path.join(out, "probe_alltoall.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
