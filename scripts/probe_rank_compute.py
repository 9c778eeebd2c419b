"""One rank's share of a context-parallel loop, on ONE GPU: how well the per-rank compute scales, without the
transfers. The fp8 FLUX.1-dev engines for 1, 2 and 4 ranks (built here as `gpu_tests.sh parallel-build` builds
them) run in one process that plays rank 0 of N: runtime/parallel.py's world size reads N, its all-to-alls are
left out (each transfer "done" at once, its buffer as it was: wrong values, the right shapes and kernels), the
cache decision's all-reduce is a no-op and the final all-gather repeats rank 0's tokens. That loop is what
probe_parallel_env.py's no-comm variant times on N GPUs, here on one. With PROBE_COPY set, each world size's loop
also runs with every transfer a local copy of its buffer: real values and the copies' cost. The two differ by
more than the copies (stale buffers seem to make the H200's power-capped GEMMs faster), so the no-transfer loop
is an optimistic bound.

Per world size: the 28-step loop (bench_parallel.py's timing), the ideal share (one-GPU loop / N), and the
kernels of 2 graphed steps under torch.profiler by class, per step, against the one-GPU step's / N (the
schedule's precompute, once per loop, counts half to each of the 2 steps).

    python3 scripts/probe_rank_compute.py --out $OUT     (one H200)
"""

import gc
import json
import os

import torch

from bench_parallel import H, STEPS, W, build_all, engine_and_inputs, engine_path, time_loop
from bench_transformer import kernel_breakdown

WORKDIR = ".engines/parallel"
WORLDS = [int(w) for w in os.environ.get("PROBE_WORLDS", "1,2,4").split(",")]
CLASSES = [  # first match wins; a kernel's name, lower-cased
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_")),
    ("copy_heads", ("copy_heads",)),
    ("fluxc kernels", ("_kernel",)),
    ("inductor", ("triton_",)),
    ("torch elementwise/copy", ("elementwise", "copy", "cat")),
]


def play_rank0_of(n: int, copy: bool = False) -> None:
    """Make runtime/parallel.py behave as rank 0 of n with free transfers (this process only); with copy, each
    transfer is a local copy of its buffer (the values a rank holding every rank's tokens would get)."""
    from fluxc.runtime import parallel

    parallel.world_size = lambda: n
    parallel.rank = lambda: 0
    parallel._start = lambda got, send: (copy and got.copy_(send), parallel._in_flight.append(None))
    parallel.all_reduce = lambda x: None
    parallel.gather = lambda x, dim: torch.cat([x] * n, dim)


def kernel_classes(path: str, steps: int = 2) -> tuple[dict, dict]:
    """(kernel ms and count per step by class, the 30 longest kernels' ms per step by name): bench_transformer's
    kernel_breakdown of one `steps`-step loop (its warm-up call captures the graphs), in finer classes."""
    engine, emb, z = engine_and_inputs(path)
    kernels = kernel_breakdown(lambda: engine.denoise(*emb, height=H, width=W, steps=steps, latents=z), iters=1,
                               top=10**6)["top_kernels"]
    del engine
    ms, calls = {}, {}
    for k in kernels:
        name = k["name"].lower()
        cls = next((c for c, keys in CLASSES if any(key in name for key in keys)), "other")
        ms[cls] = ms.get(cls, 0.0) + k["ms"] / steps
        calls[cls] = calls.get(cls, 0) + k["calls"] / steps
    classes = {c: {"ms_per_step": ms[c], "kernels_per_step": calls[c]} for c in sorted(ms, key=lambda c: -ms[c])}
    return classes, {k["name"][:100]: k["ms"] / steps for k in kernels[:30]}


def main():
    from bench_transformer import probe_out

    out = probe_out()
    rec = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": os.environ.get("FLUXC_COMMIT"),
           "build": build_all(WORKDIR, only=[("fp8", w, False) for w in WORLDS]), "results": {}}
    for world in WORLDS:
        play_rank0_of(world)
        r = time_loop(engine_path(WORKDIR, "fp8", world), STEPS, False)
        r.pop("latents")
        r["kernels"], r["top_kernels_ms_per_step"] = kernel_classes(engine_path(WORKDIR, "fp8", world))
        rec["results"][f"fp8 ws{world}"] = r
        if world > 1 and os.environ.get("PROBE_COPY"):  # the same with each transfer a local copy (real values)
            play_rank0_of(world, copy=True)
            r["loop_ms_with_copies"] = time_loop(engine_path(WORKDIR, "fp8", world), STEPS, False)["loop_ms"]
        gc.collect()  # the engines' captured graphs
        torch.cuda.empty_cache()
        print(world, r["loop_ms"], r.get("loop_ms_with_copies"), flush=True)
        with open(os.path.join(out, "probe_rank_compute.json"), "w") as f:
            json.dump(rec, f, indent=1)
    one = rec["results"].get("fp8 ws1")
    print(f"\n{'ranks':>5} {'loop ms':>9} {'ideal':>8} {'share eff':>9}   per step, ms (x ideal)")
    for world in WORLDS:
        r = rec["results"][f"fp8 ws{world}"]
        ideal = one["loop_ms"] / world if one else float("nan")
        r["ideal_ms"], r["compute_efficiency"] = ideal, ideal / r["loop_ms"]
        parts = []
        for cls, k in r["kernels"].items():
            base = one["kernels"].get(cls, {}).get("ms_per_step") if one else None
            parts.append(f"{cls} {k['ms_per_step']:.2f}" + (f" ({k['ms_per_step'] * world / base:.2f})" if base else ""))
        print(f"{world:>5} {r['loop_ms']:>9.1f} {ideal:>8.1f} {r['compute_efficiency']:>9.3f}   " + ", ".join(parts))
    with open(os.path.join(out, "probe_rank_compute.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
