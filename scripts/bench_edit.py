"""Image input end to end (issue 30): a FLUX.1 Kontext edit and an image-to-image run at strength 0.6, diffusers'
FluxKontextPipeline / FluxImg2ImgPipeline eager and with the transformer under torch.compile, against fluxc
engines built with --tasks kontext and --tasks t2i,img2img,inpaint for each recipe, in one process.

The same seeded random weights everywhere (Kontext dev has FLUX.1-dev's architecture), one prompt, batch 1, a
synthetic reference image of the output's size (a gradient and a disc). Correctness first (each image against
diffusers eager's: max and mean |diff|, PSNR), then time: end-to-end seconds (median of --repeats calls after a
warm-up call) and ms per step run (fluxc: CUDA events per step; diffusers: the denoising stage's time from the
step-end callback, one sync a step). Writes JSON to --out and prints a table last.

    python scripts/bench_edit.py --out $OUT/bench_edit.json                       # FLUX.1-dev shapes, 1024x1024
    python scripts/bench_edit.py --model tiny --resolution 144x112 --steps 4 --recipes reference --no-compile --out x.json
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from timing import source_commit
from fluxc.build import BuildOptions, build
from fluxc.frontend.components import diffusers_pipeline, load_components
from fluxc.frontend.models import ARCHITECTURES, load_model
from fluxc.numerics import psnr_db
from fluxc.recipes import RECIPES
from fluxc.runtime import Engine
from fluxc.validate import parse_resolution

PROMPTS = {"kontext": "make it a winter scene with snow on the ground", "img2img": "a red fox in a snowy forest"}
STRENGTH = 0.6
GUIDANCE = {"kontext": 2.5, "img2img": 3.5}
TASKS = {"kontext": ("kontext",), "img2img": ("t2i", "img2img", "inpaint")}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def reference_image(h: int, w: int) -> Image.Image:
    y, x = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    disc = ((y - 0.4) ** 2 + (x - 0.5) ** 2 < 0.05).astype(float)
    return Image.fromarray((np.stack([x, y, disc], -1) * 255).astype(np.uint8))


def median_calls(fn, repeats: int):
    """(first call's seconds, median seconds of `repeats` more calls, the last output)."""
    _, first = seconds(fn)
    times, out = [], None
    for _ in range(repeats):
        out, s = seconds(fn)
        times.append(s)
    return first, statistics.median(times), out


def save(rec: dict, images: dict, out: str) -> None:
    """Writes the record so far (after every path: a run cut short keeps what it measured), each image compared
    with diffusers eager's."""
    for task, results in rec["results"].items():
        eager = images[task].get("diffusers eager")
        compiled = results.get("diffusers + torch.compile", {}).get("e2e_s")
        for name, r in results.items():
            img = images[task][name]
            if eager is not None:
                r |= {"image_max_abs_vs_eager": float(np.abs(img - eager).max()),
                      "image_mean_abs_vs_eager": float(np.abs(img - eager).mean()),
                      "image_psnr_db_vs_eager": psnr_db(img, eager)}
            if compiled:
                r["ratio_to_torch_compile"] = r["e2e_s"] / compiled
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)


def diffusers_path(pipe, task, image, args, h, w, text_tokens):
    step_ends = []

    def call():
        step_ends.clear()
        step_ends.append(time.perf_counter())

        def on_step(p, i, t, kw):
            sync()
            step_ends.append(time.perf_counter())
            return kw

        common = dict(prompt=PROMPTS[task], image=image, height=h, width=w, num_inference_steps=args.steps,
                      guidance_scale=GUIDANCE[task], max_sequence_length=text_tokens, output_type="np",
                      generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=on_step)
        extra = dict(_auto_resize=False, max_area=h * w) if task == "kontext" else dict(strength=STRENGTH)
        return pipe(**common, **extra).images

    first, e2e, out = median_calls(call, args.repeats)
    steps = np.diff(step_ends)[1:] * 1e3  # the first interval also holds the encode and the image preparation
    record = {"e2e_s": e2e, "first_call_s": first, "ms_per_step": float(np.median(steps)), "steps_run": len(steps) + 1}
    return record, out


