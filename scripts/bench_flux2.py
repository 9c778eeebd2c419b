"""FLUX.2 transformer: fluxc bf16, fp8 and emulated nvfp4 engines against diffusers eager and torch.compile (issue 11).

Seeded random weights of the real architecture (flux2-dev: 8 double + 48 single blocks, 48 heads; 32B
parameters, 64 GB in bf16), 1024x1024 (4096 image + 512 text tokens), batch 1, one process, phases one after
another with only their own model on the GPU. Reported per path: ms/step (fluxc: its whole denoising loop / steps;
diffusers: back-to-back transformer calls), the 50-step loop, peak GPU memory; for fluxc, each engine's 50-step
latents against the bf16 engine's (SQNR) and one forward against diffusers eager. Engines are deleted after use
(a bf16 flux2-dev engine is 64 GB: run on a machine with the disk for it, e.g. nvidia-h200-x2).

    python3 scripts/bench_flux2.py --out $OUT/bench_flux2.json                       (lab GPU)
    python3 scripts/bench_flux2.py --model tiny-flux2 --resolution 128x112 --text 16 --steps 4 --out /tmp/f2.json
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
from bench_transformer import cuda_ms, free, phase_peak, source_commit

from fluxc.build import BuildOptions, build
from fluxc.models import load_model
from fluxc.numerics import relative_error, sqnr_db
from fluxc.runtime import Engine
from fluxc.runtime.flux_math import Profile, position_ids

PRECISIONS = ("bf16", "fp8", "nvfp4")


def inputs(cfg, profile: Profile, device) -> dict:
    g = torch.Generator().manual_seed(123)
    return {"hidden_states": torch.randn(1, profile.image_tokens, cfg["in_channels"], generator=g),
            "encoder_hidden_states": torch.randn(1, profile.text_tokens, cfg["joint_attention_dim"], generator=g),
            "timestep": torch.full((1,), 0.75), "guidance": torch.full((1,), 4.0)}


def to(x: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype if v.is_floating_point() and k != "guidance" else v.dtype) for k, v in x.items()}


def timed(fn, device, calls: int = 3) -> float:
    if device.type == "cuda":
        return cuda_ms(fn, warmup=1, iters=3, calls=calls)
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1000 / calls


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="flux2-dev")
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (CPU smoke runs)")
    args = ap.parse_args()
    h, w = (int(v) for v in args.resolution.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = "auto" if device.type == "cuda" else "cpu"
    profile = Profile(h, w, args.text)
    peak = phase_peak if device.type == "cuda" else (lambda fn: (fn(), float("nan")))
    rec = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "model": f"{args.model} (seeded random weights, seed 0)", "resolution": args.resolution,
           "text_tokens": args.text, "steps": args.steps, "commit": source_commit(), "results": {}}
    res = rec["results"]

    # 1. diffusers eager and torch.compile on the same weights: the reference forward and the baselines
    model = load_model(args.model, dtype=torch.bfloat16, device=device, seed=0).module
    cfg = dict(model.config)
    x = inputs(cfg, profile, device)
    xb = to(x, device, torch.bfloat16)
    ids = position_ids(profile, "flux2").to(device)
    call = lambda m: lambda: m(**xb, txt_ids=ids[:args.text], img_ids=ids[args.text:], return_dict=False)[0]
    eager_out = call(model)().float().cpu()
    ms, gib = peak(lambda: timed(call(model), device))
    res["diffusers eager"] = {"ms_per_step": ms, "loop_s_estimate": ms * args.steps / 1000, "peak_gib": gib}
    if not args.no_compile:
        compiled = torch.compile(model, fullgraph=True)
        t0 = time.perf_counter()
        out = call(compiled)().float().cpu()
        compile_s = time.perf_counter() - t0
        ms, gib = peak(lambda: timed(call(compiled), device))
        res["torch.compile"] = {"ms_per_step": ms, "loop_s_estimate": ms * args.steps / 1000, "peak_gib": gib,
                                "compile_s": compile_s, "sqnr_db_vs_eager": sqnr_db(out, eager_out)}
        del compiled
    del model
    if device.type == "cuda":
        free()

    # 2. fluxc engines, one at a time: build, load (hash-verified), one forward, the whole loop
    embeds = x["encoder_hidden_states"].to(torch.bfloat16)
    reference_latents = None
    for precision in PRECISIONS:
        path = os.path.join(args.workdir, f"{args.model}-{precision}.fluxe")
        t0 = time.perf_counter()
        manifest = build(BuildOptions(model=args.model, output=path, target=target, precision=precision,
                                      resolutions=((h, w),), text_tokens=args.text, transformer_only=True))
        build_s = time.perf_counter() - t0
        engine = Engine.load(path)
        cos, sin = engine.rope(engine.profile_for(h, w))
        out = engine.transformer(engine.profile_for(h, w), dict(xb, rope_cos=cos, rope_sin=sin)).float().cpu()
        run = lambda: engine.denoise(embeds, None, height=h, width=w, steps=args.steps, guidance=4.0, seed=0)
        latents = run()
        loop_ms, gib = peak(lambda: timed(run, device, calls=1))
        reference_latents = latents if reference_latents is None else reference_latents
        res[f"fluxc {precision}"] = {
            "precision_mode": manifest["precision_mode"], "ms_per_step": loop_ms / args.steps,
            "loop_s": loop_ms / 1000, "peak_gib": gib, "weights_gb": engine.weight_bytes / 1e9, "build_s": build_s,
            "forward_relative_error_vs_eager": relative_error(out, eager_out),
            "forward_sqnr_db_vs_eager": sqnr_db(out, eager_out),
            "latents_sqnr_db_vs_bf16_engine": sqnr_db(latents.float(), reference_latents.float()),
            "segment_numerics": manifest["numerics"]}
        del engine
        if device.type == "cuda":
            free()
        shutil.rmtree(path)
        with open(args.out, "w") as f:  # after each engine: a run cut short keeps what it measured
            json.dump(rec, f, indent=1)

    base = res.get("torch.compile", res["diffusers eager"])["ms_per_step"]
    print(f"\n{rec['gpu']}, {args.model}, {args.resolution}, {args.steps} steps, commit {rec['commit']}")
    print(f"{'path':<18}{'ms/step':>9}{'x baseline':>11}{'loop s':>8}{'peak GiB':>10}{'fwd SQNR':>10}{'lat SQNR':>10}")
    for name, r in res.items():
        print(f"{name:<18}{r['ms_per_step']:>9.1f}{r['ms_per_step'] / base:>11.3f}"
              f"{r.get('loop_s', r.get('loop_s_estimate')):>8.2f}{r['peak_gib']:>10.1f}"
              f"{r.get('forward_sqnr_db_vs_eager', r.get('sqnr_db_vs_eager', float('nan'))):>10.1f}"
              f"{r.get('latents_sqnr_db_vs_bf16_engine', float('nan')):>10.1f}")


if __name__ == "__main__":
    main()
