"""Context parallelism on 1, 2 and 4 GPUs of one host: FLUX.1-dev 1024x1024, 28 steps, bf16 and fp8 (issue 10), fp8
with its e4m3 transfers and, for comparison, with bf16 ones (issue 32).

Engines (seeded random FLUX.1-dev weights) for world sizes 1, 2 and 4, transformer-only, plus one whole-pipeline
fp8 engine for 4 ranks (text encoders and VAE on every rank) for an end-to-end time. Two stages, so that the
builds (CPU-bound compiles, run side by side, one GPU each) and the timings fit the device's per-command limit:

    python3 scripts/bench_parallel.py --stage build --workdir .engines/parallel
    python3 scripts/bench_parallel.py --stage time --workdir .engines/parallel --out $OUT/bench_parallel.json

Timing: each world size runs as N ranks through fluxc's launcher (torchrun's elastic agent; NCCL, NVLink
multicast off). Each rank draws the same embeddings and noise, runs the 28-step loop once (CUDA-graph capture),
then 3 timed loops between barriers (CUDA events on every rank; the loop ends with the all-gather of the
latents, so every rank's time covers the whole image). Reported: rank 0's median loop; scaling efficiency =
one-GPU loop / (N x N-GPU loop); the N-rank latents' SQNR against the one-GPU engine's (same inputs). The same
loop with FBCache and TeaCache forced to skip 12 of 28 steps (issue 32): its time, the speedup and what a skipped
step costs on N ranks, the latents' SQNR against the plain loop's. Then on
one GPU, the same weights as the diffusers transformer, eager and torch.compile (per-step x 28), as baselines.
Engines load without re-hashing their 24 GB (verify=False): hashing is a load-time cost, not a loop cost.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

H = W = 1024
STEPS = 28
# name -> (recipe, overrides); "fp8 bf16-wire" is fp8 sending bf16 q, k, v as before e4m3 transfers (same 1-GPU
# engine as fp8, so it is built and timed on several GPUs only)
VARIANTS = {"bf16": ("bf16", ()), "fp8": ("sm90_fp8", ()), "fp8 bf16-wire": ("sm90_fp8", (("ulysses_e4m3", False),))}
BUILD = """import ast, sys
from fluxc.build import BuildOptions, build
recipe, world, overrides, pipeline, path = ast.literal_eval(sys.argv[1])
build(BuildOptions(model="flux1-dev", output=path, recipe=recipe, recipe_overrides=overrides, world_size=world,
                   transformer_only=not pipeline))
