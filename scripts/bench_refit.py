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
    ap.add_argument("--workdir", default=".engines/refit")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    family = ARCHITECTURES[args.model][0]
    folders = []
    for seed in (0, 1):
        folders.append(os.path.join(args.workdir, f"checkpoint-{seed}"))
        model = load_model(args.model, dtype=dtype, device=torch.device("cpu"), seed=seed)
        save_pipeline_folder(folders[-1], model.module, load_components(args.model, family, dtype=dtype,
                                                                        device=torch.device("cpu"), seed=seed))
        del model
    target = ["--target", "cpu"] if device.type == "cpu" else []
    common = ["--precision", args.precision, "--resolution", args.resolution, *target]
    engines = {name: os.path.join(args.workdir, f"{name}.fluxe") for name in ("base", "fresh", "refit")}
    seconds = {}
    with tempfile.TemporaryDirectory() as caches:
        seconds["build_base"] = fluxc("build", "--model", folders[0], *common, "-o", engines["base"],
                                      caches=os.path.join(caches, "base"))
        seconds["build_second"] = fluxc("build", "--model", folders[1], *common, "-o", engines["fresh"],
                                        caches=os.path.join(caches, "fresh"))
        seconds["refit_second"] = fluxc("refit", engines["base"], "--model", folders[1], "-o", engines["refit"],
                                        caches=os.path.join(caches, "refit"))
        # where the engine has run: its artifacts are in the segment cache (on the CPU, loading one compiles its C++)
        seconds["load_base"] = fluxc(engines["base"], caches=os.path.join(caches, "ran"),
                                     code="import sys; from fluxc.runtime import Engine; Engine.load(sys.argv[1])")
        shutil.rmtree(engines["refit"])
        seconds["refit_second_where_base_ran"] = fluxc("refit", engines["base"], "--model", folders[1], "-o",
                                                       engines["refit"], caches=os.path.join(caches, "ran"))
    fresh, refit = (read_manifest(engines[n]) for n in ("fresh", "refit"))
    r = {"model": args.model, "precision": args.precision, "resolution": args.resolution,
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
