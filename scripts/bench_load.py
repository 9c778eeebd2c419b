"""Cold start of a whole-pipeline engine: how long verification and Engine.load take, against the
single-threaded sha256 of every file that fluxc used before engine format 5 (measured in the same run).

Builds the FLUX.1-dev bf16 whole-pipeline engine (random weights, 1024x1024), signed with a fresh key, then:
  sha256 1 thread     hashlib.sha256 over every file, one thread (what verification cost before format 5)
  verify              verify_files: BLAKE3 of every file, each on every core (page cache warm)
  load (first)        Engine.load with the trusted key, right after the build (segment caches empty)
  load (warm)         the same again: page cache and segment caches warm (median of --repeats)
  load, no verify     Engine.load(verify=False): the floor integrity adds to
  cold disk           verify, then load, after posix_fadvise(DONTNEED) evicted the engine's pages
and one 4-step image to show the loaded engine runs. Writes JSON to --out and prints a table last.

    python scripts/bench_load.py --out $OUT/bench_load.json
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import time

import torch

from timing import source_commit
from fluxc.build import BuildOptions, build
from fluxc.runtime import Engine
from fluxc.runtime.core.bundle import MANIFEST, SEAL, bundle_files, read_manifest, verify_files
from fluxc.runtime.core.signing import generate


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def every_file(engine: str) -> list[str]:
    return [os.path.join(engine, rel) for rel in bundle_files(engine) + [MANIFEST, SEAL]]


def sha256_one_thread(engine: str) -> None:
    for path in every_file(engine):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)


def evict(engine: str) -> None:
    """Drop the engine's pages from the page cache (no root needed for clean pages)."""
    for path in every_file(engine):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def load(engine: str, **kwargs) -> float:
    eng, seconds = timed(lambda: Engine.load(engine, **kwargs))
    del eng
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux1-dev")
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--workdir", default=".engines/load")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    key = os.path.join(args.workdir, "release.key")
    signer = generate(key)
    engine = os.path.join(args.workdir, f"{args.model}-bf16.fluxe")
    h, w = (int(v) for v in args.resolution.split("x"))
    _, build_s = timed(lambda: build(BuildOptions(model=args.model, output=engine, precision="bf16",
                                                  resolutions=((h, w),), sign_key=key)))
    size = sum(os.path.getsize(p) for p in every_file(engine))
    trusted = dict(trusted_keys=[key + ".pub"])
    print(f"built {engine}: {size / 1e9:.1f} GB, {len(every_file(engine))} files, {build_s:.0f} s, signed {signer}",
          flush=True)

    r = {"model": args.model, "resolution": args.resolution, "engine_bytes": size, "files": len(every_file(engine)),
         "build_s": build_s, "signer": signer, "cpu_cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
         "torch": torch.__version__, "commit": source_commit()}
    manifest = read_manifest(engine)
    r["load_first_s"] = load(engine, **trusted)
    _, r["sha256_one_thread_s"] = timed(lambda: sha256_one_thread(engine))
    verify = [timed(lambda: verify_files(engine, manifest))[1] for _ in range(args.repeats)]
    r["verify_s"] = statistics.median(verify)
    r["load_warm_s"] = statistics.median(load(engine, **trusted) for _ in range(args.repeats))
    r["load_no_verify_s"] = statistics.median(load(engine, verify=False) for _ in range(args.repeats))
    evict(engine)
    _, r["verify_cold_disk_s"] = timed(lambda: verify_files(engine, manifest))
    evict(engine)
    r["load_cold_disk_s"] = load(engine, **trusted)
    eng = Engine.load(engine, **trusted)
    image, r["generate_4_steps_first_s"] = timed(lambda: eng.generate("a red cube on a table", steps=4, seed=0,
                                                                      output_type="pt"))
    r["image_finite"] = bool(torch.isfinite(image).all())
    r["verify_gb_per_s"] = size / 1e9 / r["verify_s"]
    r["sha256_gb_per_s"] = size / 1e9 / r["sha256_one_thread_s"]
    with open(args.out, "w") as f:
        json.dump(r, f, indent=1)

    print(f"\nengine {size / 1e9:.1f} GB on {r['gpu']}, {r['cpu_cores']} cores, commit {r['commit']}")
    print(f"{'what':<34}{'seconds':>9}")
    for name, key in [("sha256, one thread (before)", "sha256_one_thread_s"), ("verify (BLAKE3, every core)", "verify_s"),
                      ("Engine.load first (signed, verify)", "load_first_s"), ("Engine.load warm", "load_warm_s"),
                      ("Engine.load verify=False", "load_no_verify_s"), ("verify, cold disk", "verify_cold_disk_s"),
                      ("Engine.load, cold disk", "load_cold_disk_s"), ("first generate, 4 steps", "generate_4_steps_first_s")]:
        print(f"{name:<34}{r[key]:>9.2f}")


if __name__ == "__main__":
    main()
