"""Where a 2-rank NCCL run of a tiny engine spends its time (or stops): each rank prints each phase.

    python3 scripts/probe_parallel.py --out $OUT     (on a machine with 2+ GPUs)
"""

import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

SIZE, TEXT = (128, 112), 16


def phases(path: str):
    import torch.distributed as dist

    from conftest import random_embeddings
    from fluxc.runtime import Engine, parallel

    r, t0, times = parallel.rank(), time.perf_counter(), {}

    def mark(what):
        times[what] = round(time.perf_counter() - t0, 3)
        with open(os.path.join(os.environ["PROBE_OUT"], f"rank{r}.log"), "a") as f:
            print(f"[rank {r}] {times[what]:8.3f}s {what}", file=f, flush=True)

    mark(f"joined ({os.environ.get('CUDA_VISIBLE_DEVICES')}, {torch.cuda.device_count()} visible)")
    x = torch.full((2, 4), float(r), device="cuda")
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)
    torch.cuda.synchronize()
    mark(f"eager all_to_all {y[:, 0].tolist()}")
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dist.all_to_all_single(y, x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        dist.all_to_all_single(y, x)
    mark("captured all_to_all")
    g.replay()
    torch.cuda.synchronize()
    mark(f"replayed all_to_all {y[:, 0].tolist()}")
    if path is None:
        return times if r == 0 else None
    engine = Engine.load(path)
    mark("engine loaded")
    pe, pooled = random_embeddings(text=TEXT, dtype=torch.bfloat16)
    kw = dict(height=SIZE[0], width=SIZE[1], steps=4, seed=5)
    eager = engine.denoise(pe, pooled, cuda_graph=False, **kw)
    mark("denoise eager")
    graphed = engine.denoise(pe, pooled, **kw)
    mark("denoise graphed")
    return {"times": times, "eager": eager.cpu(), "graphed": graphed.cpu()} if r == 0 else None


def main():
    from bench_transformer import probe_out

    from fluxc.build import BuildOptions, build
    from fluxc.numerics import sqnr_db
    from fluxc.runtime import Engine, parallel

    out = probe_out()
    os.environ["PROBE_OUT"] = out
    print("collectives only:", parallel.launch(2, phases, None), flush=True)
    paths = {}
    for n in (1, 2):
        paths[n] = os.path.join(out, f"ws{n}.fluxe")
        build(BuildOptions(model="tiny", output=paths[n], precision="bf16", resolutions=(SIZE,), text_tokens=TEXT,
                           world_size=n, transformer_only=True))
    print("built", flush=True)
    rec = parallel.launch(2, phases, paths[2])
    from conftest import random_embeddings

    pe, pooled = random_embeddings(text=TEXT, dtype=torch.bfloat16)
    one = Engine.load(paths[1]).denoise(pe, pooled, height=SIZE[0], width=SIZE[1], steps=4, seed=5).cpu()
    result = {"times": rec["times"], "sqnr_eager_db": sqnr_db(rec["eager"].float(), one.float()),
              "sqnr_graphed_db": sqnr_db(rec["graphed"].float(), one.float())}
    print(result)
    for n in paths.values():
        shutil.rmtree(n)
    with open(os.path.join(out, "probe_parallel.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
