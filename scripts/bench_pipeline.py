"""Text to image end to end: diffusers FluxPipeline eager vs the same with the transformer under
torch.compile vs the fluxc engine (tokenizers, CLIP, T5, transformer, VAE all in the engine).

One process, the same seeded random weights for every path, one prompt, batch 1, per the benchmark protocol in benchmarks/README.md.
Paths run one after another with only their own models on the GPU, so each peak-memory figure is that
path's own. Correctness first (prompt embeddings and the final image vs diffusers eager), then time:
end-to-end seconds (median of --repeats calls after one warm-up call) and the seconds of each stage
(encode, denoise, decode). Writes JSON to --out and prints a table last.

    python scripts/bench_pipeline.py --out benchmarks/results/DATE-h200-flux1dev-pipeline.json
    python scripts/bench_pipeline.py --model tiny --resolution 144x112 --steps 2 --out /tmp/smoke.json
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from timing import free, phase_peak, source_commit
from fluxc.build import BuildOptions, build
from fluxc.validate import parse_resolution
from fluxc.frontend.components import diffusers_pipeline, load_components
from fluxc.frontend.models import ARCHITECTURES, load_model
from fluxc.numerics import psnr_db, relative_error
from fluxc.recipes import RECIPES
from fluxc.runtime import Engine

PROMPT = "a photo of an astronaut riding a horse on the moon, dramatic light, 35mm film"


def seconds(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def timed_calls(fn, repeats: int):
    """(first call's seconds, median seconds of `repeats` more calls, last output, peak GiB of those calls)."""
    _, first = seconds(fn)
    times = []

    def calls():
        out = None
        for _ in range(repeats):
            out, s = seconds(fn)
            times.append(s)
        return out

    out, peak = phase_peak(calls)
    return first, statistics.median(times), out, peak


def diffusers_stages(pipe, h, w, steps, text_tokens, seed) -> dict:
    """The same pipeline call cut at its stage boundaries: encode_prompt, the loop, unpack + VAE decode."""
    (embeds, pooled, _), encode = seconds(lambda: pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=text_tokens))
    latents, denoise = seconds(lambda: pipe(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=h, width=w, num_inference_steps=steps,
        guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="latent").images)

    def decode():
        z = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pil")

    _, decode_s = seconds(decode)
    return {"encode": encode, "denoise": denoise, "decode": decode_s}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="flux1-dev", choices=[a for a in ARCHITECTURES if not a.endswith("flux2")
                                                             and a != "flux2-dev"])
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="Noise seed (weights use seed 0).")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--no-baselines", action="store_true", help="skip diffusers eager and torch.compile")
    ap.add_argument("--recipes", default="bf16", help="comma-separated fluxc recipes, e.g. bf16,sm90_fp8,sm90_fp8_attn")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w = parse_resolution(args.resolution)
    text_tokens = ARCHITECTURES[args.model][2]
    dev = torch.device("cuda")
    rec = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(), "resolution": f"{h}x{w}",
           "text_tokens": text_tokens, "batch": 1, "steps": args.steps, "guidance": 3.5, "prompt": PROMPT,
           "model": f"{args.model} (seeded random weights, seed 0; tokenizers built in code)", "precision": "bf16 (diffusers); fluxc per recipe"}
    results = {}
    call = dict(height=h, width=w, num_inference_steps=args.steps, guidance_scale=3.5,
                max_sequence_length=text_tokens)

    # 1. diffusers eager, then the same pipeline with its transformer under torch.compile(fullgraph=True)
    ref_embeds = ref_pooled = None
    if not args.no_baselines:
        pipe = diffusers_pipeline(load_model(args.model, dtype=torch.bfloat16, device=dev).module,
                                  load_components(args.model, "flux1", dtype=torch.bfloat16, device=dev))
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=text_tokens)
        for name in ("diffusers eager", "diffusers + torch.compile"):
            if name != "diffusers eager":
                pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
            run = lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(args.seed), output_type="np", **call).images
            first, e2e, image, peak = timed_calls(run, args.repeats)
            results[name] = {"e2e_s": e2e, "first_call_s": first, "peak_gib": peak,
                             "stages_s": diffusers_stages(pipe, h, w, args.steps, text_tokens, args.seed), "image": image}
        del pipe
        free()

    # 2. fluxc, per recipe: build the whole-pipeline engine, load it (hash-verified), generate
    for recipe in args.recipes.split(","):
        engine_path = os.path.join(args.workdir, f"{args.model}-{recipe}-pipeline.fluxe")
        precision = RECIPES[recipe]().precision.value
        manifest, build_s = seconds(lambda: build(BuildOptions(
            model=args.model, output=engine_path, precision=precision, recipe=recipe, resolutions=((h, w),),
            text_tokens=text_tokens)))
        free()
        engine, load_s = seconds(lambda: Engine.load(engine_path))
        embeds, pooled = engine.encode_prompt([PROMPT])
        stages = []

        def run():
            stages.append({})
            return engine.generate(PROMPT, steps=args.steps, guidance=3.5, seed=args.seed, output_type="np",
                                   timings=stages[-1])

        first, e2e, image, peak = timed_calls(run, args.repeats)
        results[f"fluxc {recipe}"] = {
            "e2e_s": e2e, "first_call_s": first, "peak_gib": peak, "image": image,
            "stages_s": {k: statistics.median(s[k] for s in stages[1:]) for k in stages[-1]},
            "build_s": build_s, "build_stages_s": manifest["build_seconds"], "load_s": load_s,
            "segment_numerics": manifest["numerics"], "weights_gb": engine.weight_bytes / 1e9,
        }
        if ref_embeds is not None:
            results[f"fluxc {recipe}"].update(
                prompt_embeds_relative_error=relative_error(embeds.float(), ref_embeds.float()),
                pooled_relative_error=relative_error(pooled.float(), ref_pooled.float()))
        del engine
        free()
        shutil.rmtree(engine_path)

    # images: against diffusers eager, and each fluxc image's PSNR against the fluxc bf16 engine's (same seed)
    eager = results.get("diffusers eager", {}).get("image")
    bf16_image = results.get("fluxc bf16", {}).get("image")
    for r in results.values():
        img = r.pop("image")
        if eager is not None:
            r["image_max_abs_vs_eager"] = float(np.abs(img - eager).max())
            r["image_mean_abs_vs_eager"] = float(np.abs(img - eager).mean())
            r["image_psnr_db_vs_eager"] = psnr_db(img, eager)
            r["ratio_to_torch_compile_pipeline"] = r["e2e_s"] / results["diffusers + torch.compile"]["e2e_s"]
        if bf16_image is not None:
            r["image_psnr_db_vs_fluxc_bf16"] = psnr_db(img, bf16_image)
    rec["results"] = results
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)

    print(f"\n{rec['gpu']}, torch {rec['torch']}, {args.model} random weights, {h}x{w}, {args.steps} steps, batch 1")
    print(f"{'path':<27}{'e2e s':>7}{'x compile':>10}{'encode':>8}{'denoise':>9}{'decode':>8}{'peak GiB':>9}{'img mean|d|':>12}"
          f"{'PSNR vs bf16':>13}")
    nan = float("nan")
    for name, r in results.items():
        s = r["stages_s"]
        print(f"{name:<27}{r['e2e_s']:>7.2f}{r.get('ratio_to_torch_compile_pipeline', nan):>10.3f}{s['encode']:>8.3f}"
              f"{s['denoise']:>9.3f}{s['decode']:>8.3f}{r['peak_gib']:>9.1f}{r.get('image_mean_abs_vs_eager', nan):>12.2e}"
              f"{r.get('image_psnr_db_vs_fluxc_bf16', nan):>13.1f}")
    for recipe in args.recipes.split(","):
        f = results[f"fluxc {recipe}"]
        print(f"fluxc {recipe}: build {f['build_s']:.0f} s, load {f['load_s']:.0f} s, transformer + encoder + VAE "
              f"weights {f['weights_gb']:.1f} GB, prompt_embeds rel.err {f.get('prompt_embeds_relative_error', nan):.2e}")
    if not args.no_baselines:
        print(f"torch.compile first call {results['diffusers + torch.compile']['first_call_s']:.0f} s")


if __name__ == "__main__":
    main()
