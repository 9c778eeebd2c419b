"""FLUX.1-dev transformer on one GPU: diffusers eager vs torch.compile vs the fluxc bf16 engine.

One process, the same seeded random FLUX.1-dev weights (bf16), 1024x1024 (4096 image + 512 text tokens),
batch 1, per the benchmark protocol in benchmarks/README.md. Phases run one after another with only their own model on the GPU, so
each peak-memory figure is that path's own. Correctness first: each path's output on the same inputs
is compared with diffusers eager (relative error). Writes JSON to --out and prints a table last.
ms/step is a loop's: fluxc's whole 28-step denoising loop (schedule segments, then each step's copies,
graphed step and Euler update) over 28; diffusers' median of back-to-back transformer calls. Timing calls
back to back, as a denoising loop runs them, lets each launch overlap the previous call's GPU work.

    python scripts/bench_transformer.py --out benchmarks/results/DATE-h200-bf16.json
"""

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time

import torch

from fluxc.build import BuildOptions, build
from fluxc.frontend.models import load_model
from fluxc.numerics import relative_error, sqnr_db
from fluxc.recipes import RECIPES
from fluxc.runtime import Engine
from fluxc.runtime.core.families import FAMILIES
from fluxc.runtime.core.profile import Profile
from fluxc.runtime.loaders import caches_at
from fluxc.runtime.ops import kernels
from timing import H, TEXT, W, cuda_ms, diffusers_call, free, inputs, kernel_breakdown, phase_peak, source_commit

AUTOTUNE = (("emulate_precision_casts", True), ("max_autotune_gemm", True), ("coordinate_descent_tuning", True))
# --variants: label -> (recipe, recipe overrides, calibration samples)
VARIANTS = {"fluxc bf16": ("bf16", (), 0), "fluxc bf16 no hoist": ("bf16", (("hoist_schedule", False),), 0),
            "fluxc bf16 unfused": ("bf16_unfused", (), 0),
            "fluxc bf16 autotune": ("bf16", (("inductor_options", AUTOTUNE),), 0),
            "fluxc fp8": ("sm90_fp8", (), 0), "fluxc fp8 attn": ("sm90_fp8_attn", (), 0),
            "fluxc fp8 calibrated": ("sm90_fp8", (), 4),
            "fluxc fp8 epilogues": ("sm90_fp8_epilogues", (), 0),
            "fluxc fp8 gate residual": ("sm90_fp8_epilogues", (("fp8_epilogues", ("gate_residual",)),), 0),
            "fluxc fp8 epilogues gelu": ("sm90_fp8_epilogues", (("fp8_epilogues", ("gate_residual", "gelu")),), 0),
            "fluxc fp8 attn epilogues": ("sm90_fp8_attn_epilogues", (), 0),
            "fluxc fp8 attn epilogues gelu": ("sm90_fp8_attn_epilogues",
                                              (("fp8_epilogues", ("gate_residual", "gelu", "plain")),), 0),
            "fluxc fp8 attn epilogues chained": ("sm90_fp8_attn_epilogues",  # before 'joined' was the default
                                                 (("fp8_epilogues", ("gate_residual", "plain")),), 0),
            "fluxc fp8 attn epilogues flash3": ("sm90_fp8_attn_epilogues", (("fp8_attention_kernel", "flash3"),), 0)}
# variants that also set launch knobs of fluxc.runtime.ops.kernels while their engine is built (Inductor compiles
# the launches into the engine, so the knob is the engine's): q/k norm + RoPE with 4 warps a token, as before 0e894bb;
# or a token's 24 heads in one 32-row program, the launch before 8 heads a program became the default (b9e657c)
KNOBS = {"fluxc fp8 attn epilogues qk 4 warps": {"QK_NORM_ROPE_WARPS": 4},
         "fluxc fp8 attn epilogues qk all heads": {"QK_NORM_ROPE_HEADS": 32}}
VARIANTS |= {label: VARIANTS["fluxc fp8 attn epilogues"] for label in KNOBS}