@torch.no_grad()
def main():
    from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="flux1-dev")
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default="bf16,sm90_fp8")
    ap.add_argument("--tasks", default="kontext,img2img")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (CPU smoke runs)")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    h, w = parse_resolution(args.resolution)
    text_tokens = ARCHITECTURES[args.model][2]
    cuda = torch.cuda.is_available()
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    image = reference_image(h, w)
    rec = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "commit": source_commit(), "model": f"{args.model} (seeded random weights)", "resolution": f"{h}x{w}",
           "steps": args.steps, "strength": STRENGTH, "results": {}}
    tasks = args.tasks.split(",")
    images = {}  # task -> path -> output image
    base = diffusers_pipeline(load_model(args.model, dtype=dtype, device=dev).module,
                              load_components(args.model, "flux1", dtype=dtype, device=dev))
    for task in tasks:
        # torch_dtype: from_pipe's default, float32, would cast the shared modules (3.55 s/step on the H200)
        pipe = (FluxKontextPipeline if task == "kontext" else FluxImg2ImgPipeline).from_pipe(base, torch_dtype=dtype)
        results, outs = rec["results"].setdefault(task, {}), images.setdefault(task, {})
        results["diffusers eager"], outs["diffusers eager"] = diffusers_path(pipe, task, image, args, h, w, text_tokens)
        save(rec, images, args.out)
        if not args.no_compile:
            pipe.transformer = torch.compile(base.transformer, fullgraph=True)
            results["diffusers + torch.compile"], outs["diffusers + torch.compile"] = diffusers_path(
                pipe, task, image, args, h, w, text_tokens)
            save(rec, images, args.out)
            pipe.transformer = base.transformer
    del base, pipe
    torch._dynamo.reset()  # its caches hold the compiled transformer (12B parameters) alive
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    for task in tasks:
        for recipe in args.recipes.split(","):
            path = os.path.join(args.workdir, f"{args.model}-{task}-{recipe}.fluxe")
            precision = RECIPES[recipe]().precision.value
            manifest, build_s = seconds(lambda: build(BuildOptions(
                model=args.model, output=path, target="auto" if cuda else "cpu", precision=precision, recipe=recipe,
                resolutions=((h, w),), text_tokens=text_tokens, tasks=TASKS[task])))
            engine = Engine.load(path)
            step_ms = []

            def call():
                step_ms.clear()
                kw = dict(image=image) if task == "kontext" else dict(image=image, strength=STRENGTH)
                return engine.generate(PROMPTS[task], steps=args.steps, guidance=GUIDANCE[task], seed=args.seed,
                                       output_type="np", step_ms=step_ms, **kw)

            first, e2e, out = median_calls(call, args.repeats)
            rec["results"][task][f"fluxc {recipe}"] = {
                "e2e_s": e2e, "first_call_s": first, "ms_per_step": statistics.median(step_ms),
                "steps_run": len(step_ms), "build_s": build_s,
                "image_tokens": manifest["profiles"][0]["image_tokens"] * (1 + manifest["profiles"][0]["references"])}
            images[task][f"fluxc {recipe}"] = out
            save(rec, images, args.out)
            del engine
            shutil.rmtree(path)
            if cuda:
                torch.cuda.empty_cache()

    print(f"\n{rec['gpu']}, torch {rec['torch']}, {args.model}, {h}x{w}, {args.steps} steps (img2img runs "
          f"{int(args.steps * STRENGTH)}), commit {rec['commit']}")
    print(f"{'task':<9}{'path':<27}{'e2e s':>8}{'ms/step':>9}{'x compile':>10}{'PSNR vs eager':>14}")
    for task, results in rec["results"].items():
        for name, r in results.items():
            print(f"{task:<9}{name:<27}{r['e2e_s']:>8.2f}{r['ms_per_step']:>9.1f}{r.get('ratio_to_torch_compile', float('nan')):>10.3f}"
                  f"{r['image_psnr_db_vs_eager']:>14.1f}")


if __name__ == "__main__":
    main()