"""
WORLD_SIZES = (1, 2, 4)
FORCED = tuple(range(2, 25, 2))  # 12 of 28 steps skipped, as scripts/bench_cache.py forces them


def on_fp8_engine(variant: str, world: int) -> bool:
    """Whether this variant at this world size is fp8's engine: on one GPU nothing is transferred, and the
    transfers are all an override changes."""
    return world == 1 and bool(VARIANTS[variant][1])


def engine_path(workdir: str, variant: str, world: int, pipeline: bool = False) -> str:
    variant = "fp8" if on_fp8_engine(variant, world) else variant
    return os.path.join(workdir, f"{variant.replace(' ', '-')}-ws{world}{'-pipeline' if pipeline else ''}.fluxe")


def builds(worlds=WORLD_SIZES) -> list[tuple[str, int, bool]]:
    return ([(v, n, False) for v in VARIANTS for n in worlds if not on_fp8_engine(v, n)]
            + ([("fp8", 4, True)] if 4 in worlds else []))


def build_all(workdir: str, only: list[tuple[str, int, bool]] | None = None) -> dict:
    """Every engine (or those in `only`) at once, each build on its own GPU (round robin), as `fluxc build`
    subprocesses."""
    os.makedirs(workdir, exist_ok=True)
    gpus = torch.cuda.device_count()
    procs = {}
    for i, (variant, world, pipeline) in enumerate(only or builds()):
        path = engine_path(workdir, variant, world, pipeline)
        if os.path.exists(path):
            continue
        recipe, overrides = VARIANTS[variant]
        cmd = [sys.executable, "-c", BUILD, repr((recipe, world, overrides, pipeline, path))]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i % gpus))
        procs[path] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                       time.perf_counter())
    done = {}
    for path, (proc, t0) in procs.items():
        out, _ = proc.communicate()
        done[os.path.basename(path)] = {"rc": proc.returncode, "seconds": time.perf_counter() - t0,
                                        "tail": out.strip().splitlines()[-3:]}
        print(path, done[os.path.basename(path)], flush=True)
    return done


def engine_and_inputs(path: str):
    """The engine (loaded without re-hashing), prompt embeddings (embeds, pooled) and initial noise at H x W, drawn
    on the CPU from one seed, so every rank has the same values."""
    from fluxc.runtime import Engine

    engine = Engine.load(path, verify=False)
    cfg, profile = engine.config, engine.profile_for(H, W)
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(1, profile.text_tokens, cfg["joint_attention_dim"], generator=g).to(torch.bfloat16),
           torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(torch.bfloat16))
    z = torch.randn(1, profile.image_tokens, cfg["in_channels"], generator=g).to(torch.bfloat16)
    return engine, emb, z


def time_loop(path: str, steps: int, end_to_end: bool):
    """On each rank: the engine's denoising loop, plain and with FBCache and TeaCache forced to skip 12 of 28 steps
    (for a pipeline engine: plain and generate()), timed; rank 0 returns."""
    import torch.distributed as dist

    from fluxc.numerics import sqnr_db
    from fluxc.runtime import parallel
    from fluxc.runtime.core.cache_config import CacheConfig

    engine, emb, z = engine_and_inputs(path)

    def timed(fn, iters=3) -> tuple[list[float], object]:
        out = fn()  # capture / warm-up
        times = []
        for _ in range(iters):
            if dist.is_initialized():
                dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times, out

    torch.cuda.reset_peak_memory_stats()
    loop, latents = timed(lambda: engine.denoise(*emb, height=H, width=W, steps=steps, latents=z))
    rec = {"loop_ms": sorted(loop)[1], "loop_ms_all": loop, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "weights_gb": engine.weight_bytes / 1e9}
    for policy in () if end_to_end else ("fbcache", "teacache"):
        # the forced schedule: every rank skips the same steps (the decision is all-reduced either way); what a
        # skipped step costs on N ranks = (cached loop - the full steps' share of the plain loop) / skipped steps
        report, config = {}, CacheConfig(policy, schedule=FORCED)
        times, cached = timed(lambda: engine.denoise(*emb, height=H, width=W, steps=steps, latents=z,
                                                     cache_config=config, report=report))
        ms = sorted(times)[1]
        rec[f"forced_12_of_28 {policy}"] = {
            "loop_ms": ms, "loop_ms_all": times, "skipped": report["cache"]["skipped_steps"],
            "speedup_vs_no_cache": rec["loop_ms"] / ms,
            "skipped_step_ms": (ms - (steps - len(FORCED)) * rec["loop_ms"] / steps) / len(FORCED),
            "latent_sqnr_db_vs_no_cache": sqnr_db(cached.float(), latents.float())}
    if end_to_end:
        stages = {}
        e2e, _ = timed(lambda: engine.generate("a photo of an astronaut riding a horse on the moon", height=H, width=W,
                                               steps=steps, seed=0, output_type="np", timings=stages))
        rec |= {"end_to_end_ms": sorted(e2e)[1], "end_to_end_ms_all": e2e, "stages_s_last": stages}
    return rec | {"latents": latents.cpu()} if parallel.rank() == 0 else None


def baselines(steps: int) -> dict:
    """diffusers' FluxTransformer2DModel on one GPU, eager and torch.compile: ms per call x steps."""
    from timing import cuda_ms, diffusers_call, free, inputs

    from fluxc.frontend.models import load_model
    from fluxc.runtime.core.families import FAMILIES
    from fluxc.runtime.core.profile import Profile

    model = load_model("flux1-dev", dtype=torch.bfloat16, device=torch.device("cuda"), seed=0).module
    x = inputs(model.config)
    ids = FAMILIES["flux1"].position_ids(Profile(H, W, 512)).cuda()
    out = {}
    with torch.no_grad():
        ms = cuda_ms(diffusers_call(model, x, ids), calls=3)
        out["diffusers eager bf16"] = {"ms_per_step": ms, "loop_ms_estimate": ms * steps}
        compiled = torch.compile(model, fullgraph=True)
        t0 = time.perf_counter()
        call = diffusers_call(compiled, x, ids)
        call()
        compile_s = time.perf_counter() - t0
        ms = cuda_ms(call, calls=3)
        out["torch.compile bf16"] = {"ms_per_step": ms, "loop_ms_estimate": ms * steps, "compile_s": compile_s}
    del model, compiled
    free()
    return out


