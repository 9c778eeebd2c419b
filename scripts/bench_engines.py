"""Records for `fluxc compare` from the lab GPU: FLUX.1-dev whole-pipeline engines per recipe, each benched and
(except the reference) evaluated against the reference engine, through the same functions as `fluxc bench` and
`fluxc eval` (compiler/records.py), in one process so each engine loads once.

Engines are built into --workdir unless one is there already (a warm device keeps an ignored folder of the
tree between calls), so the work can be split over calls; --drop deletes an engine after its records.

    python3 scripts/bench_engines.py --recipes bf16,sm90_fp8 --drop sm90_fp8 --workdir .engines --out $OUT
    python3 scripts/bench_engines.py --recipes sm100_nvfp4 --workdir .engines --out $OUT
    python3 scripts/bench_engines.py --recipes sm90_fp8_attn,sm90_fp8_attn_epilogues --reference eager --out $OUT
    python3 scripts/bench_engines.py --recipes sm90_fp8_attn_epilogues:fp8_attention_kernel=flash3 --reference eager ...

A recipe may carry one string field set over the named recipe's (RECIPE:FIELD=VALUE), as the engine's name and its
records' do (RECIPE-FIELD-VALUE).
"""

import argparse
import gc
import json
import os
import re
import shutil
import time

import torch

from fluxc.build import BuildOptions, build
from fluxc.cli.records_io import write_record
from fluxc.records import bench, evaluate
from fluxc.recipes import RECIPES
from fluxc.runtime import Engine

LABELS = {"bf16": "bf16", "sm90_fp8": "fp8", "sm90_fp8_attn": "fp8-attn", "sm100_nvfp4": "nvfp4-emulated"}


def gpu_tag() -> str:
    """The records' name prefix: the GPU's model (h100, h200, b200), else cpu. Records are named by the machine
    that measured them, never by the one a run asked for (an nvidia-h200 call may run on an H100)."""
    if not torch.cuda.is_available():
        return "cpu"
    found = re.search(r"\b([A-Z]+\d{2,3})\b", torch.cuda.get_device_name())
    return found.group(1).lower() if found else "gpu"


def label(recipe: str) -> str:
    """RECIPE or RECIPE:FIELD=VALUE as a file name's part."""
    return LABELS.get(recipe) or recipe.replace(":", "-").replace("=", "-")


def engine_path(recipe: str, workdir: str, model: str) -> str:
    return os.path.join(workdir, f"{model}-{label(recipe)}.fluxe")


def engine(recipe: str, workdir: str, model: str) -> tuple[Engine, float]:
    """The engine (built first unless the workdir has it) and its load seconds."""
    path = engine_path(recipe, workdir, model)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        name, _, override = recipe.partition(":")
        build(BuildOptions(model=model, output=path, recipe=name, precision=RECIPES[name]().precision.value,
                           recipe_overrides=(tuple(override.split("=", 1)),) if override else ()))
    start = time.perf_counter()
    return Engine.load(path), time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--reference", default="bf16", help="the recipe every other engine is evaluated against, or "
                    "eager: diffusers' FluxPipeline in bf16 on the same random weights (fluxc eval --reference eager)")
    ap.add_argument("--drop", default="", help="recipes whose engine is deleted after its records")
    ap.add_argument("--workdir", default=".engines")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--model", default="flux1-dev", help="an architecture with seeded random weights (tiny: a CPU check)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    for recipe in args.recipes.split(","):
        eng, load_s = engine(recipe, args.workdir, args.model)
        name = f"{gpu_tag()}-{label(recipe)}"
        rec = bench(eng, steps=args.steps, warmup=1, repeat=2, name=name, load_s=load_s)  # alone on the GPU
        write_record(os.path.join(args.out, f"{name}-bench.json"), rec)
        print(f"{name}: {rec['speed']['ms_per_step']['median']:.2f} ms/step, e2e {rec['speed']['e2e_s']['total']:.2f} s",
              flush=True)
        if recipe != args.reference:
            reference = "eager" if args.reference == "eager" else engine(args.reference, args.workdir, args.model)[0]
            q = evaluate(eng, reference, steps=args.steps, name=name)
            write_record(os.path.join(args.out, f"{name}-eval.json"), q)
            print(f"{name} vs {args.reference}: {json.dumps(q['quality']['mean'])}", flush=True)
            del reference
        del eng
        gc.collect()
        torch.cuda.empty_cache()  # the next engine's peak memory is its own
        if recipe in args.drop.split(","):
            shutil.rmtree(engine_path(recipe, args.workdir, args.model))

if __name__ == "__main__":
    main()
