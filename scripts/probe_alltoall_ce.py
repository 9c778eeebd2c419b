"""Whether NCCL's copy-engine all-to-all would free the SMs a context-parallel step computes on: 2 ranks of fluxc's
launcher, a q/k/v-sized all-to-all (42 MB a rank, the 2-rank FLUX.1-dev send buffer) beside a stream of GEMMs
(M = 2304 tokens, a rank's share), on two transports:

    kernels      as fluxc runs today: NCCL's copy kernels on SMs (plain torch buffers)
    copy-engine  a communicator with NCCL_CTA_POLICY_ZERO and both buffers in NCCL symmetric windows
                 (torch's symmetric memory, NCCL backend): NCCL >= 2.28 then moves an all-to-all within one node
                 with the copy engines, no CTAs

Per transport: the all-to-all alone, the GEMMs alone, both at once (all-to-alls on a side stream), and whether a
CUDA-graph-captured all-to-all delivers what it should. Rank 0 reports; an error is recorded, not raised.

    python3 scripts/probe_alltoall_ce.py --out $OUT     (nvidia-h200-x2)
"""

import json
import os

import torch

from bench_transformer import cuda_ms

MB = 42
REPEATS = 20


def measure(transport: str) -> dict:
    import torch.distributed as dist

    n, r = dist.get_world_size(), dist.get_rank()
    numel = MB * 2**20 // 2
    if transport == "copy-engine":
        import torch.distributed._symmetric_memory as symm_mem

        symm_mem.set_backend("NCCL")
        options = dist.ProcessGroupNCCL.Options()
        options.config.cta_policy = dist.ProcessGroupNCCL.NCCL_CTA_POLICY_ZERO
        group = dist.new_group(list(range(n)), pg_options=options)
        dist.all_reduce(torch.ones(1, device="cuda"), group=group)  # the communicator exists before rendezvous
        x, y = (symm_mem.empty(numel, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        for t in (x, y):
            symm_mem.rendezvous(t, group.group_name)
    else:
        group = dist.group.WORLD
        x, y = (torch.empty(numel, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    # chunk j of rank r holds r * n + j; after the all-to-all, chunk j holds j * n + r
    x.copy_((r * n + torch.arange(n, device="cuda")).repeat_interleave(numel // n).to(torch.bfloat16))
    want = (torch.arange(n, device="cuda") * n + r).repeat_interleave(numel // n).to(torch.bfloat16)
    dist.all_to_all_single(y, x, group=group)
    torch.cuda.synchronize()
    rec = {"eager_correct": bool(torch.equal(y, want))}

    a = torch.randn(2304, 3072, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3072, 12288, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def transfer():
        dist.all_to_all_single(y, x, group=group)

    def transfers():
        for _ in range(REPEATS):
            transfer()

    def gemms():
        for _ in range(REPEATS):
            a @ b

    def both() -> tuple[float, float]:
        """(ms to the GEMMs' end, ms to both ends) with the transfers on a side stream."""
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        events[0].record()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            transfers()
        gemms()
        events[1].record()
        torch.cuda.current_stream().wait_stream(side)
        events[2].record()
        events[2].synchronize()
        return events[0].elapsed_time(events[1]), events[0].elapsed_time(events[2])

    both()
    gemm_beside, span = both()
    timed = lambda fn: cuda_ms(fn, warmup=REPEATS, iters=1, calls=REPEATS)  # per call, after as many warm-ups
    rec |= {"transfer_ms": timed(transfer), "gemm_ms": timed(lambda: a @ b),
            "gemm_beside_transfers_ms": gemm_beside / REPEATS, "both_span_ms": span / REPEATS}
    dist.barrier()
    y.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist.all_to_all_single(y, x, group=group)
    graph.replay()
    torch.cuda.synchronize()
    rec["graph_correct"] = bool(torch.equal(y, want))
    rec["graph_transfer_ms"] = timed(graph.replay)
    dist.barrier()
    return rec


def run(transport: str) -> dict | None:
    import torch.distributed as dist

    try:
        rec = measure(transport)
    except Exception as e:  # noqa: BLE001 - the probe records what failed
        rec = {"error": f"{type(e).__name__}: {e}"[:400]}
    return rec if dist.get_rank() == 0 else None


def main():
    from bench_transformer import probe_out

    from fluxc.runtime import parallel

    out = probe_out()
    rec = {"mb_per_rank": MB, "repeats": REPEATS, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
           "commit": os.environ.get("FLUXC_COMMIT")}
    for transport in os.environ.get("PROBE_TRANSPORTS", "kernels,copy-engine").split(","):
        rec[transport] = parallel.launch(2, run, transport)
        print(transport, rec[transport], flush=True)
        with open(os.path.join(out, "probe_alltoall_ce.json"), "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
