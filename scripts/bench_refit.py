"""fluxc refit against a full build (issue 29): the seconds of `fluxc build` of a second checkpoint and of
`fluxc refit ENGINE --model` it onto the first checkpoint's engine, each in a fresh process with empty Inductor,
Triton and fluxc segment caches (a build that finds its kernels cached is not what a user waits for).

Both checkpoints are seeded random weights of --model saved as diffusers pipeline folders (seeds 0 and 1). Checks
that the refitted engine's weights file has the fresh build's digest. Writes JSON to --out, prints a table last.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from timing import source_commit


def fluxc(*args: str, caches: str, code: str = "from fluxc.cli import main; main()") -> float:
    """Seconds of one fluxc command (or Python `code`) in a fresh process with the caches under `caches`."""
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
                        "TRITON_CACHE_DIR": os.path.join(caches, "triton"), "FLUXC_CACHE_DIR": os.path.join(caches, "fluxc")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    from fluxc.frontend.components import load_components, save_pipeline_folder
    from fluxc.frontend.models import ARCHITECTURES, load_model
    from fluxc.runtime.core.bundle import read_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--transformer-only", action="store_true",
                    help="transformer folders and engines (what fits the GPU machine's disk for FLUX.1-dev)")
    ap.add_argument("--workdir", default=".engines/refit")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    family = ARCHITECTURES[args.model][0]

    def checkpoint(seed: int) -> str:
        folder = os.path.join(args.workdir, f"checkpoint-{seed}")
        # drawn on the GPU where there is one (FLUX.1-dev's 12B random values took minutes on the CPU)
        model = load_model(args.model, dtype=dtype, device=device if args.transformer_only else torch.device("cpu"),
                           seed=seed)
        if args.transformer_only:  # a diffusers transformer folder (config.json + safetensors)
            model.module.save_pretrained(folder, safe_serialization=True)
        else:
            save_pipeline_folder(folder, model.module, load_components(args.model, family, dtype=dtype,
                                                                       device=torch.device("cpu"), seed=seed))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the builds run in other processes
        return folder

    target = ["--target", "cpu"] if device.type == "cpu" else []
    common = ["--precision", args.precision, "--resolution", args.resolution, *target,
              *(["--transformer-only"] if args.transformer_only else [])]
    engines = {name: os.path.join(args.workdir, f"{name}.fluxe") for name in ("base", "fresh", "refit")}
    seconds = {}
    # each file is deleted once no step needs it: FLUX.1-dev's checkpoints and engines together outgrow the GPU
    # machine's disk (64 GB)
    with tempfile.TemporaryDirectory() as caches:
        first = checkpoint(0)
        seconds["build_base"] = fluxc("build", "--model", first, *common, "-o", engines["base"],
                                      caches=os.path.join(caches, "base"))
        shutil.rmtree(first)
        second = checkpoint(1)
        seconds["build_second"] = fluxc("build", "--model", second, *common, "-o", engines["fresh"],
                                        caches=os.path.join(caches, "fresh"))
        fresh = read_manifest(engines["fresh"])
        shutil.rmtree(engines["fresh"])
        seconds["refit_second"] = fluxc("refit", engines["base"], "--model", second, "-o", engines["refit"],
                                        caches=os.path.join(caches, "refit"))
        # where the engine has run: its artifacts are in the segment cache (on the CPU, loading one compiles its C++)
        seconds["load_base"] = fluxc(engines["base"], caches=os.path.join(caches, "ran"),
                                     code="import sys; from fluxc.runtime import Engine; Engine.load(sys.argv[1])")
        shutil.rmtree(engines["refit"])
        seconds["refit_second_where_base_ran"] = fluxc("refit", engines["base"], "--model", second, "-o",
                                                       engines["refit"], caches=os.path.join(caches, "ran"))
    refit = read_manifest(engines["refit"])
    r = {"model": args.model, "precision": args.precision, "resolution": args.resolution,
         "transformer_only": args.transformer_only,
         "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cpu_cores": os.cpu_count(),
         "torch": torch.__version__, "commit": source_commit(), "seconds": seconds,
         "refit_fraction_of_build": seconds["refit_second"] / seconds["build_second"],
         "refit_fraction_of_build_where_base_ran": seconds["refit_second_where_base_ran"] / seconds["build_second"],
         "weights_equal": fresh["files"]["weights.safetensors"] == refit["files"]["weights.safetensors"],
         "refit_stages": refit["build_seconds"], "build_stages": fresh["build_seconds"]}
    with open(args.out, "w") as f:
        json.dump(r, f, indent=1)
    print(f"\n{args.model} {args.precision} on {r['device']}, commit {r['commit']} (fresh processes, empty caches)")
    print(f"build {seconds['build_second']:.1f} s; refit {seconds['refit_second']:.1f} s "
          f"({100 * r['refit_fraction_of_build']:.0f}% of the build) with empty caches, "
          f"{seconds['refit_second_where_base_ran']:.1f} s ({100 * r['refit_fraction_of_build_where_base_ran']:.0f}%) "
          f"where the engine has run; weights equal: {r['weights_equal']}")


if __name__ == "__main__":
    main()
