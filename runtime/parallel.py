"""Context parallelism: one image's tokens split across GPUs, attention through Ulysses all-to-all.

An engine built with `fluxc build --world-size N` runs as N ranks of one torch.distributed process group
(NCCL on GPUs, gloo on the CPU). Rank r holds the r-th N-th of the text tokens and the r-th N-th of the image
tokens for the whole denoising loop; everything in a FLUX step is per token except attention, so the
segments are compiled for the local shapes and only attention talks to the other ranks:

    the ops of fluxc.runtime.ops.ulysses: all-to-all q, k, v to head groups, attention over every rank's tokens,
    all-to-all back

RoPE tables are sharded the same way, so each token keeps its own angles. The cache decision's means are
all-reduced (decide(..., all_reduce=)), so every rank skips the same steps; the final latents are all-gathered.
Launch: `fluxc run --gpus N` (torchrun's launcher, in-process), or a bare
`torchrun --nproc-per-node N -m fluxc.runtime ENGINE --prompt ...` (runtime/__main__.py).
"""

import datetime
import os
import uuid

import torch
import torch.distributed as dist

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.ops.ulysses import rank, world_size

__all__ = ["rank", "world_size", "shard", "shard_joint", "gather", "all_reduce", "check_world", "init", "launch"]

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)  # a rank whose peer died fails instead of hanging


def shard(x: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """The index-th of `parts` equal slices of x along dim."""
    size = x.shape[dim] // parts
    return x.narrow(dim, index * size, size)


def shard_joint(x: torch.Tensor, dim: int, text_tokens: int, parts: int, index: int) -> torch.Tensor:
    """This rank's rows of a [text; image] sequence along dim: its text slice, then its image slice."""
    text, image = x.narrow(dim, 0, text_tokens), x.narrow(dim, text_tokens, x.shape[dim] - text_tokens)
    return torch.cat([shard(text, dim, parts, index), shard(image, dim, parts, index)], dim)


def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's x concatenated along dim in rank order (on every rank)."""
    n = world_size()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim)


def all_reduce(x: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(x)


def check_world(built: int) -> None:
    """The process group must have the engine's world size."""
    here = world_size()
    if here != built:
        how = (f"launch it with `fluxc run --gpus {built}` (or torchrun --nproc-per-node {built})" if built > 1
               else "run it in a single process")
        raise FluxcError(f"This engine was built for {built} rank(s) (--world-size {built}); this run has {here}.",
                         f"Use the engine that way: {how}; or rebuild with --world-size {here}.")


def init(backend: str | None = None) -> None:
    """Join the process group torchrun's launcher set up (env:// rendezvous), one GPU per rank. Each rank sees
    every GPU of the node, its own first: compiled segments address cuda:0 (Inductor bakes the build's device
    index into its code), and NCCL needs the peers visible to move data over NVLink. Set before CUDA starts.
    Each rank gets its share of the host's cores for torch's threads, as under torchrun's command (with 4 ranks of
    all-core pools on one H200 host, the host ops before a loop's first step took 1.09 s, against 0.26 s alone)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend != "gloo":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))]
        own = devices[local]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join([own] + [d for d in devices if d != own])
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun's command sets it: ranks' host threads share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast can take a shared host's GPUs out of service
        # NCCL registers the all-to-alls' buffers (plain cudaMalloc memory, torch's allocator) when the loop's CUDA
        # graph is captured (user buffer registration: no copies through its own buffers): 2-3% off the 2- and
        # 4-rank fp8 loops (benchmarks/results/2026-11-22-h200x4-probe-parallel-env.json)
        os.environ.setdefault("NCCL_LEGACY_CUDA_REGISTER", "1")
        torch.cuda.set_device(0)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=torch.device("cuda", 0) if backend == "nccl" else None)


# ---- launching ---------------------------------------------------------------------------------------------
def launch(nproc: int, fn, *args, backend: str | None = None):
    """fn(*args) on `nproc` ranks of this machine, through torchrun's launcher (torch.distributed.elastic), each
    rank joined to the process group first; returns rank 0's result. A failing rank stops the others (the
    launcher tears the group down; collectives time out after COLLECTIVE_TIMEOUT) and is reported by rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"fluxc-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    try:
        return elastic_launch(config, _worker)(fn, backend, *args)[0]
    except ChildFailedError as e:
        which, failure = min(e.failures.items())
        raise FluxcError(f"Rank {which} of {nproc} failed: {_failure_message(failure)}",
                         "The other ranks were stopped. Fix the cause above (every rank runs the same engine and "
                         "arguments) and run again.") from None


def _failure_message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):  # the error file @record wrote: {"message": "...", "extraInfo": {...}}
        message = message.get("message", message)
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {failure.exitcode}"


def _worker(fn, backend, *args):
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def work():
        import gc

        init(backend)
        try:
            return fn(*args)
        finally:
            gc.collect()  # an engine's captured CUDA graphs hold NCCL work: free them before the communicator goes
            dist.destroy_process_group()

    return work()
