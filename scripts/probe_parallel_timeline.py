"""Where a context-parallel step's transfers sit against its kernels: the fp8 FLUX.1-dev engine on 2 ranks
(built here as `gpu_tests.sh parallel-build` builds it), 4 graphed steps under torch.profiler on rank 0. Writes
rank 0's Chrome trace and, from it, per step: GPU busy time, NCCL kernel time, and how much of the NCCL time
no compute kernel runs beside (exposed).

    python3 scripts/probe_parallel_timeline.py --out $OUT     (on nvidia-h200-x2 or x4)
"""

import gzip
import json
import os

from bench_parallel import H, W, build_all, engine_and_inputs, engine_path

WORKDIR = ".engines/parallel"
STEPS = 4


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals) -> float:
    return sum(end - start for start, end in intervals)


def _intersection(a, b) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarize(trace: dict) -> dict:
    """Kernel intervals (us) from a Chrome trace: NCCL's, the others', and their overlap."""
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    nccl = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()])
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()])
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    hidden = _length(_intersection(nccl, compute))
    return {"steps": STEPS, "span_ms": span / 1e3, "busy_ms": _length(_union(nccl + compute)) / 1e3,
            "compute_ms": _length(compute) / 1e3, "nccl_ms": _length(nccl) / 1e3,
            "nccl_exposed_ms": (_length(nccl) - hidden) / 1e3, "nccl_kernels": sum("nccl" in e["name"].lower()
                                                                                   for e in kernels)}


def timeline(path: str, out: str):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fluxc.runtime import parallel

    engine, emb, z = engine_and_inputs(path)
    engine.denoise(*emb, height=H, width=W, steps=STEPS, latents=z)  # capture
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.denoise(*emb, height=H, width=W, steps=STEPS, latents=z)
        torch.cuda.synchronize()
    if parallel.rank() != 0:
        return None
    name = os.path.join(out, "timeline_rank0.json")
    prof.export_chrome_trace(name)
    with open(name) as f:
        trace = json.load(f)
    with gzip.open(name + ".gz", "wt") as f:  # what comes back from the device is size-limited
        json.dump(trace, f)
    os.remove(name)
    return summarize(trace)


def main():
    from bench_transformer import probe_out

    from fluxc.runtime import parallel

    out = probe_out()
    rec = {"build": build_all(WORKDIR, only=[("fp8", 2, False)])}
    rec["fp8 ws2"] = parallel.launch(2, timeline, engine_path(WORKDIR, "fp8", 2), out)
    print(rec["fp8 ws2"])
    with open(os.path.join(out, "probe_parallel_timeline.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
