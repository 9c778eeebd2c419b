"""What a context-parallel denoising loop spends outside its steps: FLUX.1-dev fp8 engines for 1 and 4 ranks
(built as `gpu_tests.sh parallel-build` builds them), two timed 28-step loops each (CUDA events around the whole
call and around each step), then one loop under torch.profiler's CPU view (host ops by self time).

    python3 scripts/probe_parallel_loop.py --out $OUT     (after parallel-build, on nvidia-h200-x4)
"""

import json
import os
import time

import torch

from bench_parallel import H, W, engine_and_inputs


def split(path: str):
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from fluxc.runtime import parallel

    engine, emb, _ = engine_and_inputs(path)
    engine.denoise(*emb, height=H, width=W, steps=28)  # capture
    res = {"threads": torch.get_num_threads()}
    for trial in range(2):
        if dist.is_initialized():
            dist.barrier()
        torch.cuda.synchronize()
        start, end, step_ms = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
        t0 = time.perf_counter()
        start.record()
        engine.denoise(*emb, height=H, width=W, steps=28, step_ms=step_ms)
        end.record()
        end.synchronize()
        res[f"trial{trial}"] = {"total_ms": start.elapsed_time(end), "wall_ms": (time.perf_counter() - t0) * 1e3,
                                "sum_steps": sum(step_ms), "steps": [round(x, 1) for x in step_ms]}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.denoise(*emb, height=H, width=W, steps=28)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    res["cpu"] = [(e.key[:70], e.count, round(e.self_cpu_time_total / 1e3, 1)) for e in rows]
    return res if parallel.rank() == 0 else None


def main():
    from bench_transformer import probe_out

    from fluxc.runtime import parallel

    out, rec = probe_out(), {}
    for world in (1, 4):
        r = rec[world] = parallel.launch(world, split, f".engines/parallel/fp8-ws{world}.fluxe")
        t = r["trial1"]
        print(f"{world} rank(s), {r['threads']} threads: loop {t['total_ms']:.0f} ms, steps {t['sum_steps']:.0f} ms, "
              f"outside the steps {t['total_ms'] - t['sum_steps']:.0f} ms; host ops {r['cpu'][:6]}", flush=True)
        with open(os.path.join(out, "probe_parallel_loop.json"), "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