@contextlib.contextmanager
def knobs(values: dict):
    """Module constants of fluxc.runtime.ops.kernels set to `values` inside the block, restored after it. A build
    with knobs gets fresh Inductor and Triton cache folders: AOTAutograd's cache keys a triton_op on its kernels'
    source, not on the launch options its Python reads from such constants, so with the warm caches of the variant
    before, the build would reuse that variant's compiled code (it did at 971fd39: compile 0.3 s, the same kernel)."""
    if not values:
        yield
        return
    before = {name: getattr(kernels, name) for name in values}
    with tempfile.TemporaryDirectory() as caches, caches_at(caches):
        for name, value in values.items():
            setattr(kernels, name, value)
        try:
            yield
        finally:
            for name, value in before.items():
                setattr(kernels, name, value)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--variants", default="fluxc bf16,fluxc bf16 no hoist,fluxc bf16 unfused",
                    help="comma-separated fluxc variants: " + ", ".join(VARIANTS))
    ap.add_argument("--no-baselines", action="store_true", help="skip diffusers eager and torch.compile (experiments)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rec = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "resolution": f"{H}x{W}",
           "text_tokens": TEXT, "batch": 1, "model": "flux1-dev (seeded random weights, seed 0)", "precision": "bf16",
           "commit": source_commit()}
    results, outputs = {}, {}

    # 1. fluxc, with and without its fusion passes: build, then load the written engine (hash-verified) and time it
    x = None
    for label in args.variants.split(","):
        recipe, overrides, calibrate = VARIANTS[label]
        engine_path = os.path.join(args.workdir, "flux1-dev.fluxe")
        t0 = time.perf_counter()
        with knobs(KNOBS.get(label, {})):
            manifest = build(BuildOptions(model="flux1-dev", output=engine_path, recipe=recipe,
                                          precision=RECIPES[recipe]().precision.value,
                                          recipe_overrides=overrides, calibrate=calibrate, transformer_only=True))
        total_build = time.perf_counter() - t0
        secs = manifest["build_seconds"]
        trace_compile = secs["trace"] + secs["passes"] + sum(v for k, v in secs.items() if k.startswith("compile"))
        free()
        t0 = time.perf_counter()
        engine = Engine.load(engine_path)
        load_s = time.perf_counter() - t0
        cfg = engine.config
        x = x or inputs(cfg)
        profile = engine.profile_for(H, W)
        cos, sin = engine.rope(profile)
        outputs[label] = engine.transformer(profile, dict(x, rope_cos=cos, rope_sin=sin)).float().cpu()
        # ms/step: the whole denoising loop (schedule segments, then every step's copies, graph replay and
        # Euler update) divided by its steps; the graphed step alone and the schedule segments alone beside it
        emb = (x["encoder_hidden_states"], x["pooled_projections"])
        z = torch.randn(1, profile.image_tokens, cfg["in_channels"], device="cuda", dtype=torch.bfloat16)
        loop_ms, peak = phase_peak(lambda: cuda_ms(
            lambda: engine.denoise(*emb, height=H, width=W, steps=args.steps, latents=z), warmup=2, iters=5))
        graphed = engine._graphs[(profile.name,)].graphs[0]  # the no-cache step's one graph
        graph_ms = cuda_ms(graphed.replay, warmup=1, iters=5, calls=10)
        breakdown = kernel_breakdown(graphed.replay)
        timesteps = torch.linspace(1, 1 / args.steps, args.steps, device="cuda").to(torch.bfloat16)[:, None]
        schedule_ms = cuda_ms(lambda: engine.schedule(timesteps, x["guidance"], x["pooled_projections"]))
        results[label] = {"ms_per_step": loop_ms / args.steps, "graph_ms_per_step": graph_ms, "schedule_ms": schedule_ms,
                          "peak_gib": peak, "denoise_s": loop_ms / 1000, "weights_gb": engine.weight_bytes / 1e9,
                          "build_trace_compile_s": trace_compile, "build_total_s": total_build,
                          "build_stages_s": secs, "load_s": load_s, "segment_numerics": manifest["numerics"],
                          "pass_counts": manifest["pass_counts"], "kernels": breakdown,
                          "fp8_epilogues_explain": {seg: ex["fuse_fp8_epilogues"] for seg, ex in
                                                    manifest["pass_explain"].items() if "fuse_fp8_epilogues" in ex},
                          "fp8_plain_tactics_ms": {seg: rep["fuse_fp8_epilogues"] for seg, rep in
                                                   manifest["pass_reports"].items() if "fuse_fp8_epilogues" in rep}}
        del engine, graphed
        free()
        shutil.rmtree(engine_path)  # 24 GB each
        with open(args.out, "w") as f:  # after each variant: a run cut short keeps what it measured
            json.dump(rec | {"results": results}, f, indent=1)

    if args.no_baselines:
        for name, r in results.items():
            k = r["kernels"]
            print(f"{name}: {r['ms_per_step']:.2f} ms/step (graph {r['graph_ms_per_step']:.2f}); GEMM {k['gemm_ms']:.1f} "
                  f"attention {k['attention_ms']:.1f} other {k['other_ms']:.1f}")
            for t in k["top_kernels"][:14]:
                print(f"  {t['ms']:8.3f} {t['calls']:6.1f}x {t['name'][:100]}")
            print(f"  idle between kernels {k['idle_ms']:.2f} ms per call; most before:")
            for t in k["top_idle_before"][:6]:
                print(f"  {t['ms']:8.3f} {t['name'][:100]}")
        return
    # 2. diffusers eager on the same weights
    model = load_model("flux1-dev", dtype=torch.bfloat16, device=torch.device("cuda"), seed=0).module
    ids = FAMILIES["flux1"].position_ids(Profile(H, W, TEXT)).cuda()
    call = diffusers_call(model, x, ids)
    eager_out = outputs["diffusers eager"] = call().float().cpu()
    ms, peak = phase_peak(lambda: cuda_ms(call, calls=3))
    results["diffusers eager"] = {"ms_per_step": ms, "peak_gib": peak, "kernels": kernel_breakdown(call)}

    # 3. torch.compile(fullgraph=True) of the same diffusers model
    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    ccall = diffusers_call(compiled, x, ids)
    outputs["torch.compile"] = ccall().float().cpu()
    compile_s = time.perf_counter() - t0
    ms, peak = phase_peak(lambda: cuda_ms(ccall, calls=5))
    results["torch.compile"] = {"ms_per_step": ms, "peak_gib": peak, "compile_s": compile_s,
                                "kernels": kernel_breakdown(ccall)}

    for name, out in outputs.items():
        results[name]["relative_error_vs_eager"] = relative_error(out, eager_out)
        results[name]["sqnr_db_vs_eager"] = sqnr_db(out, eager_out)
    base = results["torch.compile"]["ms_per_step"]
    for r in results.values():
        r["ratio_to_torch_compile"] = r["ms_per_step"] / base  # < 1: faster than torch.compile
        r["speedup_vs_torch_compile"] = base / r["ms_per_step"]
    rec["results"] = results
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)

    print(f"\n{rec['gpu']}, torch {rec['torch']}, FLUX.1-dev random weights, {H}x{W}, batch 1, commit {rec['commit']}")
    for name, r in results.items():
        print(f"\n{name}: top kernels (ms per step)")
        for k in r["kernels"]["top_kernels"]:
            print(f"  {k['ms']:8.3f} {k['calls']:6.1f}x {k['category']:<9} {k['name'][:110]}")
    print(f"\nms/step: fluxc's {args.steps}-step denoising loop / {args.steps}; diffusers: back-to-back transformer calls")
    print(f"\n{'path':<18}{'ms/step':>9}{'speedup':>9}{'x compile':>11}{'rel.err':>10}{'SQNR dB':>9}{'peak GiB':>10}{'GEMM':>8}{'attn':>8}"
          f"{'other':>8}{'idle':>7}{'weights GB':>11}")
    for name, r in results.items():
        k = r["kernels"]
        print(f"{name:<18}{r['ms_per_step']:>9.1f}{r['speedup_vs_torch_compile']:>9.3f}{r['ratio_to_torch_compile']:>11.3f}"
              f"{r['relative_error_vs_eager']:>10.2e}{r['sqnr_db_vs_eager']:>9.1f}{r['peak_gib']:>10.1f}"
              f"{k['gemm_ms']:>8.1f}{k['attention_ms']:>8.1f}{k['other_ms']:>8.1f}{k['idle_ms']:>7.1f}"
              f"{r.get('weights_gb', float('nan')):>11.2f}")
    f = next(r for name, r in results.items() if name.startswith("fluxc"))
    print(f"fluxc build: trace+compile {f['build_trace_compile_s']:.1f} s, total {f['build_total_s']:.1f} s; "
          f"load {f['load_s']:.1f} s; {args.steps}-step denoise {f['denoise_s']:.2f} s; "
          f"torch.compile first call {results['torch.compile']['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
