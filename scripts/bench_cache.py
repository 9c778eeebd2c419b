"""Cache points on one GPU: what a skipped step costs, and what a forced skip schedule buys.

FLUX.1-dev random weights, 1024x1024, 28 steps, transformer-only engines per recipe. Random weights make
natural skip rates meaningless (issue 7), so the mechanism is measured with forced schedules:
  no cache          the plain loop: one CUDA graph per step, no host sync
  <policy> thr 0    the cached loop deciding every step and skipping none: its cost over the plain loop is
                    the cut and the branch (one graph whose branches are conditional nodes), per step
  <policy> 12/28    --cache-schedule skipping 12 of 28 steps (every other step from 2 to 24): speedup vs no cache
  <policy> 27/28    every step but the first skipped: (loop - one full step) / 27 is a skipped step's cost
and the pieces alone (CUDA-graph replays, back to back): head+decision, the rest of the stack, the reuse.
branch_ms_per_step: a threshold-0 loop step minus its head and rest captured as graphs of their own and replayed
back to back: what branching costs (the conditional nodes, or the flag's host round trip where the step reads it
on the host: `branched` false) plus the step's input copies.
Checks first: threshold 0 must equal the no-cache latents bit for bit; the 12/28 latents' SQNR against
no cache is reported (quality is a real-checkpoint question).

    python3 scripts/bench_cache.py --recipes bf16,sm90_fp8 --out $OUT/bench_cache.json     (on the lab GPU)
"""

import argparse
import json
import os
import shutil
import tempfile

import torch
from timing import cuda_ms, free, source_commit

from fluxc.build import BuildOptions, build
from fluxc.numerics import sqnr_db
from fluxc.recipes import RECIPES
from fluxc.runtime import Engine
from fluxc.runtime.core.cache_config import CacheConfig
from fluxc.runtime.loop import capture

H = W = 1024
STEPS = 28
FORCED = tuple(range(2, 25, 2))  # 12 of 28 steps


def loop_ms(engine, emb, z, config) -> tuple[float, torch.Tensor, dict]:
    """Median ms of the whole 28-step loop (3 timings after a warm-up), its latents and its cache report."""
    report = {}
    run = lambda: engine.denoise(*emb, height=H, width=W, steps=STEPS, latents=z, cache_config=config, report=report)
    latents = run()
    return cuda_ms(run, warmup=1, iters=3), latents, report.get("cache", {})


def measure(recipe: str, workdir: str) -> dict:
    path = os.path.join(workdir, f"{recipe}.fluxe")
    build(BuildOptions(model="flux1-dev", output=path, precision=RECIPES[recipe]().precision.value, recipe=recipe,
                       transformer_only=True))
    engine = Engine.load(path)
    profile = engine.profile_for(H, W)
    g = torch.Generator("cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    emb = (torch.randn(1, 512, engine.config["joint_attention_dim"], **bf),
           torch.randn(1, engine.config["pooled_projection_dim"], **bf))
    z = torch.randn(1, profile.image_tokens, engine.config["in_channels"], **bf)

    rec = {}
    plain_ms, plain, _ = loop_ms(engine, emb, z, CacheConfig())
    rec["no cache"] = {"loop_ms": plain_ms, "ms_per_step": plain_ms / STEPS}
    for policy in ("fbcache", "teacache"):
        zero_ms, zero, zero_report = loop_ms(engine, emb, z, CacheConfig(policy, 0.0))
        forced_ms, forced, forced_report = loop_ms(engine, emb, z, CacheConfig(policy, schedule=FORCED))
        all_ms, _, all_report = loop_ms(engine, emb, z, CacheConfig(policy, schedule=tuple(range(1, STEPS))))
        step = engine._graphs[engine.graph_key(profile, CacheConfig(policy, schedule=FORCED))]
        head, rest, reuse = (cuda_ms(gr.replay, warmup=2, iters=5, calls=10) for gr in capture(step.pieces))
        full_step = zero_ms / STEPS
        skipped_step = (all_ms - full_step) / (STEPS - 1)
        rec[policy] = {
            "threshold_0": {"loop_ms": zero_ms, "ms_per_step": full_step, "skipped": zero_report["skipped_steps"],
                            "equals_no_cache": bool(torch.equal(zero, plain)),
                            "overhead_ms_per_step_vs_no_cache": (zero_ms - plain_ms) / STEPS,
                            "branched": step.branched, "branch_ms_per_step": full_step - head - rest},
            "forced_12_of_28": {"loop_ms": forced_ms, "skipped": forced_report["skipped_steps"],
                                "speedup_vs_no_cache": plain_ms / forced_ms,
                                "latent_sqnr_db_vs_no_cache": sqnr_db(forced.float(), plain.float())},
            "forced_27_of_28": {"loop_ms": all_ms, "skipped": len(all_report["skipped_steps"]),
                                "skipped_step_ms": skipped_step, "skipped_step_fraction_of_full": skipped_step / full_step},
            "pieces_ms": {"head_and_decision": head, "rest_and_tail": rest, "reuse_and_tail": reuse,
                          "skipped_step_from_pieces_fraction": (head + reuse) / (head + rest)},
        }
    rec["weights_gb"] = engine.weight_bytes / 1e9
    del engine, step
    free()
    shutil.rmtree(path)
    return rec


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default="bf16,sm90_fp8")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    rec = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "resolution": f"{H}x{W}", "steps": STEPS,
           "model": "flux1-dev (seeded random weights, seed 0)", "commit": source_commit(),
           "forced_schedule": list(FORCED), "results": {}}
    for recipe in args.recipes.split(","):
        rec["results"][recipe] = measure(recipe, args.workdir)
        with open(args.out, "w") as f:  # after each recipe: a later one running out of time keeps this one
            json.dump(rec, f, indent=1)

    print(f"\n{rec['gpu']}, torch {rec['torch']}, FLUX.1-dev random weights, {H}x{W}, {STEPS} steps, commit {rec['commit']}")
    print(f"{'recipe':<10}{'policy':<10}{'no cache ms/step':>17}{'thr0 ms/step':>13}{'overhead':>9}{'branch':>10}"
          f"{'= no cache':>11}{'12/28 x':>8}{'skip/full':>10}{'pieces':>8}{'SQNR dB':>8}")
    for recipe, r in rec["results"].items():
        for policy in ("fbcache", "teacache"):
            p = r[policy]
            print(f"{recipe:<10}{policy:<10}{r['no cache']['ms_per_step']:>17.2f}{p['threshold_0']['ms_per_step']:>13.2f}"
                  f"{p['threshold_0']['overhead_ms_per_step_vs_no_cache']:>9.2f}{p['threshold_0']['branch_ms_per_step']:>10.2f}"
                  f"{str(p['threshold_0']['equals_no_cache']):>11}{p['forced_12_of_28']['speedup_vs_no_cache']:>8.3f}"
                  f"{p['forced_27_of_28']['skipped_step_fraction_of_full']:>10.3f}"
                  f"{p['pieces_ms']['skipped_step_from_pieces_fraction']:>8.3f}"
                  f"{p['forced_12_of_28']['latent_sqnr_db_vs_no_cache']:>8.1f}")


if __name__ == "__main__":
    main()
