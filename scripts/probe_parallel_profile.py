"""Where a context-parallel step's GPU time goes: FLUX.1-dev engines from `gpu_tests.sh parallel-build`, 1, 2 and
4 ranks, 3 eager steps under torch.profiler on rank 0 (kernels by total device time) and the graphed step's ms.

    python3 scripts/probe_parallel_profile.py --out $OUT     (after parallel-build, on nvidia-h200-x4)
"""

import json
import os

import torch

from bench_parallel import H, W, engine_and_inputs


def profile(path: str):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from fluxc.runtime import parallel

    engine, emb, _ = engine_and_inputs(path)
    step_ms = []
    engine.denoise(*emb, height=H, width=W, steps=4)
    engine.denoise(*emb, height=H, width=W, steps=8, step_ms=step_ms)
    engine.denoise(*emb, height=H, width=W, steps=2, cuda_graph=False)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.denoise(*emb, height=H, width=W, steps=3, cuda_graph=False)
        torch.cuda.synchronize()
    if parallel.rank() != 0:
        return None
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:25]
    table = [{"name": e.key[:90], "calls": e.count, "device_ms_per_step": e.device_time_total / 1e3 / 3}
             for e in rows]
    return {"graphed_step_ms": sorted(step_ms)[len(step_ms) // 2], "kernels": table}


def main():
    from bench_transformer import probe_out

    from fluxc.runtime import parallel

    out, rec = probe_out(), {}
    for world in (1, 2, 4):
        for precision in ("fp8", "bf16"):
            r = rec[f"{precision} ws{world}"] = parallel.launch(world, profile, f".engines/parallel/{precision}-ws{world}.fluxe")
            print(f"\n== {precision} {world} rank(s): graphed step {r['graphed_step_ms']:.1f} ms", flush=True)
            for k in r["kernels"][:14]:
                print(f"  {k['device_ms_per_step']:8.2f} ms {k['calls']:6d}  {k['name']}")
            with open(os.path.join(out, "probe_parallel_profile.json"), "w") as f:
                json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