def _dump(path: str, rec: dict) -> None:
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["build", "time"], required=True)
    ap.add_argument("--workdir", default=".engines/parallel")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--worlds", type=lambda v: tuple(int(w) for w in v.split(",")), default=WORLD_SIZES,
                    help="world sizes to build and time, e.g. 1,2 on a 2-GPU host (the whole-pipeline run needs 4)")
    args = ap.parse_args()
    if args.stage == "build":
        done = build_all(args.workdir, builds(args.worlds))
        if args.out:
            _dump(args.out, done)
        return

    from timing import source_commit

    from fluxc.numerics import sqnr_db
    from fluxc.runtime import parallel

    rec = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "resolution": f"{H}x{W}", "steps": args.steps, "text_tokens": 512,
           "model": "flux1-dev (seeded random weights, seed 0), transformer-only engines",
           "attention": "Ulysses all-to-all over heads (fluxc.ulysses_send/attend/receive), NCCL, NCCL_NVLS_ENABLE=0",
           "commit": source_commit(), "results": {}}
    ones = {}  # variant -> (1-GPU loop ms, latents)
    for variant in VARIANTS:
        res = rec["results"][variant] = {}
        one = ones.get("fp8") if on_fp8_engine(variant, 1) else None
        for world in args.worlds:
            if on_fp8_engine(variant, world):
                continue  # timed as fp8
            r = parallel.launch(world, time_loop, engine_path(args.workdir, variant, world), args.steps, False)
            latents = r.pop("latents")
            one = ones[variant] = one if one is not None else (r["loop_ms"], latents)
            r["scaling_efficiency"] = one[0] / (world * r["loop_ms"])
            r["speedup_vs_1_gpu"] = one[0] / r["loop_ms"]
            r["latent_sqnr_db_vs_1_gpu"] = sqnr_db(latents.float(), one[1].float())
            res[f"{world} gpu"] = r
            print(variant, world, {k: v for k, v in r.items() if not k.endswith("_all")}, flush=True)
            _dump(args.out, rec)  # after each result: a run cut short keeps what it measured
    if 4 in args.worlds:
        r = parallel.launch(4, time_loop, engine_path(args.workdir, "fp8", 4, pipeline=True), args.steps, True)
        r.pop("latents")
        rec["results"]["fp8 pipeline"] = {"4 gpu": r, "published_4xH100_bf16_s": 1.63}
        print("fp8 pipeline 4 gpu", {k: v for k, v in r.items() if not k.endswith("_all")}, flush=True)
        _dump(args.out, rec)
    if not args.no_baselines:
        rec["results"]["baselines (1 gpu)"] = baselines(args.steps)
        _dump(args.out, rec)
    print(f"\n{'engine':14} {'GPUs':>4} {'loop ms':>9} {'speedup':>8} {'efficiency':>10} {'SQNR dB':>8}")
    for variant in VARIANTS:
        for world, r in ((w, rec["results"][variant].get(f"{w} gpu")) for w in args.worlds):
            if r is None:
                continue
            print(f"{variant:14} {world:>4} {r['loop_ms']:>9.1f} {r['speedup_vs_1_gpu']:>8.2f} "
                  f"{r['scaling_efficiency']:>10.2f} {r['latent_sqnr_db_vs_1_gpu']:>8.1f}")
    if 4 in args.worlds:
        e2e = rec["results"]["fp8 pipeline"]["4 gpu"]
        print(f"fp8 whole pipeline on 4 GPUs: {e2e['end_to_end_ms'] / 1000:.2f} s end to end "
              "(published 4xH100 bf16: 1.63 s)")
    for name, b in rec["results"].get("baselines (1 gpu)", {}).items():
        print(f"{name}: {b['ms_per_step']:.1f} ms/step, {b['loop_ms_estimate'] / 1000:.2f} s for {args.steps} steps")


if __name__ == "__main__":
    main()
