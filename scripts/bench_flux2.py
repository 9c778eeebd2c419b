"""FLUX.2 transformer: fluxc bf16, fp8 and emulated nvfp4 engines against diffusers eager and torch.compile (issue 11).

Seeded random weights of the real architecture (flux2-dev: 8 double + 48 single blocks, 48 heads; 32B
parameters, 64 GB in bf16), 1024x1024 (4096 image + 512 text tokens), batch 1, one process, phases one after
another with only their own model on the GPU. Reported per path: ms/step (fluxc: its whole denoising loop / steps;
diffusers: back-to-back transformer calls), the 50-step loop, peak GPU memory; for fluxc, each engine's 50-step
latents against the bf16 engine's (SQNR) and one forward against diffusers eager. Engines are deleted after use
and written where there is most room (--workdir, else the largest of the temp folder, /dev/shm and the current
folder; a bf16 flux2-dev engine is 64 GB). --phases splits the run over several device calls (each under the
lab's 10 minutes): the bf16 phase saves its latents to --reference, later calls read them back from there.

    python3 scripts/bench_flux2.py --phases eager,bf16 --reference $OUT/flux2_ref.safetensors --out $OUT/a.json
    python3 scripts/bench_flux2.py --phases compile,fp8 --reference ref/flux2_ref.safetensors --out $OUT/b.json
    python3 scripts/bench_flux2.py --model tiny-flux2 --resolution 128x112 --text 16 --steps 4 --out /tmp/f2.json
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file
from timing import cuda_ms, free, phase_peak, source_commit

from fluxc.build import BuildOptions, build
from fluxc.frontend.models import load_model
from fluxc.numerics import relative_error, sqnr_db
from fluxc.runtime import Engine
from fluxc.runtime.core.families import FAMILIES
from fluxc.runtime.core.profile import Profile

ENGINES = {"bf16": ("bf16", None), "fp8": ("fp8", None), "fp8-epilogues": ("fp8", "sm90_fp8_epilogues"),
           "fp8-attn-epilogues": ("fp8", "sm90_fp8_attn_epilogues"),
           "nvfp4": ("nvfp4", None)}  # phase -> (precision, recipe; None: the precision's default)
PHASES = ("eager", "compile", *ENGINES)
BYTES_PER_PARAMETER = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 2.0}  # on disk; the emulated nvfp4 engine keeps bf16 copies


def roomiest(candidates: list[str]) -> tuple[str, float]:
    """The candidate folder with the most free space, and that space in GB."""
    free = {d: shutil.disk_usage(d).free / 1e9 for d in candidates if os.path.isdir(d)}
    best = max(free, key=free.get)
    return best, free[best]


def inputs(cfg, profile: Profile) -> dict:
    g = torch.Generator().manual_seed(123)
    return {"hidden_states": torch.randn(1, profile.image_tokens, cfg["in_channels"], generator=g),
            "encoder_hidden_states": torch.randn(1, profile.text_tokens, cfg["joint_attention_dim"], generator=g),
            "timestep": torch.full((1,), 0.75), "guidance": torch.full((1,), 4.0)}


def to(x: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype if v.is_floating_point() and k != "guidance" else v.dtype) for k, v in x.items()}


def timed(fn, device, calls: int = 3, iters: int = 3, warmup: int = 1) -> float:
    if device.type == "cuda":
        return cuda_ms(fn, warmup=warmup, iters=iters, calls=calls)
    for _ in range(warmup):
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
    ap.add_argument("--workdir", help="where engines are written (default: the roomiest of temp, /dev/shm, .)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {','.join(PHASES)}")
    ap.add_argument("--reference", help="safetensors file of the bf16 engine's latents: written by the bf16 phase, "
                                        "read by the others")
    ap.add_argument("--loops", type=int, default=2, help="timed denoising loops per engine, after one untimed")
    args = ap.parse_args()
    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    h, w = (int(v) for v in args.resolution.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = "auto" if device.type == "cuda" else "cpu"
    profile = Profile(h, w, args.text)
    peak = phase_peak if device.type == "cuda" else (lambda fn: (fn(), float("nan")))
    rec = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "model": f"{args.model} (seeded random weights, seed 0)", "resolution": args.resolution,
           "text_tokens": args.text, "steps": args.steps, "commit": source_commit(), "phases": phases, "results": {}}
    res = rec["results"]

    def save():  # after each phase: a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)

    # 1. diffusers eager and torch.compile on the same weights: the reference forward and the baselines
    model = load_model(args.model, dtype=torch.bfloat16, device=device, seed=0).module
    cfg = dict(model.config)
    x = inputs(cfg, profile)
    xb = to(x, device, torch.bfloat16)
    ids = FAMILIES["flux2"].position_ids(profile).to(device)
    call = lambda m: lambda: m(**xb, txt_ids=ids[:args.text], img_ids=ids[args.text:], return_dict=False)[0]
    eager_out = call(model)().float().cpu()
    parameters = sum(p.numel() for p in model.parameters())
    rec["parameters"] = parameters
    if "eager" in phases:
        ms, gib = peak(lambda: timed(call(model), device))
        res["diffusers eager"] = {"ms_per_step": ms, "loop_s_estimate": ms * args.steps / 1000, "peak_gib": gib}
    if "compile" in phases:
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
    save()

    # 2. fluxc engines, one at a time: build, load (hash-verified), one forward, the whole loop
    embeds = x["encoder_hidden_states"].to(torch.bfloat16)
    reference_latents = None
    if "bf16" not in phases and args.reference:
        if os.path.exists(args.reference):
            reference_latents = load_file(args.reference)["latents"]
        else:  # the engines' latents are then compared with nothing (NaN), their forward still with eager
            print(f"no bf16 engine's latents at {args.reference}: latent SQNR not measured")
    for name, (precision, recipe) in [(p, ENGINES[p]) for p in ENGINES if p in phases]:
        workdir, free_gb = roomiest([args.workdir] if args.workdir else [tempfile.gettempdir(), "/dev/shm", "."])
        need_gb = parameters * BYTES_PER_PARAMETER[precision] / 1e9
        if need_gb > 0.95 * free_gb:
            raise SystemExit(f"{name}: the engine needs about {need_gb:.0f} GB; the roomiest folder, {workdir}, "
                             f"has {free_gb:.0f} GB free. Run on a machine with more disk.")
        path = os.path.join(workdir, f"{args.model}-{name}.fluxe")
        t0 = time.perf_counter()
        manifest, build_gib = peak(lambda: build(BuildOptions(
            model=args.model, output=path, target=target, precision=precision, recipe=recipe, resolutions=((h, w),),
            text_tokens=args.text, transformer_only=True)))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = Engine.load(path)  # sha256 of every file checked
        load_s = time.perf_counter() - t0
        cos, sin = engine.rope(engine.profile_for(h, w))
        out = engine.transformer(engine.profile_for(h, w), dict(xb, rope_cos=cos, rope_sin=sin)).float().cpu()
        run = lambda: engine.denoise(embeds, None, height=h, width=w, steps=args.steps, guidance=4.0, seed=0)
        latents = run()  # the warm-up (CUDA-graph capture)
        loop_ms, gib = peak(lambda: timed(run, device, calls=1, iters=args.loops, warmup=0))
        if name == "bf16":
            reference_latents = latents
            if args.reference:
                save_file({"latents": latents.float().cpu().contiguous()}, args.reference)
        lat_sqnr = (sqnr_db(latents.float().cpu(), reference_latents.float().cpu()) if reference_latents is not None
                    else float("nan"))
        res[f"fluxc {name}"] = {
            "precision_mode": manifest["precision_mode"], "ms_per_step": loop_ms / args.steps,
            "loop_s": loop_ms / 1000, "peak_gib": gib, "weights_gb": engine.weight_bytes / 1e9, "build_s": build_s,
            "build_peak_gib": build_gib,
            "build_stages_s": manifest["build_seconds"], "load_s": load_s, "engine_folder_free_gb": free_gb,
            "forward_relative_error_vs_eager": relative_error(out, eager_out),
            "forward_sqnr_db_vs_eager": sqnr_db(out, eager_out),
            "latents_sqnr_db_vs_bf16_engine": lat_sqnr,
            "segment_numerics": manifest["numerics"]}
        del engine
        if device.type == "cuda":
            free()
        shutil.rmtree(path)
        save()

    base = res.get("torch.compile", res.get("diffusers eager", {"ms_per_step": float("nan")}))["ms_per_step"]
    print(f"\n{rec['gpu']}, {args.model}, {args.resolution}, {args.steps} steps, commit {rec['commit']}")
    print(f"{'path':<22}{'ms/step':>9}{'x baseline':>11}{'loop s':>8}{'peak GiB':>10}{'fwd SQNR':>10}{'lat SQNR':>10}")
    for name, r in res.items():
        print(f"{name:<22}{r['ms_per_step']:>9.1f}{r['ms_per_step'] / base:>11.3f}"
              f"{r.get('loop_s', r.get('loop_s_estimate')):>8.2f}{r['peak_gib']:>10.1f}"
              f"{r.get('forward_sqnr_db_vs_eager', r.get('sqnr_db_vs_eager', float('nan'))):>10.1f}"
              f"{r.get('latents_sqnr_db_vs_bf16_engine', float('nan')):>10.1f}")


if __name__ == "__main__":
    main()
