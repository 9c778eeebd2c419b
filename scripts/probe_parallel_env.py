"""Which settings of the transport change a context-parallel loop: FLUX.1-dev fp8 engines for 2 and 4 ranks (built
here as `gpu_tests.sh parallel-build` builds them), the 28-step loop timed as bench_parallel.py times it, once per
variant. A variant is a set of environment variables the ranks start with:

    base         as shipped (FLUXC_ULYSSES_CHUNKS=2)
    expandable   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: tensors in cuMem (VMM) memory, which NCCL >= 2.23
                 can register inside a CUDA graph and send from without its staging copy (zero-copy P2P)
    expandable-1 the same, one part per head group (no overlap split)
    legacy-reg   NCCL_LEGACY_CUDA_REGISTER=1: registration of plain cudaMalloc memory
    no-comm      the all-to-alls replaced by nothing (wrong values, right shapes): what the step costs without
                 the transfers, i.e. the bound any transport change can reach (an optimistic one: the stale
                 buffers seem to let the power-capped GEMMs run faster; see probe_rank_compute.py)
    carveout-N   cuBLASLt GEMMs told to leave N SMs free (torch's experimental SM carveout), so that NCCL's kernels
                 run beside a GEMM instead of waiting for its persistent grid
    nccl-ctas-8  NCCL_MAX_CTAS=8: NCCL's kernels on fewer SMs
    torch-copy   the head regrouping around the all-to-alls by torch's copy instead of kernels.copy_heads
    chunks-N     N parts per head group (FLUXC_ULYSSES_CHUNKS=N; N = 1, 3, 4)
    nvl-chunk-2m NCCL_P2P_NVL_CHUNKSIZE=2 MiB (default 512 KiB): fewer, larger steps per peer transfer
    channels-32  NCCL_MIN_NCHANNELS=32: more CTAs (and SMs) for NCCL's kernels
    ce-memcpy    NCCL_P2P_USE_CUDA_MEMCPY=1: peer transfers by the copy engines instead of SMs
    cta-efficiency  NCCL_CTA_POLICY=1 (NCCL >= 2.27): as few CTAs as give decent bandwidth, for overlap
$PROBE_VARIANTS and $PROBE_WORLDS (default: all, "2,4") choose what runs.

    python3 scripts/probe_parallel_env.py --out $OUT     (on nvidia-h200-x4; builds what is missing)
"""

import json
import os

import torch

from bench_parallel import STEPS, build_all, engine_path, time_loop

WORKDIR = ".engines/parallel"
VARIANTS = {
    "base": {},
    "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "expandable-1": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "FLUXC_ULYSSES_CHUNKS": "1"},
    "legacy-reg": {"NCCL_LEGACY_CUDA_REGISTER": "1"},
    "no-comm": {"FLUXC_PROBE_NO_COMM": "1"},
    "carveout-16": {"FLUXC_PROBE_SM_CARVEOUT": "16"},  # cuBLASLt GEMMs leave 16 SMs to NCCL's kernels
    "carveout-32": {"FLUXC_PROBE_SM_CARVEOUT": "32"},
    "nccl-ctas-8": {"NCCL_MAX_CTAS": "8"},  # NCCL's kernels take at most 8 SMs
    "torch-copy": {"FLUXC_PROBE_TORCH_COPY": "1"},
    **{f"chunks-{n}": {"FLUXC_ULYSSES_CHUNKS": str(n)} for n in (1, 3, 4)},
    "nvl-chunk-2m": {"NCCL_P2P_NVL_CHUNKSIZE": str(2 << 20)},
    "channels-32": {"NCCL_MIN_NCHANNELS": "32"},
    "ce-memcpy": {"NCCL_P2P_USE_CUDA_MEMCPY": "1"},
    "cta-efficiency": {"NCCL_CTA_POLICY": "1"},
}
WORLDS = [int(w) for w in os.environ.get("PROBE_WORLDS", "2,4").split(",")]


def timed_loop(path: str):
    from fluxc.runtime import parallel

    if os.environ.get("FLUXC_PROBE_NO_COMM"):  # every transfer "done" at once, its buffer left as it was
        parallel._start = lambda got, send: parallel._in_flight.append(None)
    if os.environ.get("FLUXC_PROBE_TORCH_COPY"):
        parallel.kernels.copy_heads = lambda dst, src: dst.copy_(src)
    if os.environ.get("FLUXC_PROBE_SM_CARVEOUT"):
        torch._C._set_sm_carveout_experimental(int(os.environ["FLUXC_PROBE_SM_CARVEOUT"]))
    r = time_loop(path, STEPS, False)
    if r is not None:
        r.pop("latents")
        r["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return r


def main():
    from bench_transformer import probe_out

    from fluxc.runtime import parallel

    out, rec = probe_out(), {}
    rec["build"] = build_all(WORKDIR, only=[("fp8", w, False) for w in WORLDS])
    base_env = dict(os.environ)
    names = os.environ.get("PROBE_VARIANTS", ",".join(VARIANTS)).split(",")
    for name, env in ((n, VARIANTS[n]) for n in names):
        for world in WORLDS:
            os.environ.clear()
            os.environ.update(base_env | env)
            try:
                r = parallel.launch(world, timed_loop, engine_path(WORKDIR, "fp8", world))
            except Exception as e:  # a variant that breaks is a result too
                r = {"error": str(e)[-300:]}
            rec[f"{name} ws{world}"] = r
            print(name, world, {k: v for k, v in r.items() if not k.endswith("_all")}, flush=True)
            with open(os.path.join(out, "probe_parallel_env.json"), "w") as f:
                json.dump(rec, f, indent=1)
    os.environ.clear()
    os.environ.update(base_env)
    print(f"\n{'variant':14} {'ws2 ms':>8} {'ws4 ms':>8}")
    for name in names:
        print(f"{name:14}", *(f"{rec.get(f'{name} ws{w}', {}).get('loop_ms', float('nan')):8.1f}" for w in (2, 4)))


if __name__ == "__main__":
    main()
