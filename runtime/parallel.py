"""Context parallelism: one image's tokens split across GPUs, attention through Ulysses all-to-all.

An engine built with `fluxc build --world-size N` runs as N ranks of one torch.distributed process group
(NCCL on GPUs, gloo on the CPU). Rank r holds the r-th N-th of the text tokens and the r-th N-th of the image
tokens for the whole denoising loop; everything in a FLUX step is per token except attention, so the
segments are compiled for the local shapes and only attention talks to the other ranks:

    fluxc.ulysses_send(q, k, v) -> ulysses_attend -> ulysses_receive   q, k, v [B, H, S_local, D] -> [B, H, S_local, D]
        all-to-all: send head group j (H/N heads) to rank j, receive every rank's tokens of my group
                    -> q, k, v [B, H/N, N * S_local, D] (tokens in rank order: [text_0, image_0, text_1, ...])
        attention over all tokens (softmax attention does not care about the keys' order)
        all-to-all back: my tokens of every head group -> [B, H, S_local, D]

RoPE tables are sharded the same way, so each token keeps its own angles. With one process (the build's
numerics check of an N-rank graph) the steps move each part to where rank j would find it, in that process's
memory: attention over what it is given. The cache decision's means
are all-reduced (decide(..., all_reduce=)), so every rank skips the same steps; the final latents are
all-gathered. Launch: `fluxc run --gpus N` (torchrun's launcher, in-process), or a bare
`torchrun --nproc-per-node N -m fluxc.runtime.parallel ENGINE --prompt ...`.
"""

