"""Where a fresh process's start goes (issue 28's cold start): each phase of `fluxc serve`'s start run alone, in order,
in this (fresh) process, against an engine already built (e.g. by bench_serve.py), its files in the page cache.

    python3 scripts/profile_start.py ENGINE --trusted-key PUB --out profile.json

Phases: interpreter to here, import torch, CUDA context, the serving imports, the manifest and signature, the
artifacts' digests, the compiled segments' load (under cProfile: its top functions go to the JSON), the weights read
to the GPU alone, the weights' digest alone, the warm-up. Engine.load overlaps the last three; here they are serial
so that each is seen whole. Prints a table last.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

T0 = time.perf_counter()


def since_process_start() -> float:
    """Seconds since the kernel started this process (its start time in /proc, in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    before_main = since_process_start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--trusted-key", action="append", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    phases: dict[str, float] = {"interpreter_and_script": before_main}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - clock[0]
        clock[0] = now

    import torch
    lap("import_torch")
    gpu = torch.cuda.is_available()  # False: a smoke test of this script on a CPU engine
    if gpu:
        torch.empty(1, device="cuda")
    lap("cuda_context")
    import fluxc.runtime.serve.app  # noqa: F401  (fastapi, pydantic, prometheus-client, the engine's modules)
    import uvicorn  # noqa: F401
    lap("serving_imports")
    from fluxc.runtime.core.bundle import WEIGHTS, read_manifest, verify_file, verify_files
    from fluxc.runtime.core.targets import check_runs_here
    from fluxc.runtime.engine import Engine

    manifest = read_manifest(args.engine, args.trusted_key or None)
    device = check_runs_here(manifest)
    lap("manifest_and_signature")
    verify_files(args.engine, manifest, skip=(WEIGHTS,))
    lap("artifact_digests")
    engine = Engine(args.engine, manifest, device, None)
    profiler = cProfile.Profile()
    profiler.enable()
    engine._segments = engine._load_segments(True)
    profiler.disable()
    lap("segments")
    engine._load_weights()
    if gpu:
        torch.cuda.synchronize()
    lap("weights_to_gpu")
    verify_file(args.engine, WEIGHTS, manifest["files"][WEIGHTS])
    lap("weights_digest")
    engine._load_tokenizers()
    lap("tokenizers")
    for profile in engine.profiles.values():
        engine.generate("warm-up", height=profile.height, width=profile.width, steps=2, output_type="pt")
    if gpu:
        torch.cuda.synchronize()
    lap("warm_up")

    weight_bytes = os.path.getsize(os.path.join(args.engine, WEIGHTS))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
    tottime = io.StringIO()
    pstats.Stats(profiler, stream=tottime).sort_stats("tottime").print_stats(args.top)
    result = {"engine": os.path.basename(args.engine.rstrip("/")), "gpu": torch.cuda.get_device_name() if gpu else "cpu",
              "cpu_cores": os.cpu_count(), "torch": torch.__version__, "weights_bytes": weight_bytes,
              "phases_s": phases, "total_s": sum(phases.values()),
              "weights_gb_per_s": weight_bytes / phases["weights_to_gpu"] / 1e9,
              "digest_gb_per_s": weight_bytes / phases["weights_digest"] / 1e9,
              "segments": len(manifest["segments"]),
              "segments_profile_cumulative": text.getvalue(), "segments_profile_tottime": tottime.getvalue()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(result["segments_profile_cumulative"][:6000])
    print(result["segments_profile_tottime"][:4000])
    print(f"\nstart phases, run one after another ({result['gpu']}, {result['engine']}):")
    for name, seconds in phases.items():
        print(f"  {name:<24} {seconds:7.2f} s")
    print(f"  {'total':<24} {result['total_s']:7.2f} s   weights {result['weights_gb_per_s']:.1f} GB/s to the GPU, "
          f"digest {result['digest_gb_per_s']:.1f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