import collections
import datetime
import os
import sys
import uuid

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fluxc.runtime import kernels
from fluxc.runtime.errors import FluxcError

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)  # a rank whose peer died fails instead of hanging


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# Attention over every rank's tokens in three steps, so that shard_attention can put the work that does not depend
# on attention (a single block's MLP) between them, computing while the transfers run on NCCL's stream:
#     got  = ulysses_send(q, k, v)                  start the all-to-alls of q, k, v
#     back = ulysses_attend(got, after, scale)      attention as each part lands; start the all-to-alls back
#     out  = ulysses_receive(back, after)           wait for them: [B, H, S_local, D]
# `after` holds outputs of the work placed before the step: an input it does not read, which keeps the compiler
# from moving that work past it. got and back are buffers of q, k, v's and q's size whose layout depends on the
# world size (below); their declared shapes do not, so an engine's graph is the same at build and at run time.
# ulysses_send_qk is ulysses_send of fluxc.qk_norm_rope's q and k, which its kernel writes straight into the send
# buffer (shard_attention folds the two ops).
@torch.library.custom_op("fluxc::ulysses_send", mutates_args=())
def ulysses_send(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    send, slots = _send_buffer(v)
    for slot, x in zip(slots, (q, k, v)):
        kernels.copy_heads(slot, _heads(x))
    return _transfer(send)


@torch.library.custom_op("fluxc::ulysses_send_qk", mutates_args=())
def ulysses_send_qk(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_weights: list[torch.Tensor],
                    k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                    v: torch.Tensor) -> torch.Tensor:
    send, (q_slot, k_slot, v_slot) = _send_buffer(v)
    kernels.qk_norm_rope_into(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, q_slot, k_slot)
    kernels.copy_heads(v_slot, _heads(v))
    return _transfer(send)


@torch.library.custom_op("fluxc::ulysses_attend", mutates_args=())
def ulysses_attend(got: torch.Tensor, after: list[torch.Tensor], scale: float | None = None) -> torch.Tensor:
    del after  # ordering only
    return _attend(got, scale)


@torch.library.custom_op("fluxc::ulysses_receive", mutates_args=())
def ulysses_receive(back: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    del after  # ordering only
    return _receive(back)


@ulysses_send.register_fake
def _(q, k, v):
    b, h, s, d = v.shape
    return v.new_empty(3, b, s, h, d)


@ulysses_send_qk.register_fake
def _(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, v):
    b, h, s, d = v.shape
    return v.new_empty(3, b, s, h, d)


@ulysses_attend.register_fake
def _(got, after, scale=None):
    return got.new_empty(got.shape[1:])


@ulysses_receive.register_fake
def _(back, after):
    b, s, h, d = back.shape
    return back.new_empty(b, s, h, d).transpose(1, 2)


# Each rank's head group goes in OVERLAP_CHUNKS parts, so that one part's all-to-alls run (on NCCL's stream)
# while another part's attention computes. Token-major layouts on the wire: what a rank receives is attention's
# input as strided views, and attention's output ([B, S, h, D] in memory) goes back as it is at batch 1: one copy
# in (none for q and k from ulysses_send_qk), one copy out, both kernels.copy_heads (torch's copy of these
# permutations took about twice as long: scripts/probe_copy_heads.py). Transfers in flight wait in _in_flight,
# oldest first: a segment runs its steps in one thread, in graph order, so each step takes the handles the one
# before queued.
_in_flight: collections.deque = collections.deque()


def _send_buffer(v: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The send buffer for q, k, v of v's shape [B, H, S, D]: head group j (H/N heads) of each goes to rank j, part by
    part: [part, to rank j, my token, batch, q|k|v, head of j's group, D]; and its q, k and v slots as
    [B, S, rank j, part, head, D] views, what _heads makes of a [B, H, S, D] tensor."""
    b, h, s, d = v.shape
    n, chunks, hc = _groups(h)
    send = v.new_empty(chunks, n, s, b, 3, hc, d)
    return send, [send[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(3)]


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] (stored [B, S, H, D]) as [B, S, rank j, part, head, D]."""
    n, chunks, hc = _groups(x.shape[1])
    return x.transpose(1, 2).unflatten(2, (n, chunks, hc))


def _transfer(send: torch.Tensor) -> torch.Tensor:
    """Start the all-to-all of each part of a filled send buffer. The returned buffer is [3, B, S, H, D] in size; as
    filled, got[c, j] = rank j's tokens of part c of my group: [C, N, S, B, 3, hc, D]."""
    _in_flight.clear()  # nothing is in flight between attentions; a segment cut short by an error left handles
    chunks, n, s, b, _, hc, d = send.shape
    got = send.new_empty(3, b, s, n * chunks * hc, d)
    parts = got.view(send.shape)
    for c in range(chunks):
        _start(parts[c], send[c])
    return got


def _attend(got: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention over every rank's tokens (in rank order) for my head group, each part as its transfer lands; each
    part's output starts back to the tokens' ranks. The returned buffer is [B, S, H, D] in size; as filled,
    back[c] = my tokens of every group's part c: [C, N * S, B, hc, D]."""
    _, b, s, h, d = got.shape
    n, chunks, hc = _groups(h)
    parts = got.view(chunks, n * s, b, 3, hc, d)
    back = got.new_empty(b, s, h, d)
    out_parts = back.view(chunks, n * s, b, hc, d)
    for c in range(chunks):
        _finish()
        q_c, k_c, v_c = parts[c].permute(2, 1, 3, 0, 4)  # [3, B, hc, N * S, D] views
        o = F.scaled_dot_product_attention(q_c, k_c, v_c, scale=scale).permute(2, 0, 1, 3)  # [N * S, B, hc, D]
        _start(out_parts[c], o.contiguous())  # rank j's tokens back to rank j (no copy at batch 1)
    return back


def _receive(back: torch.Tensor) -> torch.Tensor:
    """Wait for my tokens of every group's parts and lay them out as attention's output: [B, H, S, D]."""
    b, s, h, d = back.shape
    n, chunks, hc = _groups(h)
    parts = back.view(chunks, n, s, b, hc, d)
    out = back.new_empty(b, s, h, d)
    out_parts = out.view(b, s, n, chunks, hc, d)
    for c in range(chunks):
        _finish()  # [N, S, B, hc, D] -> [B, S, N, hc, D]
        kernels.copy_heads(out_parts[:, :, :, c:c + 1], parts[c].permute(2, 1, 0, 3, 4).unsqueeze(3))
    return out.transpose(1, 2)


def _groups(heads: int) -> tuple[int, int, int]:
    """(ranks = head groups, parts per group, heads per part): OVERLAP_CHUNKS parts where they divide a group."""
    n = world_size()
    chunks = OVERLAP_CHUNKS if (heads // n) % OVERLAP_CHUNKS == 0 else 1
    return n, chunks, heads // (n * chunks)


def _start(got: torch.Tensor, send: torch.Tensor) -> None:
    """Start an all-to-all of send's N equal slices along dim 0 into got (slice j to and from rank j)."""
    if world_size() == 1:  # one process holding every rank's tokens: the build's check of an N-rank graph
        got.copy_(send)
        _in_flight.append(None)
    else:
        _in_flight.append(dist.all_to_all_single(got, send, async_op=True))


def _finish() -> None:
    """Wait (on the current stream) for the oldest transfer in flight."""
    work = _in_flight.popleft()
    if work is not None:
        work.wait()


# Parts per rank's head group (used when they divide it). More parts hide more of the transfers behind attention
# but send smaller messages; FLUXC_ULYSSES_CHUNKS sets it for a process (read at import, so every rank of a
# launch inherits it).
OVERLAP_CHUNKS = int(os.environ.get("FLUXC_ULYSSES_CHUNKS", "2"))


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


def run_engine(path: str, method: str, kwargs: dict, load: dict | None = None):
    """Engine.load(path, **load).<method>(**kwargs) on this rank; rank 0 returns the result (on the CPU)."""
    from fluxc.runtime import Engine

    result = getattr(Engine.load(path, **(load or {})), method)(**kwargs)
    if rank() != 0:
        return None
    return result.cpu() if isinstance(result, torch.Tensor) else result


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m fluxc.runtime.parallel ENGINE fluxc-run-options`: `fluxc run` on every
    rank of a process group the user's own launcher started; rank 0 writes the outputs."""
    init()
    from fluxc.cli import main as cli

    try:
        cli(["run", *(sys.argv[1:] if argv is None else argv)], standalone_mode=rank() == 0)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
